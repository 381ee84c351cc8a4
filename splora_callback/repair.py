"""Measured repair (spec 3c): remove units in a repair order until refusals are back, measured.

The budget rule (``select="budget"``) stops where the *first-order* estimate of the task-loss
increase reaches the budget; on the CPU demo that stop restored 7 of 24 refusals while a fixed
count restored all of them at the cost of the task (docs/components.md). The measured repair keeps
an order from the attributions (:func:`~splora_callback.selection.repair_order`: safety gain per
task cost, gain minus cost, or gain alone) and replaces the prediction with measurements of the
model with the prefix removed: :func:`measured_stop` takes the shortest prefix whose teacher-forced
refusal loss on the safety probe reaches a target (:func:`restore_target`), :func:`behavioural_stop`
the shortest prefix after which the model's greedy answers to the probe's own harmful prompts are
refused as often as a share of the gap to the aligned model asks, with an optional over-refusal
guard on benign requests. Both are :func:`search_removals` over :class:`Signal` s: bisection over
the prefix length (about ``log2(units)`` measurements, 10 for 960 components), guards that shorten
the prefix, and an optional trim pass that puts removed units back where refusals stay restored.

Each measurement runs the model with the units masked (:func:`masked_units`: the same factor
shapes, the removed components' weight zeroed, exactly the update that
:func:`~splora_callback.pruning.prune_components` leaves) and restores the weights after, so
nothing is changed until the caller acts on the returned selection.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
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
from .selection import Selection, as_selection, attributions, repair_order, task_cost_order
from .teacher_forced import probe_loss

__all__ = ["RepairTrace", "Signal", "behavioural_stop", "masked_units", "measured_stop", "predicted_repair",
           "rate_target", "repair_selection", "restore_target", "search_removals"]


def rate_target(current: float, aligned: float, restore: float) -> float:
    """The refusal rate (share of prompts refused) at which ``restore`` of the gap from ``current``
    (the trained LoRA's) up to ``aligned`` (the aligned model's) is closed; ``current`` when the
    trained model already refuses as much."""
    return current + restore * max(aligned - current, 0.0)


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
        measurements: every measurement in order, ``{"probe": "refusal" | "task", "count": units
            removed, "loss": nats}`` or ``{"probe": "refusal_rate" | "over_refusal", "count",
            "rate": share refused}``; one taken from the scores instead of a forward pass (the
            refusal loss with nothing removed) also has ``"from": "scores"``, a trim trial the unit
            it put back (``"returned"``).
        chosen: prefix length the stop took (before the trim). available: units in the order.
        reason: ``"refusal restored"``, ``"task budget"`` / ``"over-refusal guard"`` (shortened
            to stay within it) or ``"order exhausted"`` (every unit of the order did not reach the
            target).
        stop: ``"refusal_loss"`` (:func:`measured_stop`; ``target`` in nats) or ``"refusal_rate"``
            (:func:`behavioural_stop`; ``target`` a share of the probe's prompts).
        over_refusal_limit: the largest benign refusal rate allowed, or None without the guard.
        aligned: the aligned model's references measured for the stop (``refusal_rate``, ``over_refusal``).
        returned: units the trim pass put back (removed by the stop, kept after all).
        final: each measured signal's value on the returned removal (``{"refusal": nats}`` or
            ``{"refusal_rate": share, "over_refusal": share}``): the acted model's, as masking is pruning.
    """

    target: float
    task_limit: float | None
    available: int
    measurements: list[dict[str, Any]] = field(default_factory=list)
    chosen: int = 0
    reason: str = ""
    stop: str = "refusal_loss"
    over_refusal_limit: float | None = None
    aligned: dict[str, float] = field(default_factory=dict)
    returned: list[Any] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)

    @property
    def passes(self) -> int:
        """Passes over a probe (forward passes, or generations for a rate) the search ran, the
        aligned model's references (``aligned``) not counted."""
        return sum(measured.get("from") != "scores" for measured in self.measurements)

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


