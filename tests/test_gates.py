"""Learned component gates (splora_callback/gates.py): folding equals the dense SVD reference
(float64, computed here), the gated forward equals the folded model, and learning keeps the gates in
[0, 1], lowers its objective and leaves the model bitwise as it was."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_probe import random_probe, randomize_lora
from tiny import add_lora, tiny_gpt2, tiny_llama

from splora_callback.gates import GateResult, fold_gates, gated_forward, learn_gates
from splora_callback.layers import iter_lora_layers
from splora_callback.probe import ProbeSet, UtilityProbe
from splora_callback.teacher_forced import probe_loss


def _llama(seed: int = 0, r: int = 4, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    model = add_lora(tiny_llama(seed), r=r, alpha=2 * r, targets=list(targets))
    randomize_lora(model, seed + 100, 0.1, 0.05)
    return model.eval()


def _gpt2(seed: int = 0, r: int = 4):
    model = add_lora(tiny_gpt2(seed), r=r, alpha=2 * r, targets=["c_attn", "c_proj"], fan_in_fan_out=True)
    randomize_lora(model, seed + 100, 0.1, 0.05)
    return model.eval()


def _rank_deficient(seed: int = 0):
    """r = 4 with lora_B's last column a copy of its first: rank 3, one component with sigma ~ 0."""
    model = _llama(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model, "default"):
            up = layer.lora_B["default"].weight
            up[:, 3] = up[:, 0]
    return model


BUILDS = {
    "llama-r4": lambda: _llama(1),
    "llama-r40-k-over-32-rows": lambda: _llama(2, r=40, targets=("k_proj", "v_proj")),  # k = 32 < r
    "llama-rank-deficient": lambda: _rank_deficient(3),
    "gpt2-conv1d-fan_in_fan_out": lambda: _gpt2(4),
}


def _layers(model):
    return dict(iter_lora_layers(model, "default"))


def _delta64(layer) -> torch.Tensor:
    """s B A (m, n) in float64, from the factors as they are."""
    down = layer.lora_A["default"].weight.detach().double()
    up = layer.lora_B["default"].weight.detach().double()
    return float(layer.scaling["default"]) * up @ down


