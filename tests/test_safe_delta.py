"""Safe Delta, the study's peer baseline (recipes/safe_delta.py): a planted safety-sensitive change
reverts, a change on inputs the safety data never touches stays, the extremes of the budget, and a
float64 reference where no compensation is needed."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))

from safe_delta import input_grams, safe_delta_update, safe_delta_weights  # noqa: E402


def _planted(rows: int, columns: int, seed: int = 0):
    """Safety inputs on the first half of the columns only; a delta on every column."""
    generator = torch.Generator().manual_seed(seed)
    active = columns // 2
    inputs = torch.zeros(200, columns, dtype=torch.float64)
    inputs[:, :active] = torch.randn(200, active, generator=generator, dtype=torch.float64) * 3
    gram = inputs.T @ inputs
    delta = torch.randn(rows, columns, generator=generator, dtype=torch.float64) * 0.01
    delta[:, :active] *= 10  # the planted change: large, on the directions safety inputs use
    return gram, delta, active


@pytest.mark.parametrize("rows,columns,block", [(6, 8, 128), (5, 12, 4), (16, 300, 128)])
def test_the_planted_safety_change_reverts_and_the_untouched_one_stays(rows, columns, block):
    gram, delta, active = _planted(rows, columns)
    # a budget of twice what the untouched columns cost a row (their sensitivity: 1 + the damping)
    diagonal = torch.diag(gram).clone()
    diagonal[diagonal == 0] = 1.0
    damped = diagonal + 0.01 * diagonal.mean()
    untouched = float((delta[:, active:] ** 2 * damped[active:]).sum(dim=1).max())
    scale = 2 * untouched / (float(damped.mean()) * rows / 4096)
    kept, stats = safe_delta_update(torch.zeros(rows, columns), delta, gram, scale=scale, block=block)
    # the columns the safety data never excites are cheap: kept exactly (no compensation reaches them)
    assert torch.allclose(kept[:, active:], delta[:, active:], atol=1e-12)
    # the safety-sensitive columns revert to the aligned weight: their update is (nearly) gone
    assert kept[:, :active].abs().sum() < 0.2 * delta[:, :active].abs().sum()
    assert stats["entries"] == rows * columns and 0 < stats["kept_share"] < 1


def test_the_budget_extremes_keep_nothing_or_all_but_the_never_kept_columns():
    gram, delta, _ = _planted(4, 20, seed=1)
    nothing, stats = safe_delta_update(torch.zeros(4, 20), delta, gram, scale=0.0)
    assert stats["kept_entries"] == 0 and torch.equal(nothing, torch.zeros_like(nothing))
    everything, stats = safe_delta_update(torch.zeros(4, 20), delta, gram, scale=1e12, never_keep=0.15)
    assert stats["kept_entries"] == 4 * (20 - math.ceil(0.15 * 20))
    with pytest.raises(ValueError, match="scale=-1"):
        safe_delta_update(torch.zeros(4, 20), delta, gram, scale=-1)


@pytest.mark.parametrize("rows,columns,block,entries", [(5, 10, 128, 3.0), (3, 20, 8, 2.0), (7, 300, 128, 30.0)])
def test_a_diagonal_gram_matches_the_sorted_cumulative_cost_reference(rows, columns, block, entries):
    """Diagonal H: U is diagonal, no compensation; in each column block each row keeps, in order of
    the columns' sensitivity, the entries whose cumulative cost delta^2 / U_jj^2 fits the budget
    (a fresh budget per row of each block)."""
    generator = torch.Generator().manual_seed(4)
    damp, never_keep = 0.01, 0.2
    scale = entries * 4096 / rows  # a budget of about `entries` entries' cost per row of a block
    diagonal = torch.rand(columns, generator=generator, dtype=torch.float64) * 10 + 0.5
    delta = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    kept, stats = safe_delta_update(torch.zeros(rows, columns), delta, torch.diag(diagonal), scale, damp=damp,
                                    block=block, never_keep=never_keep)
    hessian = diagonal + damp * diagonal.mean()
    sensitivity = hessian  # 1 / U_jj^2 with U_jj = hessian^-1/2
    never = set(torch.argsort(sensitivity, descending=True)[: math.ceil(never_keep * columns)].tolist())
    budget = scale * float(sensitivity.mean()) * rows / 4096
    reference = torch.zeros_like(delta)
    for first in range(0, columns, block):
        columns_here = list(range(first, min(first + block, columns)))
        order = sorted(columns_here, key=lambda column: float(sensitivity[column]))
        for row in range(rows):
            spent = 0.0
            for column in order:
                cost = float(delta[row, column] ** 2 * sensitivity[column])
                if column in never or spent + cost > budget:
                    break
                spent += cost
                reference[row, column] = delta[row, column]
    assert torch.allclose(kept, reference, atol=1e-12)
    assert stats["kept_entries"] == int((reference != 0).sum()) > 0
    assert stats["kept_entries"] < rows * columns


def _tiny_peft():
    from test_probe import llama_model, random_probe

    return llama_model(seed=5, r=4), random_probe(seed=5, n=4)


def test_input_grams_are_the_aligned_inputs_x_xt():
    model, probe = _tiny_peft()
    name = "model.layers.0.self_attn.q_proj"
    grams = input_grams(model, probe, [name])
    seen = []
    module = model.get_submodule(f"base_model.model.{name}").get_base_layer()
    handle = module.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach()))
    from splora_callback.safety import adapters_disabled

    with adapters_disabled(model), torch.no_grad():
        for start in range(0, 4, probe.batch_size):
            model(input_ids=probe.input_ids[start:start + probe.batch_size],
                  attention_mask=probe.attention_mask[start:start + probe.batch_size])
    handle.remove()
    masks = [probe.attention_mask[s:s + probe.batch_size].bool() for s in range(0, 4, probe.batch_size)]
    rows = torch.cat([x[m] for x, m in zip(seen, masks, strict=True)]).double()
    assert torch.allclose(grams[name], rows.T @ rows, rtol=1e-10)
    layer = model.get_submodule(f"base_model.model.{name}")
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(5)  # the adapter's update does not reach the aligned inputs
    assert torch.allclose(input_grams(model, probe, [name])[name], grams[name], rtol=1e-12)


def test_safe_delta_weights_on_a_tiny_model_span_aligned_to_kept():
    from splora_callback.layers import iter_lora_layers

    model, probe = _tiny_peft()
    names = [name for name, _ in iter_lora_layers(model, "default")]
    grams = input_grams(model, probe, names)
    aligned, stats = safe_delta_weights(model, grams, 0.0)
    assert stats["kept_entries"] == 0
    for name, layer in iter_lora_layers(model, "default"):
        assert torch.equal(aligned[name], layer.get_base_layer().weight)
    weights, stats = safe_delta_weights(model, grams, 1e12, never_keep=0.0)
    assert stats["kept_share"] == 1.0
    for name, layer in iter_lora_layers(model, "default"):  # everything kept: the merged LoRA
        merged = layer.get_base_layer().weight + layer.get_delta_weight("default")
        assert torch.allclose(weights[name], merged, atol=1e-10)