def _first_reaching(count_ok: Callable[[int], bool], low: int, high: int) -> int:
    """Smallest ``k`` in (low, high] with ``count_ok(k)``, given not ``count_ok(low)``; ``high`` when no
    smaller ``k`` passes (``count_ok(high)`` itself is never called)."""
    while high - low > 1:
        middle = (low + high) // 2
        if count_ok(middle):
            high = middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class Signal:
    """A quantity measured on the model with units removed, and the side of ``limit`` it must be on.

    Attributes:
        name: what it is, as the trace records it: ``"refusal"`` / ``"task"`` (teacher-forced
            losses on the safety / utility probe, nats) or ``"refusal_rate"`` / ``"over_refusal"``
            (shares of the probe's harmful / benign prompts refused, greedy answers).
        measure: ``model -> value``, on the model as it is (masked by the search).
        limit: the value to reach (a stop) or not to cross (a guard).
        at_least: True: met when ``value >= limit`` (a rate to reach); False: when ``value <= limit``.
        reason: the trace's ``reason`` when this guard shortens the prefix.
    """

    name: str
    measure: Callable[[nn.Module], float]
    limit: float
    at_least: bool = False
    reason: str = ""

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit

    @property
    def unit(self) -> str:
        """The trace's key for this signal's values: ``"loss"`` (nats) or ``"rate"`` (share)."""
        return "rate" if self.name in ("refusal_rate", "over_refusal") else "loss"


def search_removals(
    model: nn.Module,
    order: Sequence[Hashable],
    stop: Signal,
    guards: Sequence[Signal] = (),
    *,
    trim: int = 0,
    trim_order: Sequence[Hashable] | None = None,
    adapter_name: str | None = None,
    known: dict[str, float] | None = None,
    known_from: str = "scores",
    trace: RepairTrace,
    progress: bool = False,
) -> list[Hashable]:
    """The units to remove: the shortest prefix of ``order`` that meets ``stop``, shortened to the
    longest one that meets every guard, then trimmed.

    Bisection over the prefix length (``stop`` is assumed to become met as the prefix grows, each
    guard to stay met up to some length): about ``log2(len(order))`` measurements of ``stop``, as
    many per guard that fails at the stop. The trim pass then tries to put back the first ``trim``
    units of ``trim_order`` that were removed (usually the most costly for the task first), one at
    a time, and keeps each one back whose return still meets ``stop`` and every guard.

    Args:
        known: a signal's value with nothing removed when it is already known (``{"refusal": loss}``),
            recorded with ``"from": known_from``.
        trace: filled in place (measurements, chosen prefix, returned units, reason).

    Returns:
        The removed units, in ``order``'s order.
    """
    order = list(order)
    cache: dict[tuple[str, frozenset], float] = {}
    planned = math.ceil(math.log2(len(order) + 1)) + 1 + len(guards) + min(trim, len(order))
    bar = tqdm(total=planned, desc="SPLoRA measured stop", unit="pass", disable=not progress, leave=False)

    def value(signal: Signal, units: Sequence[Hashable], returned: Hashable | None = None) -> float:
        key = (signal.name, frozenset(units))
        if key not in cache:
            entry: dict[str, Any] = {"probe": signal.name, "count": len(units)}
            if not units and known and signal.name in known:
                cache[key] = float(known[signal.name])
                entry["from"] = known_from
            else:
                with masked_units(model, units, adapter_name):
                    cache[key] = float(signal.measure(model))
                bar.total = max(bar.total, bar.n + 1)
                bar.update()
                bar.set_postfix(units=len(units), value=f"{cache[key]:.4f}", limit=f"{signal.limit:.4f}")
            if returned is not None:
                entry["returned"] = list(returned) if isinstance(returned, tuple) else returned
            entry[signal.unit] = cache[key]
            trace.measurements.append(entry)
        return cache[key]

    try:
        if stop.met(value(stop, [])) or not order:
            chosen, reason = 0, "refusal restored"
        else:  # the whole order is measured only if no shorter prefix meets the stop
            chosen = _first_reaching(lambda k: stop.met(value(stop, order[:k])), 0, len(order))
            reason = "refusal restored" if stop.met(value(stop, order[:chosen])) else "order exhausted"
        for guard in guards:
            if chosen and not guard.met(value(guard, order[:chosen])):
                # the longest prefix the guard allows: the first count past it, minus one
                chosen = _first_reaching(lambda k, g=guard: not g.met(value(g, order[:k])), 0, chosen) - 1
                reason = guard.reason
        removed = order[:chosen]
        if trim and reason == "refusal restored" and removed:
            taken = set(removed)
            for unit in [unit for unit in (trim_order or removed) if unit in taken][:trim]:
                kept_out = [other for other in removed if other != unit]
                if all(signal.met(value(signal, kept_out, unit)) for signal in (stop, *guards)):
                    removed = kept_out
                    trace.returned.append(list(unit) if isinstance(unit, tuple) else unit)
        trace.chosen, trace.reason = chosen, reason
        trace.final = {name: cache[(name, frozenset(removed))] for name in (stop.name, *(g.name for g in guards))
                       if (name, frozenset(removed)) in cache}
        return removed
    finally:
        bar.close()


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
    trim: int = 0,
    trim_order: Sequence[Hashable] | None = None,
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
        trim, trim_order: put-back trials after the stop (:func:`search_removals`).
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
    trace = RepairTrace(target=float(target), task_limit=None, available=len(order))
    stop = Signal("refusal", lambda m: probe_loss(probe, m), float(target))
    guards = []
    if utility is not None and budget is not None:
        task_loss = probe_loss(utility, model)
        trace.measurements.append({"probe": "task", "count": 0, "loss": task_loss})
        trace.task_limit = (1.0 + budget) * task_loss
        guards.append(Signal("task", lambda m: probe_loss(utility, m), trace.task_limit, reason="task budget"))
    known = {} if start_loss is None else {"refusal": float(start_loss)}
    removed = search_removals(model, order, stop, guards, trim=trim, trim_order=trim_order, adapter_name=adapter_name,
                              known=known, trace=trace, progress=progress)
    return as_selection(removed, granularity), trace


