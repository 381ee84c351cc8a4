"""Rank-one components (spec 3c): basis, attribution, geometry, budgeted selection, component pruning.

Every fast path against its dense float64 form; the first-order attribution against exactly removing
each component of a tiny model; a planted unsafe + task component; reload-exact pruned adapters.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import PeftModel
from reference import dense_geometry
from test_probe import llama_model, random_probe, reference_loss, spearman
from tiny import add_lora, tiny_gpt2, tiny_llama

from splora_callback.adapter_files import lora_updates_from_adapter
from splora_callback.components import (
    component_attribution,
    component_basis,
    component_geometry,
    kept_factors,
)
from splora_callback.layers import iter_lora_layers, lora_updates_from_model
from splora_callback.probe import UtilityProbe
from splora_callback.pruning import acted_adapter, apply_action, prune_components, save_acted_adapter
from splora_callback.scoring import LayerScore, LayerScores, score_layers
from splora_callback.selection import budget_order, random_layers, random_matched, select_layers

IDENTITY_RTOL = 1e-9  # float64 identities (the components' attributions sum to tr(M))
GEOMETRY_RTOL = 1e-8
SHAPES = [(64, 48, 8), (32, 64, 4), (96, 96, 16), (40, 24, 1)]  # (m, n, r): tall, wide, square, rank 1


def random_factors(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(r, n, generator=gen, dtype=torch.float64) * 0.1,
            torch.randn(m, r, generator=gen, dtype=torch.float64) * 0.1, 16 / r)


def test_basis_is_the_svd_of_the_update():
    for index, (m, n, r) in enumerate(SHAPES):
        down, up, scaling = random_factors(m, n, r, seed=index)
        basis = component_basis(down, up, scaling)
        delta = scaling * up @ down
        rebuilt = basis.left @ torch.diag(basis.sigma) @ basis.right.T
        assert torch.allclose(rebuilt, delta, rtol=0, atol=1e-13 * float(delta.abs().max()))
        assert torch.allclose(basis.sigma, torch.linalg.svdvals(delta)[:r], rtol=1e-10)
        assert torch.allclose(basis.left.T @ basis.left, torch.eye(r, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(basis.right.T @ basis.right, torch.eye(r, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(down.T @ basis.coefficients, basis.right, atol=1e-12)  # v_i = A^T c_i


def test_attribution_equals_dense_inner_product_and_sums_to_the_trace():
    """a_i = <dL/dW, sigma_i u_i v_i^T> from tokens written out; sum_i a_i = tr(M) exactly."""
    for index, (m, n, r) in enumerate(SHAPES):
        down, up, scaling = random_factors(m, n, r, seed=10 + index)
        gen = torch.Generator().manual_seed(20 + index)
        inputs = torch.randn(30, n, generator=gen, dtype=torch.float64)  # x_t
        output_grads = torch.randn(30, m, generator=gen, dtype=torch.float64)  # delta_t = dL/d(layer output)
        down_out = inputs @ down.T  # y_t = A x_t
        down_grads = scaling * output_grads @ up  # g_t = s B^T delta_t
        interaction = down_grads.T @ down_out  # M = sum_t g_t y_t^T
        weight_grad = output_grads.T @ inputs  # dL/dW_eff = sum_t delta_t x_t^T
        basis = component_basis(down, up, scaling)
        dense = [float(torch.sum(weight_grad * basis.sigma[i] * torch.outer(basis.left[:, i], basis.right[:, i])))
                 for i in range(r)]
        attribution = component_attribution(basis, interaction)
        assert attribution.tolist() == pytest.approx(dense, rel=1e-9, abs=1e-12)
        assert float(attribution.sum()) == pytest.approx(float(torch.trace(interaction)), rel=IDENTITY_RTOL)


def test_rank_deficient_update_gives_zero_to_empty_components():
    down, up, scaling = random_factors(32, 24, 4, seed=3)
    up[:, 2:] = 0  # B of rank 2: two components carry no update
    basis = component_basis(down, up, scaling)
    assert basis.carries_update().tolist() == [True, True, False, False]
    interaction = torch.randn(4, 4, dtype=torch.float64)
    attribution = component_attribution(basis, interaction)
    assert attribution[2:].tolist() == [0.0, 0.0] and attribution[:2].abs().min() > 0


def test_component_geometry_against_dense_formulas():
    gen = torch.Generator().manual_seed(5)
    for index, (m, n, r) in enumerate(SHAPES):
        direction = torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, n, generator=gen, dtype=torch.float64)
        down, up, scaling = random_factors(m, n, r, seed=30 + index)
        basis = component_basis(down, up, scaling)
        geometry = component_geometry(
            direction, basis, alignment_spectral_norm=float(torch.linalg.matrix_norm(direction, ord=2)),
            alignment_frobenius_norm=float(torch.linalg.matrix_norm(direction)),
        )
        for i in range(r):
            dense = dense_geometry(direction, basis.sigma[i] * torch.outer(basis.left[:, i], basis.right[:, i]))
            assert float(geometry.cosine[i]) == pytest.approx(dense["cosine"], rel=GEOMETRY_RTOL)
            assert float(geometry.relative_distance[i]) == pytest.approx(dense["relative_distance"], rel=GEOMETRY_RTOL)
            assert float(geometry.signed_alignment[i]) == pytest.approx(dense["signed_alignment"], rel=GEOMETRY_RTOL, abs=1e-14)


def test_kept_factors_reproduce_the_kept_components():
    for index, (m, n, r) in enumerate(SHAPES):
        down, up, scaling = random_factors(m, n, r, seed=40 + index)
        basis = component_basis(down, up, scaling)
        keep = list(range(0, r, 2))
        new_down, new_up = kept_factors(basis, keep, scaling)
        assert new_down.shape == (len(keep), n) and new_up.shape == (m, len(keep))
        expected = sum(basis.sigma[i] * torch.outer(basis.left[:, i], basis.right[:, i]) for i in keep)
        assert torch.allclose(scaling * new_up @ new_down, expected, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="must be distinct"):
        kept_factors(basis, [0, 0], scaling)
    with pytest.raises(ValueError, match="scaling=0"):
        kept_factors(basis, [0], 0)


# --------------------------------------------------------------------------- on a model


def task_probe(seed: int) -> UtilityProbe:
    safety = random_probe(seed=seed, n=6)
    return UtilityProbe.from_tensors(safety.input_ids, safety.attention_mask, safety.labels, batch_size=2)


def test_first_order_component_estimate_matches_exact_removal():
    """-a_i ~ L(without component i) - L: same sign, Spearman >= 0.9 (small updates)."""
    model = llama_model(seed=11, a_scale=0.05, b_scale=0.02)
    probe = random_probe(seed=11, n=6)
    scores = score_layers(model, None, metric="probe", probe=probe, granularity="component")
    with torch.no_grad():
        full = float(reference_loss(model, probe))
    estimates, drops = [], []
    for name in list(scores.layers)[:4]:
        for index, estimate in enumerate(scores[name].components["probe"]):
            pruned = copy.deepcopy(model)
            prune_components(pruned, {name: [index]})
            with torch.no_grad():
                drops.append(full - float(reference_loss(pruned, probe)))  # > 0: removal lowers L
            estimates.append(estimate)
    assert all((e > 0) == (d > 0) for e, d in zip(estimates, drops, strict=True) if abs(d) > 1e-6)
    assert spearman(estimates, drops) >= 0.9
    assert min(drops) < 0 < max(drops)  # both signs occur: the sign check is real
    for score in scores:  # each layer's components add up to its probe value
        assert sum(score.components["probe"]) == pytest.approx(score.probe, rel=1e-9)


def _plant_two_components(model, name: str, safety, utility, size: float) -> None:
    """Layer ``name`` (rank 2) = an unsafe component along the refusal-loss gradient's top singular
    pair (raises the refusal loss) + a task component against the task-loss gradient's (lowers the
    task loss), orthogonal to each other; the other layers' updates are left small."""
    layer = dict(iter_lora_layers(model, "default"))[name]
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        up.zero_()
    weight = layer.get_base_layer().weight
    weight.requires_grad_(True)
    grads = []
    for probe in (safety, utility):
        (grad,) = torch.autograd.grad(reference_loss(model, probe), [weight])
        grads.append(grad.double())
    weight.requires_grad_(False)
    u_s, _, v_s = torch.linalg.svd(grads[0])
    u_t, _, v_t = torch.linalg.svd(grads[1])
    u_s, v_s, u_t, v_t = u_s[:, 0], v_s[0], u_t[:, 0], v_t[0]
    u_t = u_t - (u_s @ u_t) * u_s
    v_t = v_t - (v_s @ v_t) * v_s
    u_t, v_t = u_t / u_t.norm(), v_t / v_t.norm()
    scaling = float(layer.scaling["default"])
    beta_s, beta_t = (size / scaling) ** 0.5, (0.8 * size / scaling) ** 0.5
    with torch.no_grad():
        down.zero_(), up.zero_()
        up[:, 0], down[0] = beta_s * u_s, beta_s * v_s  # + size u_s v_s^T: along the refusal gradient
        up[:, 1], down[1] = beta_t * u_t, -beta_t * v_t  # - 0.8 size u_t v_t^T: against the task gradient


