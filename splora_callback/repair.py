"""Measured repair (spec 3c): remove units in budget order until the refusal loss is back.

The budget rule (``select="budget"``) stops where the *first-order* estimate of the task-loss
increase reaches the budget; on the CPU demo that stop restored 7 of 24 refusals while a fixed
count restored all of them at the cost of the task (docs/components.md). The measured stop keeps
the budget order (best safety gain per unit of task cost first) and replaces the prediction with
forward passes: it takes the shortest prefix of that order whose *measured* refusal loss on the
safety probe reaches a target, usually :func:`restore_target` (a share of the gap to the aligned
model closed), optionally shortened while the measured task loss on the utility probe rises more
than ``budget`` x the task loss.

Each measurement runs the model with the prefix's components masked (:func:`masked_units`: the
same factor shapes, the removed components' weight zeroed, exactly the update that
:func:`~splora_callback.pruning.prune_components` leaves) and restores the weights after, so
nothing is changed until the caller acts on the returned selection. Bisection over the prefix
length: about ``log2(units)`` probe passes (10 for 960 components), twice that with a budget;
the unpruned model's refusal loss is taken from the scores when they hold it, and the whole
order is measured only when no shorter prefix reaches the target.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .components import component_basis, kept_factors
from .layers import get_lora_layer, resolve_adapter_name
from .probe import ProbeSet
from .pruning import kept_components
from .scoring import LayerScores
from .selection import Selection, as_selection, attributions, budget_order
from .teacher_forced import probe_loss

__all__ = ["RepairTrace", "masked_units", "measured_stop", "predicted_repair", "repair_selection", "restore_target"]


def restore_target(current: float, aligned: float, restore: float) -> float:
    """The refusal loss (nats) at which ``restore`` of the gap from ``current`` (the trained LoRA's)
    down to ``aligned`` (the aligned model's) is closed: ``aligned + (1 - restore) (current - aligned)``.

    Raises:
        ValueError: ``restore`` outside [0, 1].
    """
    if not 0 <= restore <= 1:
        raise ValueError(f"restore={restore!r}: the share of the refusal-loss gap to close, in [0, 1].")
    return aligned + (1 - restore) * max(current - aligned, 0.0)


@dataclass
class RepairTrace:
    """What :func:`measured_stop` measured.

    Attributes:
        target: the refusal loss to reach (nats; the aligned model's).
        task_limit: the largest task loss allowed (nats), or None without a utility probe.
        measurements: every measurement in order, ``{"probe": "refusal" | "task", "count": prefix
            length, "loss": nats}``; one taken from the scores instead of a forward pass (the
            refusal loss with nothing removed) also has ``"from": "scores"``.
        chosen: prefix length returned. available: units in the order.
        reason: ``"refusal restored"``, ``"task budget"`` (shortened to stay within it) or
            ``"order exhausted"`` (every unit of the order did not reach the target).
    """

    target: float
    task_limit: float | None
    available: int
    measurements: list[dict[str, Any]] = field(default_factory=list)
    chosen: int = 0
    reason: str = ""

    @property
    def passes(self) -> int:
        """Forward passes over a probe that the search ran."""
        return sum("from" not in measured for measured in self.measurements)

    def refusal_loss_at(self, count: int) -> float | None:
        """The refusal loss measured with the first ``count`` units removed, or None if not measured."""
        return next((m["loss"] for m in self.measurements if m["probe"] == "refusal" and m["count"] == count), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _removals(units: Sequence[Hashable]) -> dict[str, list[int] | None]:
    """Module -> component indices to remove (None: the whole layer)."""
    removal: dict[str, list[int] | None] = {}
    for unit in units:
        if isinstance(unit, tuple):
            indices = removal.setdefault(unit[0], [])
            if indices is not None:
                indices.append(unit[1])
        else:
            removal[unit] = None
    return removal


@contextlib.contextmanager
@torch.no_grad()
def masked_units(model: nn.Module, units: Sequence[Hashable], adapter_name: str | None = None) -> Iterator[None]:
    """Inside, the update of every listed unit is removed from ``model``; the weights are restored after.

    A unit is a layer name (its whole update) or a ``(layer, component index)`` pair. Each touched
    module's ``lora_A`` (r, n) / ``lora_B`` (m, r) are overwritten in place by the kept components'
    balanced factors (:func:`~splora_callback.components.kept_factors`), zero-padded to rank r: the
    same update as pruning those components, with no module swapped. Needs unsharded LoRA weights
    (one process, or DDP).
    """
    adapter = resolve_adapter_name(model, adapter_name)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for name, indices in _removals(units).items():
            layer = get_lora_layer(model, name, adapter)
            down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            saved.append((down, down.detach().clone()))
            saved.append((up, up.detach().clone()))
            scaling = float(layer.scaling[adapter])
            basis = component_basis(down, up, scaling)
            removed = basis.carries_update().nonzero().flatten().tolist() if indices is None else indices
            keep = kept_components(basis, removed, name).indices
            down.zero_()
            up.zero_()
            if keep:
                new_down, new_up = kept_factors(basis, keep, scaling)
                down[: len(keep)] = new_down.to(down.dtype)
                up[:, : len(keep)] = new_up.to(up.dtype)
        yield
    finally:
        for weight, original in saved:
            weight.copy_(original)


def _first_reaching(count_ok: Any, low: int, high: int) -> int:
    """Smallest ``k`` in (low, high] with ``count_ok(k)``, given not ``count_ok(low)``; ``high`` when no
    smaller ``k`` passes (``count_ok(high)`` itself is never called)."""
    while high - low > 1:
        middle = (low + high) // 2
        if count_ok(middle):
            high = middle
        else:
            low = middle
    return high


def measured_stop(
    model: nn.Module,
    order: Sequence[Hashable],
    probe: ProbeSet,
    target: float,
    *,
    utility: ProbeSet | None = None,
    budget: float | None = None,
    adapter_name: str | None = None,
    granularity: str = "component",
    start_loss: float | None = None,
    progress: bool = False,
) -> tuple[Selection, RepairTrace]:
    """The shortest prefix of ``order`` that brings the probe's refusal loss to ``target``, measured.

    Args:
        model: the trained PEFT model (left as it was).
        order: units best first, e.g. :func:`~splora_callback.selection.budget_order` of its scores.
        probe: the safety probe (its mean refusal loss, nats, is what is measured).
        target: refusal loss to reach, usually the aligned model's
            (:func:`~splora_callback.safety.aligned_refusal_loss`).
        utility: the utility probe; with ``budget``, the prefix is shortened to the longest one
            whose measured task loss is at most ``(1 + budget)`` x the task loss before repair.
        budget: share of the task loss the repair may cost (0.05 = 5 %).
        granularity: of the returned selection (``"component"``: ``{layer: [indices]}``).
        start_loss: the refusal loss with nothing removed when it is already known (the scores'
            ``losses["refusal"]``, the same probe on the same weights): one pass fewer.
        progress: a tqdm bar of the forward passes done / planned (the bisection's ``log2``
            count; a budget adds its own), for the minute or more a real model takes.

    Returns:
        The selection and a :class:`RepairTrace`. Refusal loss is assumed to fall as the prefix
        grows (bisection); the trace lists every measurement, so a non-monotone case shows.

    Raises:
        ValueError: ``budget`` without ``utility``, or a budget / target that is not a finite number >= 0.
    """
    if not math.isfinite(target):
        raise ValueError(f"measured_stop: target={target!r} must be a finite refusal loss (nats).")
    if budget is not None and (utility is None or not math.isfinite(budget) or budget < 0):
        raise ValueError(f"measured_stop: budget={budget!r} needs a UtilityProbe and a finite value >= 0.")
    order = list(order)
    cache: dict[tuple[str, int], float] = {}
    planned = (start_loss is None) + math.ceil(math.log2(len(order) + 1)) + (2 if budget is not None else 0)
    bar = tqdm(total=planned, desc="SPLoRA measured stop", unit="pass", disable=not progress, leave=False)

    def measure(kind: str, count: int) -> float:
        if (kind, count) not in cache:
            with masked_units(model, order[:count], adapter_name):
                cache[(kind, count)] = probe_loss(probe if kind == "refusal" else utility, model)
            trace.measurements.append({"probe": kind, "count": count, "loss": cache[(kind, count)]})
            bar.total = max(bar.total, bar.n + 1)
            bar.update()
            bar.set_postfix(units=count, loss=f"{cache[(kind, count)]:.4f}", target=f"{target:.4f}")
        return cache[(kind, count)]

    task_limit = None
    trace = RepairTrace(target=float(target), task_limit=None, available=len(order))
    if start_loss is not None:
        cache[("refusal", 0)] = float(start_loss)
        trace.measurements.append({"probe": "refusal", "count": 0, "loss": float(start_loss), "from": "scores"})
    if utility is not None and budget is not None:
        task_limit = (1.0 + budget) * measure("task", 0)
        trace.task_limit = task_limit
    if measure("refusal", 0) <= target or not order:
        chosen, reason = 0, "refusal restored"
    else:  # the whole order is measured only if no shorter prefix reaches the target
        chosen = _first_reaching(lambda k: measure("refusal", k) <= target, 0, len(order))
        reason = "refusal restored" if measure("refusal", chosen) <= target else "order exhausted"
    if task_limit is not None and chosen and measure("task", chosen) > task_limit:
        # longest prefix within the task budget: the first count past it, minus one
        chosen = _first_reaching(lambda k: measure("task", k) > task_limit, 0, chosen) - 1
        reason = "task budget"
    trace.chosen, trace.reason = chosen, reason
    bar.close()
    return as_selection(order[:chosen], granularity), trace



def repair_selection(
    model: nn.Module,
    scores: LayerScores,
    probe: ProbeSet,
    aligned_loss: float,
    restore: float,
    adapter_name: str | None = None,
    progress: bool = False,
) -> tuple[Selection, RepairTrace]:
    """``select="repair"``: units of ``scores`` (both probes', at their granularity) in
    :func:`~splora_callback.selection.budget_order`, the shortest prefix whose measured refusal loss
    closes ``restore`` of the gap between the scores' refusal loss and ``aligned_loss``.

    Raises:
        ValueError: the scores lack the refusal loss or either probe's attributions.
    """
    current = scores.losses.get("refusal")
    if current is None:
        raise ValueError("select='repair' needs the safety probe's refusal loss: score with probe=SafetyProbe(...).")
    target = restore_target(current, aligned_loss, restore)
    return measured_stop(model, budget_order(scores), probe, target, adapter_name=adapter_name,
                         granularity=scores.granularity, start_loss=current, progress=progress)


def predicted_repair(scores: LayerScores, aligned_loss: float, restore: float) -> Selection:
    """The first-order stand-in for :func:`repair_selection` (no forward pass): the shortest prefix of
    the budget order whose summed safety gains ``a`` reach ``restore`` of the refusal-loss gap.
    What the callback logs at intermediate scoring steps; the measured stop runs where it acts."""
    current = scores.losses.get("refusal")
    if current is None:
        raise ValueError("select='repair' needs the safety probe's refusal loss: score with probe=SafetyProbe(...).")
    wanted = current - restore_target(current, aligned_loss, restore)
    gains, taken, total = attributions(scores), [], 0.0
    for unit in budget_order(scores):
        if total >= wanted:
            break
        taken.append(unit)
        total += gains[unit][0]
    return as_selection(taken, scores.granularity)