def behavioural_stop(
    model: nn.Module,
    order: Sequence[Hashable],
    tokenizer: Any,
    harmful_prompts: Sequence[str],
    restore: float,
    *,
    benign_prompts: Sequence[str] | None = None,
    over_refusal_margin: float | None = None,
    trim: int = 0,
    trim_order: Sequence[Hashable] | None = None,
    max_new_tokens: int = 8,
    adapter_name: str | None = None,
    granularity: str = "component",
    progress: bool = False,
    measure_rate: Callable[[nn.Module, Sequence[str]], float] | None = None,
) -> tuple[Selection, RepairTrace]:
    """The shortest prefix of ``order`` after which the model refuses the probe's harmful prompts
    again: greedy answers judged by refusal keywords (the evaluation's generation and judge).

    The target rate closes ``restore`` of the gap between the trained model's refusal rate on
    ``harmful_prompts`` and the aligned model's (adapters disabled): ``lora + restore (aligned -
    lora)``. With ``benign_prompts`` and ``over_refusal_margin``, a prefix whose refusal rate on
    the benign prompts exceeds the aligned model's + the margin is not taken (the prefix is
    shortened). ``trim``: put-back trials after the stop (see :func:`search_removals`).
    Each measurement generates ``max_new_tokens`` for every prompt (one batch per prompt set);
    ``measure_rate(model, prompts) -> share refused`` replaces that measurement (another judge).

    Raises:
        ValueError: no harmful prompts, ``restore`` outside (0, 1], or a margin without benign prompts.
    """
    from .safety import adapters_disabled, refusal_rate_now

    if not harmful_prompts:
        raise ValueError("behavioural_stop needs the safety probe's harmful prompts (SafetyProbe.prompts).")
    if not 0 < restore <= 1:
        raise ValueError(f"behavioural_stop: restore={restore!r} must be in (0, 1].")
    if over_refusal_margin is not None and not benign_prompts:
        raise ValueError("behavioural_stop: over_refusal_margin needs benign_prompts (benign requests never used "
                         "in alignment or evaluation).")

    def rate(prompts: Sequence[str]) -> Callable[[nn.Module], float]:
        if measure_rate is not None:
            return lambda m: measure_rate(m, prompts)
        return lambda m: refusal_rate_now(m, tokenizer, prompts, max_new_tokens, batch_size=len(prompts))

    with adapters_disabled(model):
        aligned_rate = rate(harmful_prompts)(model)
        aligned_benign = rate(benign_prompts)(model) if over_refusal_margin is not None else None
    start_rate = rate(harmful_prompts)(model)
    target = rate_target(start_rate, aligned_rate, restore)
    trace = RepairTrace(target=target, task_limit=None, available=len(order), stop="refusal_rate",
                        aligned={"refusal_rate": aligned_rate})
    guards = []
    if aligned_benign is not None:
        trace.aligned["over_refusal"] = aligned_benign
        trace.over_refusal_limit = aligned_benign + over_refusal_margin
        guards.append(Signal("over_refusal", rate(benign_prompts), trace.over_refusal_limit, reason="over-refusal guard"))
    stop = Signal("refusal_rate", rate(harmful_prompts), target - 1e-9, at_least=True)
    removed = search_removals(model, order, stop, guards, trim=trim, trim_order=trim_order, adapter_name=adapter_name,
                              known={"refusal_rate": start_rate}, known_from="before the search", trace=trace,
                              progress=progress)
    return as_selection(removed, granularity), trace


