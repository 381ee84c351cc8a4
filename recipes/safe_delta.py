"""Safe Delta (Lu et al., ICML 2025), the peer baseline of the efficacy study, on a trained LoRA.

Written from the paper's description, not the authors' code. For every LoRA-adapted linear module
with aligned weight ``W`` (m, n) and fine-tune delta ``D`` (m, n) (here the merged LoRA update
``s B A``), the Gram matrix ``H = sum_t x_t x_t^T`` (n, n) of the module's inputs on safety data
(the safety probe's harmful prompts with refusals, run through the aligned model) says how much
each input direction matters for safety. As in SparseGPT, ``H`` is damped and inverted, and ``U``
is the upper Cholesky factor of ``H^-1``; column ``j``'s sensitivity is ``1 / U_jj^2``. Per block
of columns (``block`` wide, the last one narrower), each row keeps its delta entries in order of
their column's sensitivity (least sensitive first; the most sensitive ``never_keep`` share of all
n columns is never kept) while the row's cumulative safety cost ``D_ij^2 / U_jj^2`` over that
block stays within the budget ``scale x mean_j(1 / U_jj^2) x m / 4096``. The budget is per row
*of each block*: every (row, block) pair gets the full budget afresh (nothing carries over between
blocks). Units: cost and budget are squared output activation, summed over the safety tokens
(``D_ij^2 / U_jj^2`` is the OBS increase of ``sum_t ((W + D)_i x_t - y_it)^2`` when the entry
reverts with compensation, in SparseGPT's sequential convention). Every other entry reverts to the aligned weight, and the OBS update compensates the revert
on the columns not yet processed (SparseGPT's lazy-batch update on the delta). The decision for a
block is taken on the delta as compensated by the earlier blocks. The result is a dense (m, n)
update, no longer low-rank.

The study calibrates ``scale`` once (:func:`calibrated_safe_delta`: the largest scale whose greedy
refusal rate on the probe's own prompts reaches the aligned model's, on replication 0 of setting
(a)) and freezes it for every other cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def input_grams(model: Any, probe: Any, names: Sequence[str], adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """``{name: H}``: (n, n) float64 sums of ``x x^T`` of each named LoRA module's input over the
    probe's non-padding tokens, with the adapters disabled (the aligned model's inputs)."""
    from splora_callback.layers import get_lora_layer, resolve_adapter_name
    from splora_callback.safety import adapters_disabled

    adapter = resolve_adapter_name(model, adapter_name)
    grams: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def accumulate(module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            rows = inputs[0].detach().double()[mask["tokens"]]  # (tokens, n)
            grams[name] = grams.get(name, 0) + rows.T @ rows
        return accumulate

    handles = [get_lora_layer(model, name, adapter).register_forward_pre_hook(hook(name)) for name in names]
    device = next(model.parameters()).device
    try:
        with adapters_disabled(model), torch.no_grad():
            for start in range(0, probe.input_ids.shape[0], probe.batch_size):
                ids = probe.input_ids[start:start + probe.batch_size].to(device)
                attention = probe.attention_mask[start:start + probe.batch_size].to(device)
                mask["tokens"] = attention.bool()
                model(input_ids=ids, attention_mask=attention)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def safe_delta_update(aligned_weight: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor, scale: float, *,
                      damp: float = 0.01, block: int = 128, never_keep: float = 0.15) -> tuple[torch.Tensor, dict]:
    """The delta Safe Delta keeps for one module, (m, n) float64, and ``{"kept_entries", "entries", "kept_share"}``.

    The kept delta is dense (not low-rank): kept entries carry the OBS compensation of the
    reverted ones, reverted entries are 0. Budget: per row of each column block (module docstring).

    Args:
        aligned_weight: (m, n), the aligned model's weight (its shape and dtype only: the kept
            delta is what is added to it).
        delta: (m, n), the fine-tune's update. gram: (n, n), the safety inputs' ``sum x x^T``.
        scale: the budget's s (>= 0; 0 keeps nothing, the aligned weights).
        damp: share of the mean diagonal added to ``H``'s diagonal. block: columns per block.
        never_keep: share of the most sensitive columns whose entries always revert.
    """
    if scale < 0 or not math.isfinite(scale):
        raise ValueError(f"safe_delta_update: scale={scale!r} must be a finite number >= 0.")
    rows, columns = delta.shape
    if aligned_weight.shape != delta.shape or gram.shape != (columns, columns):
        raise ValueError(f"safe_delta_update: weight {tuple(aligned_weight.shape)}, delta {tuple(delta.shape)} and "
                         f"Gram {tuple(gram.shape)} do not fit ((m, n), (m, n), (n, n)).")
    hessian = gram.double().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian += damp * torch.diag(hessian).mean() * torch.eye(columns, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    diagonal = torch.diag(upper)
    sensitivity = 1.0 / diagonal**2  # (n,)
    never = torch.zeros(columns, dtype=torch.bool)
    never[torch.argsort(sensitivity, descending=True)[: math.ceil(never_keep * columns)]] = True
    budget = scale * float(sensitivity.mean()) * rows / 4096
    work = delta.double().clone()
    kept = torch.zeros(rows, columns, dtype=torch.bool)
    for first in range(0, columns, block):
        last = min(first + block, columns)
        part = work[:, first:last].clone()
        # which entries stay: per row, columns by sensitivity, cumulative cost within what is left
        order = torch.argsort(sensitivity[first:last])
        cost = part[:, order] ** 2 / diagonal[first:last][order] ** 2
        cost[:, never[first:last][order]] = math.inf
        keep_sorted = torch.cumsum(cost, dim=1) <= budget  # (m, block): the budget is per row of this block
        keep = torch.zeros_like(keep_sorted)
        keep[:, order] = keep_sorted
        kept[:, first:last] = keep
        errors = torch.zeros_like(part)
        block_upper = upper[first:last, first:last]
        for j in range(last - first):  # OBS: revert column j's dropped entries, compensate on the rest
            column = part[:, j]
            error = torch.where(keep[:, j], torch.zeros_like(column), column) / block_upper[j, j]
            part[:, j:] -= error[:, None] * block_upper[j, j:][None, :]
            errors[:, j] = error
        work[:, first:last] = part
        work[:, last:] -= errors @ upper[first:last, last:]
    work[~kept] = 0.0
    entries = rows * columns
    count = int(kept.sum())
    return work, {"kept_entries": count, "entries": entries, "kept_share": count / entries}


def safe_delta_weights(model: Any, grams: dict[str, torch.Tensor], scale: float, adapter_name: str | None = None,
                       **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``{name: W_aligned + kept delta}`` for every LoRA layer of the PEFT ``model`` (base weight's
    layout and dtype) and totals: the kept share of all delta entries and the parameters that
    differ from the aligned model's (a dense update: Safe Delta's output is not a LoRA)."""
    from splora_callback.layers import iter_lora_layers, resolve_adapter_name

    adapter = resolve_adapter_name(model, adapter_name)
    weights: dict[str, torch.Tensor] = {}
    kept = entries = 0
    with torch.no_grad():
        for name, layer in iter_lora_layers(model, adapter):
            base = layer.get_base_layer().weight
            delta = layer.get_delta_weight(adapter).double()
            transposed = bool(getattr(layer, "fan_in_fan_out", False))  # GPT-2 Conv1D: (n, m)
            aligned = base.double().T if transposed else base.double()
            delta = delta.T if transposed else delta
            new_delta, stats = safe_delta_update(aligned, delta, grams[name], scale, **options)
            weight = aligned + new_delta
            weights[name] = (weight.T if transposed else weight).to(base.dtype).contiguous()
            kept += stats["kept_entries"]
            entries += stats["entries"]
    return weights, {"kept_entries": kept, "entries": entries, "kept_share": kept / entries if entries else 0.0}