def _dense_reference(delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """sum_i g_i sigma_i u_i v_i^T from a dense float64 SVD of the (m, n) update."""
    left, sigma, right_t = torch.linalg.svd(delta, full_matrices=False)
    k = gate.numel()
    return (left[:, :k] * (gate.double() * sigma[:k])) @ right_t[:k]


def _random_gates(model, seed: int, kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gates = {}
    for name, layer in _layers(model).items():
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        k = min(down.shape[0], down.shape[1], up.shape[0])
        if kind == "ones":
            gates[name] = torch.ones(k)
        elif kind == "binary":
            gate = (torch.rand(k, generator=generator) > 0.5).float()
            gate[0] = 0.0  # at least one removed, one kept
            gate[-1] = 1.0
            gates[name] = gate
        else:
            gates[name] = torch.rand(k, generator=generator)
    return gates


@pytest.mark.parametrize("build", list(BUILDS.values()), ids=list(BUILDS))
@pytest.mark.parametrize("kind", ["ones", "binary", "fractional"])
def test_fold_equals_dense_svd_reference(build, kind):
    model = build()
    gates = _random_gates(model, 7, kind)
    before = {name: _delta64(layer) for name, layer in _layers(model).items()}
    ranks = {name: layer.lora_A["default"].weight.shape[0] for name, layer in _layers(model).items()}
    scalings = {name: float(layer.scaling["default"]) for name, layer in _layers(model).items()}
    fold_gates(model, gates)
    for name, layer in _layers(model).items():
        assert layer.lora_A["default"].weight.shape[0] == ranks[name]  # same rank, same scaling
        assert float(layer.scaling["default"]) == scalings[name]
        expected = before[name] if kind == "ones" else _dense_reference(before[name], gates[name])
        error = float((_delta64(layer) - expected).abs().max())
        assert error <= 1e-6, (name, error)
        if kind == "fractional":  # the gates did something
            assert float((_delta64(layer) - before[name]).abs().max()) > 1e-4


@pytest.mark.parametrize("build", [BUILDS["llama-r4"], BUILDS["gpt2-conv1d-fan_in_fan_out"]], ids=["llama", "gpt2"])
def test_threshold_rounds_gates_to_removed_and_kept(build):
    model = build()
    gates = _random_gates(model, 3, "fractional")
    before = {name: _delta64(layer) for name, layer in _layers(model).items()}
    fold_gates(model, gates, threshold=0.5)
    for name, layer in _layers(model).items():
        rounded = (gates[name] >= 0.5).float()
        error = float((_delta64(layer) - _dense_reference(before[name], rounded)).abs().max())
        assert error <= 1e-6, (name, error)


def test_folded_adapter_reloads_to_the_same_logits(tmp_path):
    model = _llama(5)
    fold_gates(model, _random_gates(model, 1, "fractional"))
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        folded = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(5), tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert float((folded - again).abs().max()) <= 1e-6


@pytest.mark.parametrize("build", [BUILDS["llama-r4"], BUILDS["gpt2-conv1d-fan_in_fan_out"]], ids=["llama", "gpt2"])
def test_gated_forward_equals_folded_model_and_restores_weights(build):
    model = build()
    probe = random_probe(seed=2, n=4)
    gates = _random_gates(model, 5, "fractional")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with gated_forward(model, gates):
        gated = probe_loss(probe, model)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    folded = copy.deepcopy(model)
    fold_gates(folded, gates)
    assert gated == pytest.approx(probe_loss(probe, folded), abs=1e-5)
    assert gated != pytest.approx(probe_loss(probe, model), abs=1e-4)  # the gates changed the loss


@pytest.mark.parametrize("build", [BUILDS["llama-r4"], BUILDS["gpt2-conv1d-fan_in_fan_out"]], ids=["llama", "gpt2"])
def test_learn_gates_stays_in_box_lowers_objective_and_leaves_model(build):
    model = build()
    probe = random_probe(seed=1, n=5)
    safety_like = random_probe(seed=4, n=5)
    utility = UtilityProbe.from_tensors(safety_like.input_ids, safety_like.attention_mask, safety_like.labels,
                                        batch_size=2)
    anchor = random_probe(seed=9, n=4)
    model.train()  # modes are restored too
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    weights = (1.0, 0.5, 0.25)
    result = learn_gates(model, probe, utility=utility, anchor=anchor, steps=5, lr=0.1, weights=weights)
    assert isinstance(result, GateResult) and len(result.losses) == 6
    assert set(result.gates) == set(_layers(model))
    for gate in result.gates.values():
        assert gate.dtype == torch.float32 and gate.ndim == 1
        assert float(gate.min()) >= 0.0 and float(gate.max()) <= 1.0
    assert any(float(gate.min()) < 1.0 for gate in result.gates.values())
    first, last = result.losses[0], result.losses[-1]
    assert last["total"] < first["total"]
    for record in result.losses:
        total = sum(w * record[k] for w, k in zip(weights, ("refusal", "task", "anchor"), strict=True))
        assert record["total"] == pytest.approx(total, rel=1e-12)
    # bitwise unchanged: weights, flags, grads, modes, RNG
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.requires_grad == flags[name] and parameter.grad is None, name
    assert all(module.training for module in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    # entry 0 is the model as trained; the last is the model with the returned gates folded in
    assert first["refusal"] == pytest.approx(probe_loss(probe, model), abs=1e-5)
    assert first["anchor"] == pytest.approx(probe_loss(anchor, model), abs=1e-5)
    folded = copy.deepcopy(model)
    fold_gates(folded, result.gates)
    assert last["refusal"] == pytest.approx(probe_loss(probe, folded), abs=1e-5)
    assert last["task"] == pytest.approx(probe_loss(utility, folded), abs=1e-5)


def test_learn_gates_without_optional_probes_and_zero_steps():
    model = _llama(6)
    probe = random_probe(seed=3, n=4)
    result = learn_gates(model, probe, steps=0)
    assert len(result.losses) == 1 and result.losses[0]["task"] is None and result.losses[0]["anchor"] is None
    assert result.losses[0]["total"] == pytest.approx(probe_loss(probe, model), abs=1e-5)
    assert all(torch.equal(gate, torch.ones_like(gate)) for gate in result.gates.values())
    only = learn_gates(model, probe, steps=2, weights=(1.0, 0.0, 0.0))
    assert only.losses[-1]["total"] <= only.losses[0]["total"]
    assert set(only.kept(0.0)) == set(only.gates)


def test_bad_arguments_are_refused_before_anything_is_written():
    model = _llama(7)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    gates = _random_gates(model, 0, "fractional")
    name = next(iter(gates))
    with pytest.raises(ValueError, match="components"):
        fold_gates(model, {**gates, name: torch.ones(3)})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fold_gates(model, {**gates, name: torch.full((4,), 1.5)})
    with pytest.raises(ValueError, match="threshold"):
        fold_gates(model, gates, threshold=0.0)
    with pytest.raises(KeyError):
        fold_gates(model, {"model.nope": torch.ones(4)})
    for parameter_name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[parameter_name]), parameter_name
    probe = random_probe(seed=0, n=3)
    for kwargs in ({"steps": -1}, {"lr": 0.0}, {"weights": (1.0, -1.0, 0.0)}):
        with pytest.raises(ValueError):
            learn_gates(model, probe, **kwargs)


# ------------------------------------------------------------------ the anchored one-shot patch (recipes)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))


@pytest.fixture(scope="module")
def patch_setup():
    """(template PeftModel on a 420-token tiny Llama, ChatML tokenizer, refusal probe, benign pairs)."""
    from demo_data import placeholder_requests
    from tiny_models import TINY_LLAMA, VOCAB_SIZE, tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from splora_callback.data import refusal_pairs
    from splora_callback.probe import SafetyProbe

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, **TINY_LLAMA)).eval()
    template = add_lora(base, r=4, alpha=8)
    randomize_lora(template, 5, 0.1, 0.05)
    template.eval()
    requests = placeholder_requests(12)
    probe = SafetyProbe.from_pairs(tokenizer, refusal_pairs(requests[:6], seed=0), max_length=64, batch_size=4)
    benign = [(f"Summarize: the meeting moved to {day}.", f"The meeting is now on {day}.")
              for day in ("Monday", "Tuesday", "Friday")]
    return template, tokenizer, probe, benign


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_patch_without_anchors_ignores_anchor_pairs_and_keeps_its_record(patch_setup):
    from one_shot_patch import one_shot_patch
    from recipe_sections import OneShotPatchSection

    template, tokenizer, probe, benign = patch_setup
    before = _weights(template)
    spec = OneShotPatchSection(lr=1e-2, batch_size=2, steps=3)
    assert spec.anchors == 0
    plain, record = one_shot_patch(template, probe, spec, 0.0, seed=1)
    again, same = one_shot_patch(template, probe, spec, 0.0, seed=1, anchor_pairs=benign, tokenizer=tokenizer)
    for name, weight in _weights(plain).items():
        assert torch.equal(weight, _weights(again)[name]), name
    assert record == same and "anchors" not in record and "anchor_loss" not in record
    assert record["refusal_loss"]["after"] < record["refusal_loss"]["before"]
    assert all(torch.equal(p, before[name]) for name, p in template.named_parameters())  # template untouched