def test_planted_unsafe_component_is_removed_and_the_task_component_kept():
    target = "model.layers.1.self_attn.o_proj"
    model = llama_model(seed=12, a_scale=0.01, b_scale=0.005, r=2, alpha=4)
    safety, utility = random_probe(seed=12, n=6), task_probe(seed=13)
    _plant_two_components(model, target, safety, utility, size=2.0)
    with torch.no_grad():
        before = float(reference_loss(model, safety)), float(reference_loss(model, utility))
    scores = score_layers(model, None, metric="probe", probe=safety, utility=utility, granularity="component")
    chosen = select_layers(scores, "top_k", k=1)
    assert list(chosen) == [target] and len(chosen[target]) == 1  # the unsafe component is the most suspect
    unsafe = chosen[target][0]
    fields = scores[target].components
    assert fields["probe"][unsafe] > 0 and fields["utility"][1 - unsafe] > 0  # removal: refusal loss down / task loss up
    budgeted = select_layers(scores, "budget", budget=0.02)  # the small noise layers may come along
    assert budgeted[target] == [unsafe]  # but never the task component
    by_component = copy.deepcopy(model)
    apply_action(by_component, None, chosen, "prune")
    by_layer = copy.deepcopy(model)
    layer_chosen = select_layers(scores.with_granularity("layer"), "top_k", k=1)
    assert layer_chosen == [target]
    apply_action(by_layer, None, layer_chosen, "prune")
    with torch.no_grad():
        component_losses = float(reference_loss(by_component, safety)), float(reference_loss(by_component, utility))
        layer_losses = float(reference_loss(by_layer, safety)), float(reference_loss(by_layer, utility))
    assert component_losses[0] < before[0] - 0.05  # refusal restored
    task_gain = layer_losses[1] - before[1]  # what removing the whole layer costs the task
    assert task_gain > 0.05
    assert abs(component_losses[1] - before[1]) < 0.2 * task_gain  # the task component is kept


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns", "gpt2"])
def test_component_pruning_reloads_exactly(tmp_path, variant):
    if variant == "gpt2":
        model = add_lora(tiny_gpt2(seed=3).double(), r=4, alpha=8, targets=["c_attn", "c_proj"], fan_in_fan_out=True)
    else:
        lora = {"use_rslora": True} if variant == "rslora" else {}
        if variant == "patterns":  # the user's own rank and alpha patterns stay valid for the other modules
            lora = {"rank_pattern": {"v_proj": 6}, "alpha_pattern": {"layers.0.self_attn.q_proj": 3}}
        model = add_lora(tiny_llama(seed=3).double(), r=4, alpha=8, **lora)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * 0.1)
    ids = torch.randint(0, 128, (2, 9), generator=gen)
    updates = {u.name: u for u in lora_updates_from_model(model)}
    names = list(updates)
    emptied = names[1]
    chosen = {names[0]: [0, 2], emptied: list(range(updates[emptied].rank)), names[-1]: [1]}
    adapter_dir, saved_dir = tmp_path / "adapter", tmp_path / "pruned-from-saved"
    model.save_pretrained(adapter_dir)
    expected = {}  # module -> the dense update of its kept components
    for name, indices in chosen.items():
        basis = component_basis(updates[name].lora_A, updates[name].lora_B, updates[name].scaling)
        expected[name] = sum((basis.sigma[i] * torch.outer(basis.left[:, i], basis.right[:, i])
                              for i in range(len(basis)) if i not in indices), torch.zeros(updates[name].shape, dtype=torch.float64))
    untouched = {name: updates[name].delta_weight().clone() for name in names if name not in chosen}

    live_dir = tmp_path / "pruned-live"
    save_acted_adapter(model, saved_dir, chosen, "prune")  # the saved-adapter path (checkpoints)
    report = apply_action(model, None, chosen, "prune")
    assert report.kept_rank == {names[0]: 2, emptied: 0, names[-1]: 3}
    model.save_pretrained(live_dir)
    live = _logits(model, ids)

    after = {u.name: u for u in lora_updates_from_model(model)}
    assert emptied not in after  # emptied: a plain base layer
    for name in (names[0], names[-1]):
        assert torch.allclose(after[name].delta_weight(), expected[name], rtol=0, atol=1e-12)
    for name, delta in untouched.items():
        assert torch.equal(after[name].delta_weight(), delta)
    for folder in (live_dir, saved_dir):
        base = tiny_gpt2(seed=3).double() if variant == "gpt2" else tiny_llama(seed=3).double()
        reloaded = PeftModel.from_pretrained(base, folder)
        assert torch.allclose(_logits(reloaded, ids), live, rtol=0, atol=1e-10), folder
        layer = reloaded.base_model.model.get_submodule(emptied)
        assert not hasattr(layer, "lora_A")
    saved_updates, config, _ = lora_updates_from_adapter(saved_dir)
    assert {u.name: u.rank for u in saved_updates}[names[0]] == 2
    assert config["rank_pattern"][f"(?:{re.escape(names[0])})"] == 2