def calibrated_safe_delta(template: Any, eval_model: Any, tokenizer: Any, probe: Any, spec: Any, *,
                          max_new_tokens: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Safe Delta's effective weights at the study's scale, and a record of how it was chosen.

    ``spec.scale`` given (frozen by the calibration cell): that scale. None: the largest of
    ``spec.scales`` whose greedy refusal rate on the probe's own harmful prompts reaches the aligned
    model's, tried from the smallest up until one falls short; the smallest when none reaches it
    (``reached_target: False``). ``eval_model`` (a plain copy of the aligned model) generates, and
    is left with the aligned weights.
    """
    from splora_callback.layers import iter_lora_layers, resolve_adapter_name
    from splora_callback.safety import refusal_rate_now

    adapter = resolve_adapter_name(template)
    names = [name for name, _ in iter_lora_layers(template, adapter)]
    aligned = {name: eval_model.get_submodule(name).weight.detach().clone() for name in names}
    grams = input_grams(template, probe, names, adapter)
    options = {"damp": spec.damp, "block": spec.block, "never_keep": spec.never_keep}

    def refusal(weights: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for name in names:
                eval_model.get_submodule(name).weight.copy_(weights[name])
        return refusal_rate_now(eval_model, tokenizer, probe.prompts, max_new_tokens, batch_size=len(probe.prompts))

    target = refusal(aligned)
    trials: list[dict[str, Any]] = []
    chosen = None
    for scale in [spec.scale] if spec.scale is not None else sorted(spec.scales):
        weights, totals = safe_delta_weights(template, grams, scale, adapter, **options)
        rate = refusal(weights)
        trials.append({"scale": scale, "probe_refusal_rate": rate, **totals})
        if spec.scale is not None or rate >= target:
            chosen = (scale, weights, totals)
        else:
            break
    reached = spec.scale is not None or chosen is not None
    if chosen is None:  # not even the smallest scale reached the aligned model's probe refusal
        chosen = (trials[0]["scale"], *safe_delta_weights(template, grams, trials[0]["scale"], adapter, **options))
    refusal(aligned)  # eval_model back to the aligned weights
    scale, weights, totals = chosen
    return weights, {"scale": scale, "calibrated": spec.scale is None, "reached_target": reached,
                     "aligned_probe_refusal_rate": target, "trials": trials, "dense": True, **totals}