def test_anchored_patch_mixes_anchor_pairs_into_each_batch(patch_setup, monkeypatch):
    import one_shot_patch as patch_module
    from recipe_sections import OneShotPatchSection

    import splora_callback.patch as library_patch

    template, tokenizer, probe, benign = patch_setup
    before = _weights(template)
    seen = []
    mixed = library_patch._mixed_batch
    monkeypatch.setattr(library_patch, "_mixed_batch", lambda *args: seen.append(args[3].tolist()) or mixed(*args))
    spec = OneShotPatchSection(lr=1e-2, batch_size=2, steps=4, anchors=2)
    plain_model, plain = patch_module.one_shot_patch(
        template, probe, OneShotPatchSection(lr=1e-2, batch_size=2, steps=4), 0.0, seed=1)
    model, record = patch_module.one_shot_patch(template, probe, spec, 0.0, seed=1, anchor_pairs=benign,
                                                tokenizer=tokenizer, anchor_max_length=64)
    assert len(seen) == 4 and all(len(rows) == 2 for rows in seen)
    assert sorted(seen[0] + seen[1][:1]) == [0, 1, 2]  # one reshuffled pass over the 3 anchors, then the next
    assert record["anchors"] == 2 and record["anchor_pairs"] == 3
    assert set(record["anchor_loss"]) == {"before", "after"}
    assert record["anchor_loss"]["after"] < record["anchor_loss"]["before"]  # it learned the anchors too
    anchor = ProbeSet.from_pairs(tokenizer, benign, max_length=64, batch_size=probe.batch_size)
    assert record["anchor_loss"]["before"] == pytest.approx(probe_loss(anchor, template), abs=1e-6)
    assert record["anchor_loss"]["after"] < probe_loss(anchor, plain_model)  # more than the plain patch
    assert record["refusal_loss"]["after"] < record["refusal_loss"]["before"]
    assert {k: v for k, v in record.items() if not k.startswith("anchor")}.keys() == plain.keys()
    assert all(torch.equal(p, before[name]) for name, p in template.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_anchors_need_pairs_and_a_count(patch_setup):
    from one_shot_patch import one_shot_patch
    from recipe_sections import OneShotPatchSection, read_section

    template, tokenizer, probe, benign = patch_setup
    spec = OneShotPatchSection(lr=1e-2, batch_size=2, steps=1, anchors=1)
    with pytest.raises(ValueError, match="anchor_pairs"):
        one_shot_patch(template, probe, spec, 0.0, seed=0)
    with pytest.raises(ValueError, match="anchor_pairs"):
        one_shot_patch(template, probe, spec, 0.0, seed=0, anchor_pairs=benign)  # no tokenizer
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="anchors"):
            OneShotPatchSection(lr=1e-2, batch_size=2, steps=1, anchors=bad)
    read = read_section("evaluation.one_shot_patch", {"lr": 1e-3, "batch_size": 4, "steps": 2, "anchors": 3},
                        OneShotPatchSection)
    assert read.anchors == 3