def repair_selection(
    model: nn.Module,
    scores: LayerScores,
    probe: ProbeSet,
    aligned_loss: float | None,
    restore: float,
    adapter_name: str | None = None,
    progress: bool = False,
    *,
    stop: str = "refusal_loss",
    order: str = "ratio",
    utility_weight: float = 1.0,
    trim: int = 0,
    tokenizer: Any = None,
    benign_prompts: Sequence[str] | None = None,
    over_refusal_margin: float | None = None,
    max_new_tokens: int = 8,
) -> tuple[Selection, RepairTrace]:
    """``select="repair"``: units of ``scores`` (both probes', at their granularity) in ``order``
    (:func:`~splora_callback.selection.repair_order`), the shortest prefix that meets the stop:

    - ``stop="refusal_loss"``: the measured refusal loss closes ``restore`` of the gap between the
      scores' refusal loss and ``aligned_loss`` (:func:`measured_stop`);
    - ``stop="refusal_rate"``: the greedy refusal rate on the probe's own harmful prompts closes
      ``restore`` of the gap to the aligned model's (:func:`behavioural_stop`; needs ``tokenizer``),
      with the over-refusal guard when ``benign_prompts`` and ``over_refusal_margin`` are given.

    ``trim`` put-back trials follow, the costliest units for the task first.

    Raises:
        ValueError: the scores lack the refusal loss or either probe's attributions; a rate stop
            without a tokenizer or without the probe's prompts; an unknown stop or order.
    """
    current = scores.losses.get("refusal")
    if current is None:
        raise ValueError("select='repair' needs the safety probe's refusal loss: score with probe=SafetyProbe(...).")
    ordered = repair_order(scores, order, utility_weight)
    trim_order = task_cost_order(scores, ordered) if trim else None
    if stop == "refusal_loss":
        target = restore_target(current, aligned_loss, restore)
        return measured_stop(model, ordered, probe, target, adapter_name=adapter_name, granularity=scores.granularity,
                             start_loss=current, trim=trim, trim_order=trim_order, progress=progress)
    if stop != "refusal_rate":
        raise ValueError(f"select='repair': stop={stop!r}; expected 'refusal_loss' or 'refusal_rate'.")
    if tokenizer is None:
        raise ValueError("select='repair' with stop='refusal_rate' generates answers: pass the tokenizer "
                         "(Trainer(processing_class=tokenizer); splora prune loads it).")
    if not probe.prompts:
        raise ValueError("select='repair' with stop='refusal_rate' answers the safety probe's harmful prompts: build "
                         "the probe with SafetyProbe.from_pairs(tokenizer, pairs) so it keeps them.")
    return behavioural_stop(model, ordered, tokenizer, probe.prompts, restore, benign_prompts=benign_prompts,
                            over_refusal_margin=over_refusal_margin, trim=trim, trim_order=trim_order,
                            max_new_tokens=max_new_tokens, adapter_name=adapter_name,
                            granularity=scores.granularity, progress=progress)


def predicted_repair(scores: LayerScores, aligned_loss: float, restore: float, order: str = "ratio",
                     utility_weight: float = 1.0) -> Selection:
    """The first-order stand-in for :func:`repair_selection` (no forward pass): the shortest prefix of
    ``order`` whose summed safety gains ``a`` reach ``restore`` of the refusal-loss gap.
    What the callback logs at intermediate scoring steps; the measured stop runs where it acts."""
    current = scores.losses.get("refusal")
    if current is None:
        raise ValueError("select='repair' needs the safety probe's refusal loss: score with probe=SafetyProbe(...).")
    wanted = current - restore_target(current, aligned_loss, restore)
    gains, taken, total = attributions(scores), [], 0.0
    for unit in repair_order(scores, order, utility_weight):
        if total >= wanted:
            break
        taken.append(unit)
        total += gains[unit][0]
    return as_selection(taken, scores.granularity)