def test_a_shadowing_user_pattern_is_refused():
    model = add_lora(tiny_llama(seed=3).double(), r=4, alpha=8, rank_pattern={"(.*)q_proj": 4})
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        dict(iter_lora_layers(model, "default"))[name].lora_B["default"].weight.normal_()
    with pytest.raises(ValueError, match=r"rank_pattern key '\(\.\*\)q_proj' would override"):
        apply_action(model, None, {name: [0]}, "prune")


def test_component_selection_errors_and_actions():
    model = llama_model(seed=14)
    name = next(iter(dict(iter_lora_layers(model, "default"))))
    with pytest.raises(ValueError, match="must be distinct indices of components"):
        apply_action(copy.deepcopy(model), None, {name: [99]}, "prune")
    with pytest.raises(ValueError, match="supports 'prune' and 'none'"):
        apply_action(copy.deepcopy(model), None, {name: [0]}, "project")
    state = {"base_model.model.x.lora_A.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="no weights for y"):
        acted_adapter(state, {"r": 1, "lora_alpha": 1}, {"y": [0]}, "prune")


# --------------------------------------------------------------------------- selection


def synthetic_scores(pairs: dict[str, list[tuple[float, float]]], task_loss: float = 2.0) -> LayerScores:
    """Scores whose components have the given (safety a, utility t) values, kinds from the names."""
    scores = LayerScores("probe", "layers", granularity="component", losses={"task": task_loss, "refusal": 1.0})
    for name, values in pairs.items():
        scores.layers[name] = LayerScore(
            name, name.rsplit(".", 1)[-1], (8, 8), len(values), "active", 1.0,
            probe=sum(a for a, _ in values), utility=sum(t for _, t in values),
            components={"sigma": [1.0 - 0.1 * i for i in range(len(values))],
                        "probe": [a for a, _ in values], "utility": [t for _, t in values]},
        )
    return scores


def test_budget_order_and_stop():
    scores = synthetic_scores({
        "l0.q": [(0.5, 0.1), (0.3, -0.2), (-0.4, 0.0)],  # ratio 5; free; never (a <= 0)
        "l1.v": [(0.2, 0.01), (0.3, 0.3), (0.3, -0.2)],  # ratio 20; ratio 1; free (tie with l0.q#1: by name)
    })
    assert budget_order(scores) == [("l0.q", 1), ("l1.v", 2), ("l1.v", 0), ("l0.q", 0), ("l1.v", 1)]
    # budget 0.05 x task loss 2.0 = 0.1: -0.2 - 0.2 + 0.01 + 0.1 = -0.29, then +0.3 -> 0.01 <= 0.1
    assert select_layers(scores, "budget", budget=0.05) == {"l0.q": [0, 1], "l1.v": [0, 1, 2]}
    # budget 0: free components, and costly ones while the free gains pay for them
    assert select_layers(scores, "budget", budget=0.0) == {"l0.q": [0, 1], "l1.v": [0, 2]}
    assert select_layers(scores, "budget", budget=1.0, k=2) == {"l0.q": [1], "l1.v": [2]}
    assert select_layers(scores, "budget", budget=1.0, fraction=0.5) == {"l0.q": [1], "l1.v": [0, 2]}
    layer_level = select_layers(scores.with_granularity("layer"), "budget", budget=0.05)
    assert layer_level == ["l0.q", "l1.v"]  # a=0.4, t=-0.1 (free) first; then a=0.8, t=0.11 (cost 0.01)
    with pytest.raises(ValueError, match="budget >= 0"):
        select_layers(scores, "budget")
    no_task = synthetic_scores({"l0.q": [(0.5, 0.1)]})
    no_task.losses.pop("task")
    with pytest.raises(ValueError, match="needs the task loss"):
        select_layers(no_task, "budget", budget=0.1)


def test_component_rules_and_random_controls():
    scores = synthetic_scores({f"l{i}.{kind}": [(0.1 * i + j, 0.0) for j in range(3)]
                               for i in range(4) for kind in ("q", "v")})
    top = select_layers(scores, "top_k", k=4)
    assert top == {"l3.q": [2], "l3.v": [2], "l2.q": [2], "l2.v": [2]}  # a = 2.3, 2.3, 2.2, 2.2
    assert sum(map(len, select_layers(scores, "fraction", fraction=0.25).values())) == 6
    assert select_layers(scores, "threshold", threshold=2.25) == {"l3.q": [2], "l3.v": [2]}
    assert select_layers(scores, "top_k", k=1) == {"l3.q": [2]}  # tie with l3.v#2: by name
    for seed in range(3):
        control = random_matched(top, scores, seed)
        units = [(name, i) for name, indices in control.items() for i in indices]
        assert len(units) == len(set(units)) == 4
        assert sorted(name.rsplit(".", 1)[1] for name, _ in units) == sorted(
            name.rsplit(".", 1)[1] for name, indices in top.items() for _ in indices)
        assert control == random_matched(top, scores, seed)  # seeded
    uniform = random_layers(scores, 5, seed=0)
    assert sum(map(len, uniform.values())) == 5
    assert random_matched(["l0.q", "l1.v"], scores, 0) != {}  # a layer selection gets a layer control
    assert isinstance(random_matched(["l0.q", "l1.v"], scores, 0), list)


# --------------------------------------------------------------------------- the callback


def _train(tmp_path, out: str, callbacks, rows):
    from peft import LoraConfig, get_peft_model
    from tiny import ATTENTION
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, lora_dropout=0.1))
    args = TrainingArguments(
        output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
    return model


def _rows():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "attention_mask": [1] * 12, "labels": ids}
            for ids in torch.randint(0, 128, (16, 12), generator=gen).tolist()]