def test_rate_stopped_patch_stops_at_the_first_step_reaching_the_rate_and_is_that_fixed_patch(patch_setup):
    """stop=refusal_rate: the first step whose probe refusal rate closes `restore` of the gap to the
    aligned model's (adapters disabled, measured first); the model is the fixed-step patch of that
    many steps, bit for bit; nothing to restore: no step, the LoRA as trained."""
    import one_shot_patch as patch_module
    from recipe_sections import OneShotPatchSection

    template, tokenizer, probe, benign = patch_setup
    before = _weights(template)
    spec = OneShotPatchSection(lr=1e-2, batch_size=2, max_steps=6, anchors=2, stop="refusal_rate", restore=0.9)
    readings = iter([1.0, 0.0, 0.3, 0.95, 1.0])  # aligned, the LoRA, after step 1, 2, 3
    model, record = patch_module.one_shot_patch(template, probe, spec, 0.0, seed=1, anchor_pairs=benign,
                                                tokenizer=tokenizer, anchor_max_length=64,
                                                measure_rate=lambda m: next(readings))
    assert record["steps"] == 2 and record["refusal_rate_by_step"] == [0.0, 0.3, 0.95]
    assert record["aligned_refusal_rate"] == 1.0 and record["target_refusal_rate"] == pytest.approx(0.9)
    assert record["reached_target"] and record["stop"] == "refusal_rate" and record["refusal_loss_by_step"] is None
    fixed, _ = patch_module.one_shot_patch(template, probe, OneShotPatchSection(lr=1e-2, batch_size=2, steps=2, anchors=2),
                                           0.0, seed=1, anchor_pairs=benign, tokenizer=tokenizer, anchor_max_length=64)
    for name, weight in _weights(model).items():
        assert torch.equal(weight, _weights(fixed)[name]), name
    assert all(torch.equal(p, before[name]) for name, p in template.named_parameters())
    # never reached: every step taken, recorded as missed
    missed = iter([1.0] + [0.1] * 7)
    model, record = patch_module.one_shot_patch(template, probe, spec, 0.0, seed=1, anchor_pairs=benign,
                                                tokenizer=tokenizer, anchor_max_length=64,
                                                measure_rate=lambda m: next(missed))
    assert record["steps"] == 6 and len(record["refusal_rate_by_step"]) == 7 and not record["reached_target"]
    # the LoRA already refuses as much as the aligned model: no step
    model, record = patch_module.one_shot_patch(template, probe, spec, 0.0, seed=1, anchor_pairs=benign,
                                                tokenizer=tokenizer, anchor_max_length=64, measure_rate=lambda m: 0.5)
    assert record["steps"] == 0 and record["reached_target"]
    for name, weight in _weights(model).items():
        assert torch.equal(weight, before[name]), name
    # the real measurement: greedy answers to the probe's prompts (the tiny models refuse none: no step)
    _, record = patch_module.one_shot_patch(template, probe, spec, 0.0, seed=1, anchor_pairs=benign, tokenizer=tokenizer)
    assert record["aligned_refusal_rate"] == 0.0 and record["refusal_rate_by_step"] == [0.0] and record["steps"] == 0
    with pytest.raises(ValueError, match="needs the tokenizer and a probe with prompts"):
        patch_module.one_shot_patch(template, dataclasses.replace(probe, prompts=None), spec, 0.0, seed=1,
                                    anchor_pairs=benign, tokenizer=tokenizer)
    for bad, match in [({"steps": 3}, "set max_steps and steps: null"), ({"stop": "loss"}, "stop='loss'"),
                       ({"restore": 1.5}, "restore=1.5")]:
        with pytest.raises(ValueError, match=match):
            OneShotPatchSection(**{"lr": 1e-2, "batch_size": 2, "max_steps": 6, "stop": "refusal_rate", **bad})


def test_lora_anchor_pairs_are_the_models_own_answers(patch_setup):
    from splora_callback.evaluation import generate
    from splora_callback.patch import anchor_pairs as lora_anchor_pairs

    template, tokenizer, _, benign = patch_setup
    prompts = [prompt for prompt, _ in benign]
    pairs = lora_anchor_pairs(template, tokenizer, prompts, max_new_tokens=4)
    answers = generate(template, tokenizer, prompts, max_new_tokens=4, progress=False)
    assert pairs == [(prompt, answer.text) for prompt, answer in zip(prompts, answers, strict=True)]
