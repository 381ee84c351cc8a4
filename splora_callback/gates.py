"""Learned component gates: a repair candidate that scales each rank-one component instead of
keeping or removing it.

Every LoRA layer's update ``dW = s B A`` (m, n) is ``sum_i sigma_i u_i v_i^T`` over its
``k = min(m, n, r)`` rank-one components (:func:`~splora_callback.components.component_basis`).
A gate ``g_i in [0, 1]`` per component gives the gated update ``dW(g) = sum_i g_i sigma_i u_i v_i^T``.
:func:`learn_gates` fits the gates by a few projected-Adam steps (an Adam step, then a clamp to
[0, 1]) on

    w_refusal * refusal loss (SafetyProbe) + w_task * task loss (UtilityProbe)
        + w_anchor * anchor loss (benign requests with the LoRA model's own answers),

each the probe's mean teacher-forced token loss (nats), with only the gates trainable. The gated
forward forms no (m, n) matrix: inside, each layer's ``lora_A`` / ``lora_B`` hold the balanced
factors of its components (``A' = diag(sqrt(sigma / s)) V^T`` (k, n), ``B' = U diag(sqrt(sigma / s))``
(m, k), zero-padded to rank r) and a forward hook multiplies ``lora_A``'s output (b, T, r) by g, so
``s B' diag(g) A' = dW(g)``, differentiable in g at r-sized cost; the original factors are put back
bitwise after (as :func:`~splora_callback.repair.masked_units` does).

:func:`fold_gates` writes gates into the factors for good: the same rank r and scaling (a gated
component is still rank one, its gate folded into ``B'``), or, with a threshold, the rounded gates
(below it removed, the rest kept whole: the update :func:`masked_units` / pruning leave).

GPT-2 ``Conv1D`` layers (``fan_in_fan_out``) need nothing special: PEFT's ``lora_A`` / ``lora_B``
are plain (r, n) / (m, r) linears there too; only the merge into the base weight transposes.
Needs unsharded LoRA weights (one process, or DDP), eval-mode probe passes (LoRA dropout off).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .components import ComponentBasis, component_basis, kept_factors
from .data import IGNORE_INDEX
from .layers import (
    check_no_unscored_layers,
    check_supported,
    get_lora_layer,
    iter_lora_layers,
    resolve_adapter_name,
)
from .probe import ProbeSet
from .teacher_forced import preserved_state, response_logits, row_lengths, summed_token_loss

__all__ = ["GateResult", "fold_gates", "gated_forward", "learn_gates"]

LOSS_NAMES = ("refusal", "task", "anchor")


@dataclass
class GateResult:
    """What :func:`learn_gates` returns.

    Attributes:
        gates: layer name (as :func:`~splora_callback.layers.iter_lora_layers` names it) -> (k,)
            float32 CPU gates in [0, 1], one per component of
            :func:`~splora_callback.components.component_basis` (k = min(m, n, r): r for any real
            LoRA), in its order (descending singular value).
        losses: ``steps + 1`` dicts ``{"refusal", "task", "anchor", "total"}`` (nats; a probe not
            given is None and adds 0 to the total): entry 0 at all gates 1 (the LoRA model as
            trained), entry i after i projected-Adam steps; the last is at the returned gates.
    """

    gates: dict[str, torch.Tensor]
    losses: list[dict[str, float | None]] = field(default_factory=list)

    def kept(self, threshold: float = 0.5) -> dict[str, list[int]]:
        """Layer -> component indices whose gate is at least ``threshold`` (what ``fold_gates(..., threshold)`` keeps)."""
        return {name: (gate >= threshold).nonzero().flatten().tolist() for name, gate in self.gates.items()}


def _layers(model: nn.Module, adapter: str) -> dict[str, Any]:
    check_no_unscored_layers(model, adapter)
    layers = dict(iter_lora_layers(model, adapter))
    for name, layer in layers.items():
        check_supported(name, layer, adapter)
    if not layers:
        raise ValueError(f"The model has no LoRA layer holding adapter {adapter!r}.")
    return layers


def _layer(model: nn.Module, name: str, adapter: str) -> Any:
    """The supported LoRA layer ``name`` (KeyError naming it when it is not one)."""
    try:
        layer = get_lora_layer(model, name, adapter)
    except AttributeError as error:
        raise KeyError(f"{name} is not a module of the model ({error}); gates are keyed by LoRA layer name.") from None
    check_supported(name, layer, adapter)
    return layer


def _balanced(basis: ComponentBasis, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A' (k, n), B' (m, k))`` float64 with ``s B' diag(g) A' = sum_i g_i sigma_i u_i v_i^T``."""
    return kept_factors(basis, range(len(basis)), scaling)