def test_callback_monitor_only_with_both_probes_is_bit_identical(tmp_path):
    """Component scoring with the safety probe and the automatic utility probe (a seeded slice of
    the training data) leaves training exactly as without the callback."""
    from splora_callback.callback import SPLoRACallback
    from splora_callback.config import SPLoRAConfig

    rows = _rows()
    plain = {n: p.detach().clone() for n, p in _train(tmp_path, "plain", [], rows).named_parameters()}
    config = SPLoRAConfig(metric="probe", probe=random_probe(seed=9), select="budget", budget=0.05,
                          granularity="component", action="none", score_every_n_steps=2, prune_at_end=False,
                          utility_examples=6)
    callback = SPLoRACallback(config)
    monitored = _train(tmp_path, "monitored", [callback], rows)
    assert [entry["step"] for entry in callback.history] == [2, 4, 6]
    assert callback.utility_source == "train_dataset: 6 examples sampled with seed 0"
    for entry in callback.history:
        assert set(entry["scores"]["losses"]) == {"refusal", "task"}
        assert all(len(layer["components"]["utility"]) == 4 for layer in entry["scores"]["layers"])
        assert isinstance(entry["selected"], dict)
    for name, param in monitored.named_parameters():
        assert torch.equal(plain[name], param), name


def test_callback_prunes_components_at_the_end_and_reports_them(tmp_path):
    import json

    from splora_callback.callback import SPLoRACallback
    from splora_callback.config import SPLoRAConfig

    utility = task_probe(seed=3)
    config = SPLoRAConfig(metric="probe", probe=random_probe(seed=9), utility=utility, select="top_k", k=5,
                          granularity="component", score_every_n_steps=0)
    callback = SPLoRACallback(config)
    model = _train(tmp_path, "run", [callback], _rows())
    chosen = callback.selected
    assert sum(map(len, chosen.values())) == 5
    assert callback.action_report["kept_rank"] == {name: 4 - len(indices) for name, indices in chosen.items()}
    report = json.loads((tmp_path / "run" / "splora_report.json").read_text())
    assert report["repair"]["utility_source"] == "user"
    assert report["repair"]["kept_rank"] == callback.action_report["kept_rank"]
    assert report["repair"]["predicted_refusal_loss_change"] < 0  # the 5 most suspect: a > 0
    ranks = {u.name: u.rank for u in lora_updates_from_model(model)}
    for name, kept in callback.action_report["kept_rank"].items():
        assert ranks.get(name, 0) == kept
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    model.eval()
    assert torch.allclose(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the CLI


def test_cli_prunes_components_with_both_probes(tmp_path):
    """`splora prune --probe-prompts --utility-examples --granularity component --budget` on a saved
    adapter: a loadable adapter whose touched modules have lower ranks, the input untouched."""
    import json

    from cli_process import splora
    from test_probe import make_tokenizer

    aligned_dir, adapter_dir, output = tmp_path / "aligned", tmp_path / "adapter", tmp_path / "repaired"
    tiny_llama(seed=5).save_pretrained(aligned_dir)
    make_tokenizer().save_pretrained(aligned_dir)
    model = add_lora(tiny_llama(seed=5), r=4, alpha=8)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.peft_config["default"].base_model_name_or_path = str(aligned_dir)
    model.save_pretrained(adapter_dir)
    before = (adapter_dir / "adapter_model.safetensors").read_bytes()
    words = [f"w{i}" for i in range(40)]
    (tmp_path / "probe.jsonl").write_text("\n".join(
        json.dumps({"prompt": " ".join(words[i:i + 5])} if i % 2 else
                   {"prompt": " ".join(words[i:i + 5]), "refusal": "w1 w2 w3"}) for i in range(0, 30, 3)))
    (tmp_path / "task.jsonl").write_text("\n".join(
        json.dumps({"prompt": " ".join(words[i:i + 6]), "response": " ".join(words[i + 6:i + 10])})
        for i in range(0, 24, 2)))
    done = splora("prune", str(adapter_dir), "--probe-prompts",
         str(tmp_path / "probe.jsonl"), "--utility-examples", str(tmp_path / "task.jsonl"),
         "--granularity", "component", "--budget", "0.5", "--output", str(output), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank-one components in" in done.stdout
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() == before
    updates, config, _ = lora_updates_from_adapter(output)
    assert any(update.rank < 4 for update in updates)
    assert all(key.startswith("(?:") for key in config["rank_pattern"])
    PeftModel.from_pretrained(tiny_llama(seed=5), output)  # loads

    # --restore: the measured stop (select="repair"); its count is the callback's on the same model
    restored = splora("prune", str(adapter_dir), "--probe-prompts",
         str(tmp_path / "probe.jsonl"), "--utility-examples", str(tmp_path / "task.jsonl"),
         "--granularity", "component", "--restore", "0.8", "--output", str(tmp_path / "restored"), timeout=300)
    assert restored.returncode == 0, restored.stderr[-2000:]
    stop = re.search(r"measured stop: (\d+) of (\d+) component units \((refusal restored|order exhausted)\)",
                     restored.stderr)
    assert stop and 0 < int(stop[1]) <= int(stop[2]), restored.stderr[-2000:]
    pruned = sum(4 - update.rank for update in lora_updates_from_adapter(tmp_path / "restored")[0])
    assert pruned == int(stop[1]) and f"{stop[1]} rank-one components in" in restored.stdout
    assert "--restore 0.8" in (tmp_path / "restored" / "README.md").read_text()
    # --rule-option: the refusal-rate stop, end to end (it generates with ALIGNED's tokenizer). These tiny
    # models refuse none of the probe's prompts, so the aligned rate, the target and the removal are all 0
    rate = splora("prune", str(adapter_dir), "--probe-prompts", str(tmp_path / "probe.jsonl"), "--utility-examples",
                  str(tmp_path / "task.jsonl"), "--granularity", "component", "--restore", "0.9", "--rule-option",
                  "stop=refusal_rate", "--rule-option", "trim=2", "--output", str(tmp_path / "rate"), timeout=300)
    assert re.search(r"measured stop: 0 of \d+ component units \(refusal restored\); refusal rate on the probe's "
                     r"prompts 0\.000 -> 0\.000, target 0\.000 \(aligned model 0\.000\)", rate.stderr), rate.stderr[-2000:]
    assert rate.returncode == 2 and "refusal rate on the probe's prompts already reaches --restore 0.9" in rate.stderr
    assert not (tmp_path / "rate").exists() and (adapter_dir / "adapter_model.safetensors").read_bytes() == before
    unknown = splora("prune", str(adapter_dir), "--probe-prompts", str(tmp_path / "probe.jsonl"), "--utility-examples",
                     str(tmp_path / "task.jsonl"), "--restore", "0.9", "--rule-option", "stpo=refusal_rate",
                     "--output", str(tmp_path / "y"), timeout=300)
    assert unknown.returncode == 2 and "--rule-option stpo" in unknown.stderr and not (tmp_path / "y").exists()
    mixed = splora("prune", str(adapter_dir), "--probe-prompts",
         str(tmp_path / "probe.jsonl"), "--restore", "0.8", "--top-k", "2", "--output", str(tmp_path / "z"), timeout=300)
    assert mixed.returncode == 2 and "--restore measures its own number of units: drop --top-k" in mixed.stderr
    assert not (tmp_path / "z").exists()

    bad = splora("prune", str(adapter_dir), "--granularity", "component",
         "--top-k", "3", "--output", str(tmp_path / "x"), timeout=120)
    assert bad.returncode == 2 and "need the safety probe: pass --probe-prompts" in bad.stderr
    (tmp_path / "broken.jsonl").write_text('{"prompt": "w1"}\n[1, 2]\n')
    broken = splora("prune", str(adapter_dir), "--probe-prompts",
         str(tmp_path / "broken.jsonl"), "--top-k", "1", "--output", str(tmp_path / "y"), timeout=300)
    assert broken.returncode == 2 and "broken.jsonl:2: expected an object" in broken.stderr