def _check_gate(name: str, gate: torch.Tensor, components: int) -> torch.Tensor:
    gate = torch.as_tensor(gate).detach().to(torch.float64).flatten()
    if gate.numel() != components:
        raise ValueError(f"gates[{name!r}] has {gate.numel()} entries; the layer's update has {components} components.")
    if not bool(torch.isfinite(gate).all()) or bool((gate < 0).any()) or bool((gate > 1).any()):
        raise ValueError(f"gates[{name!r}] must be finite and in [0, 1], got {gate.tolist()}.")
    return gate


@contextlib.contextmanager
@torch.no_grad()
def gated_forward(
    model: nn.Module, gates: Mapping[str, torch.Tensor], adapter_name: str | None = None
) -> Iterator[None]:
    """Inside, every layer named in ``gates`` computes its gated update ``sum_i g_i sigma_i u_i v_i^T``,
    differentiable in the gate tensors (k,) (leaves with ``requires_grad`` for training; the body runs
    in the caller's grad mode); other layers
    are as they were. Each touched ``lora_A`` / ``lora_B`` is overwritten in place by the balanced
    factors of its components (zero-padded to rank r) and a forward hook scales ``lora_A``'s output
    (..., r) by the gates; on exit the hooks are removed and the factors restored bitwise.

    Raises:
        ValueError: a gate of the wrong length. KeyError: a name that is not a LoRA layer.
    """
    adapter = resolve_adapter_name(model, adapter_name)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    try:
        for name, gate in gates.items():
            layer = _layer(model, name, adapter)
            down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            saved += [(down, down.detach().clone()), (up, up.detach().clone())]
            basis = component_basis(down, up, float(layer.scaling[adapter]))
            if gate.numel() != len(basis):
                raise ValueError(f"gates[{name!r}] has {gate.numel()} entries; the update has {len(basis)} components.")
            new_down, new_up = _balanced(basis, float(layer.scaling[adapter]))
            k, rank = len(basis), down.shape[0]
            down.zero_()
            up.zero_()
            down[:k] = new_down.to(down.dtype)
            up[:, :k] = new_up.to(up.dtype)
            handles.append(layer.lora_A[adapter].register_forward_hook(_gate_hook(gate, rank)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for weight, original in saved:
            weight.copy_(original)


def _gate_hook(gate: torch.Tensor, rank: int):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        scale = gate.to(device=output.device, dtype=output.dtype)
        if scale.numel() < rank:  # k < r: the padded rows of A' are zero; their gate does not matter
            scale = torch.cat([scale, scale.new_zeros(rank - scale.numel())])
        return output * scale

    return hook


def _probe_pass(probe: ProbeSet, model: nn.Module, weight: float, gates: Sequence[torch.Tensor],
                grads: list[torch.Tensor] | None) -> float:
    """The probe's mean response-token loss (nats); with ``grads``, adds ``weight`` x its gradient
    with respect to ``gates`` into them (one micro-batch's graph at a time)."""
    device = next(model.parameters()).device
    lengths = row_lengths(probe.attention_mask)
    total = 0.0
    for start in range(0, len(probe), probe.batch_size):
        rows = slice(start, start + probe.batch_size)
        width = max(lengths[rows]) if lengths[rows] else 0
        ids, mask = probe.input_ids[rows, :width].to(device), probe.attention_mask[rows, :width].to(device)
        labels = probe.labels[rows, :width].to(device)
        targets = labels[:, 1:] != IGNORE_INDEX
        if not targets.any():
            continue
        with torch.set_grad_enabled(grads is not None):
            loss = summed_token_loss(response_logits(model, ids, mask, targets), labels[:, 1:][targets])
            loss = loss / probe.response_tokens
            if grads is not None and weight != 0:
                parts = torch.autograd.grad(weight * loss, list(gates), allow_unused=True)
                for held, part in zip(grads, parts, strict=True):
                    if part is not None:
                        held += part
        total += float(loss.detach())
    return total


def learn_gates(
    model: nn.Module,
    probe: ProbeSet,
    *,
    utility: ProbeSet | None = None,
    anchor: ProbeSet | None = None,
    steps: int = 12,
    lr: float = 0.05,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    adapter_name: str | None = None,
    progress: bool = False,
) -> GateResult:
    """Gates in [0, 1] on every component of every LoRA layer, fitted by ``steps`` projected-Adam steps.

    Args:
        model: the trained PEFT model; left exactly as it was (weights bitwise, training modes,
            ``requires_grad`` flags, ``.grad`` fields and RNG state).
        probe: the safety probe (refusal loss: lower = more refusal).
        utility: the task probe (task loss), or None.
        anchor: benign requests answered by the LoRA model itself (``ProbeSet.from_pairs``), so the
            gated model keeps answering benign requests; or None.
        steps: Adam steps (each: one forward/backward pass over every given probe). lr: Adam's, in
            gate units (gates start at 1).
        weights: ``(w_refusal, w_task, w_anchor)`` of the objective.
        progress: a tqdm bar of the steps.

    Returns:
        :class:`GateResult` (the gates after the last step and the objective at every step).

    Raises:
        ValueError: ``steps < 0``, a non-finite or non-positive ``lr``, negative or non-finite weights,
            or a model without supported LoRA layers (see :func:`~splora_callback.layers.check_supported`).
    """
    if int(steps) != steps or steps < 0:
        raise ValueError(f"learn_gates: steps={steps!r} must be an integer >= 0.")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learn_gates: lr={lr!r} must be a finite number > 0.")
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"learn_gates: weights={weights!r} must be three finite numbers >= 0 (refusal, task, anchor).")
    adapter = resolve_adapter_name(model, adapter_name)
    layers = _layers(model, adapter)
    gates: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        down = layer.lora_A[adapter].weight
        k = min(down.shape[0], down.shape[1], layer.lora_B[adapter].weight.shape[0])
        gates[name] = torch.ones(k, dtype=torch.float32, device=down.device, requires_grad=True)
    leaves = list(gates.values())
    optimizer = torch.optim.Adam(leaves, lr=float(lr))
    probes = dict(zip(LOSS_NAMES, (probe, utility, anchor), strict=True))
    weight_of = dict(zip(LOSS_NAMES, (float(w) for w in weights), strict=True))
    losses: list[dict[str, float | None]] = []
    bar = tqdm(total=int(steps), desc="SPLoRA gates", unit="step", disable=not progress, leave=False)
    with preserved_state(model), gated_forward(model, gates, adapter):
        for step in range(int(steps) + 1):
            training = step < steps
            grads = [torch.zeros_like(leaf) for leaf in leaves] if training else None
            record: dict[str, float | None] = {}
            for kind, probe_set in probes.items():
                record[kind] = None if probe_set is None else _probe_pass(
                    probe_set, model, weight_of[kind], leaves, grads)
            record["total"] = sum(weight_of[kind] * record[kind] for kind in LOSS_NAMES if record[kind] is not None)
            losses.append(record)
            if not training:
                break
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for leaf in leaves:
                    leaf.clamp_(0.0, 1.0)
            bar.update()
            bar.set_postfix(total=f"{record['total']:.4f}")
    bar.close()
    return GateResult({name: gate.detach().cpu().clone() for name, gate in gates.items()}, losses)


@torch.no_grad()
def fold_gates(
    model: nn.Module,
    gates: Mapping[str, torch.Tensor],
    adapter_name: str | None = None,
    threshold: float | None = None,
) -> None:
    """Write the gated update of every layer in ``gates`` into its LoRA factors, in place.

    Without ``threshold``: an exact LoRA of the same rank r and scaling,
    ``lora_A = diag(sqrt(sigma / s)) V^T`` (r, n), ``lora_B = U diag(g sqrt(sigma / s))`` (m, r)
    (zero-padded when k < r), so ``s B A = sum_i g_i sigma_i u_i v_i^T``. With ``threshold``: gates
    below it remove their component, the others keep it whole (the kept components' balanced factors
    first, the rest zero, as :func:`~splora_callback.repair.masked_units` writes them). Layers not in
    ``gates`` are untouched; ``save_pretrained`` then saves an ordinary adapter.

    Args:
        gates: layer -> (k,) gates in [0, 1] (:attr:`GateResult.gates`).
        threshold: None (fold the gates as they are) or a number in (0, 1].

    Raises:
        ValueError: a gate of the wrong length or outside [0, 1], or a threshold outside (0, 1].
        KeyError: a name that is not a LoRA layer of the adapter.
    """
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"fold_gates: threshold={threshold!r} must be in (0, 1] (or None for the gates as they are).")
    adapter = resolve_adapter_name(model, adapter_name)
    plans = []
    for name, gate in gates.items():  # check every gate before writing any
        layer = _layer(model, name, adapter)
        down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        scaling = float(layer.scaling[adapter])
        basis = component_basis(down, up, scaling)
        plans.append((down, up, scaling, basis, _check_gate(name, gate, len(basis))))
    for down, up, scaling, basis, gate in plans:
        if threshold is None:
            new_down, new_up = _balanced(basis, scaling)
            new_up = new_up * gate.to(new_up.device)
        else:
            keep = (gate >= threshold).nonzero().flatten().tolist()
            new_down, new_up = kept_factors(basis, keep, scaling)
        count = new_down.shape[0]
        down.zero_()
        up.zero_()
        down[:count] = new_down.to(down.dtype)
        up[:, :count] = new_up.to(up.dtype)
