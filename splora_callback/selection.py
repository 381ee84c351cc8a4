"""Choose the layers (or rank-one components) to act on, deterministically: ties are broken by
name and component index, so every rank agrees.

A selection is a list of module names at ``granularity="layer"`` and a dict
``{module name: [component indices]}`` at ``granularity="component"`` (spec 3c; indices in the
update's SVD order, as :mod:`~splora_callback.components` computes it).

Also the baselines every comparison of selection rules needs (spec 7): a uniformly random choice,
and a random choice with the same number of layers (components) of each module kind as a given
selection.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

from .scoring import LayerScores, eligible_components

logger = logging.getLogger(__name__)

Select = Literal["top_k", "fraction", "threshold", "budget"]
Selection = list[str] | dict[str, list[int]]


def as_selection(units: Sequence[Hashable], granularity: str) -> Selection:
    """Units in selection order -> the selection's type: a list of names, or names -> indices
    (layers in order of their first selected component, indices ascending)."""
    if granularity == "layer":
        return list(units)
    chosen: dict[str, list[int]] = {}
    for name, index in units:
        chosen.setdefault(name, []).append(index)
    return {name: sorted(indices) for name, indices in chosen.items()}


def selection_units(chosen: Selection) -> list[Hashable]:
    """The selected units: module names, or ``(name, index)`` components."""
    if isinstance(chosen, Mapping):
        return [(name, index) for name, indices in chosen.items() for index in indices]
    if isinstance(chosen, str):
        raise TypeError(f"A selection is a list of module names, got the string {chosen!r}: pass [{chosen!r}].")
    return list(chosen)


def selection_size(chosen: Selection) -> int:
    """Number of selected layers, or of selected components."""
    return len(selection_units(chosen))


def _suspicion(scores: LayerScores) -> dict[Hashable, float]:
    return scores.component_suspicion() if scores.granularity == "component" else scores.suspicion()


def _unit_kind(scores: LayerScores, unit: Hashable) -> str:
    return scores[unit[0] if isinstance(unit, tuple) else unit].kind


def rank_layers(scores: LayerScores) -> list[Hashable]:
    """Eligible layers (components), most suspect first; equal suspicion in name (index) order."""
    suspicion = _suspicion(scores)
    return sorted(suspicion, key=lambda unit: (-suspicion[unit], unit))


def select_layers(
    scores: LayerScores,
    select: Select = "top_k",
    *,
    k: int | None = None,
    fraction: float | None = None,
    threshold: float | None = None,
    budget: float | None = None,
) -> Selection:
    """The layers (components) to act on, most suspect first. Inactive and unjudgeable layers, and
    components without an update, are never chosen. ``scores.granularity`` says which.

    Args:
        select: ``"top_k"``: exactly the ``k`` most suspect (fewer only if fewer are eligible);
            ``"fraction"``: ``round(fraction * eligible)`` most suspect; ``"threshold"``: every
            unit past ``threshold`` (E-DIEM > tau, cosine < tau, probe > tau, signed < tau);
            ``"budget"``: :func:`budget_order` until the predicted task-loss increase would pass
            ``budget`` x the task loss, or ``k`` / ``fraction`` units are taken, if given (needs
            both probes' scores).

    Returns:
        Module names (``granularity="layer"``) or ``{name: [component indices]}``.

    Raises:
        ValueError: unknown ``select``, or its parameter missing / out of range.
    """
    if select == "budget":
        return _select_budget(scores, budget, k=k, fraction=fraction)
    ranked = rank_layers(scores)
    if select == "top_k":
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"select='top_k' needs k >= 0 (an integer), got k={k!r}.")
        if k > len(ranked):
            logger.warning("k=%d but only %d %ss are eligible: selecting all of them.", k, len(ranked), scores.granularity)
        return as_selection(ranked[:k], scores.granularity)
    if select == "fraction":
        if fraction is None or not 0 <= fraction <= 1:
            raise ValueError(f"select='fraction' needs 0 <= fraction <= 1, got fraction={fraction!r}.")
        return as_selection(ranked[: math.floor(fraction * len(ranked) + 0.5)], scores.granularity)
    if select == "threshold":
        if threshold is None or not math.isfinite(threshold):
            raise ValueError(f"select='threshold' needs a finite threshold, got threshold={threshold!r}.")
        # suspicion negates cosine and signed, so "past the threshold" is one comparison
        limit = -threshold if scores.metric in ("cosine", "signed") else threshold
        suspicion = _suspicion(scores)
        return as_selection([unit for unit in ranked if suspicion[unit] > limit], scores.granularity)
    raise ValueError(f"select={select!r}; expected one of 'top_k', 'fraction', 'threshold', 'budget'.")


def attributions(scores: LayerScores) -> dict[Hashable, tuple[float, float]]:
    """Eligible unit -> (safety gain ``a``, utility cost ``t``): first-order decrease of the refusal
    loss and increase of the task loss if the unit's update is removed (spec 3c).

    Raises:
        ValueError: the scores lack the safety or the utility probe's attributions.
    """
    pairs: dict[Hashable, tuple[float, float]] = {}
    for score in scores:
        if score.status != "active":
            continue
        if scores.granularity == "component":
            fields = score.components or {}
            if "probe" not in fields or "utility" not in fields:
                raise ValueError(f"{score.name}: select='budget' needs component scores of both probes "
                                 "(score_layers(..., probe=SafetyProbe, utility=UtilityProbe)).")
            for index in eligible_components(score):
                pairs[(score.name, index)] = (fields["probe"][index], fields["utility"][index])
        elif score.probe is None or score.utility is None:
            raise ValueError(f"{score.name}: select='budget' needs both probes' scores "
                             "(score_layers(..., probe=SafetyProbe, utility=UtilityProbe)).")
        else:
            pairs[score.name] = (score.probe, score.utility)
    return pairs


def budget_order(scores: LayerScores) -> list[Hashable]:
    """Units whose removal lowers the refusal loss (``a > 0``), best trade first: those that cost
    no task loss (``t <= 0``) by ``a`` descending, then the rest by ``a / t`` descending; ties by
    name and index (spec 3c)."""
    pairs = attributions(scores)
    free = sorted((u for u, (a, t) in pairs.items() if a > 0 and t <= 0), key=lambda u: (-pairs[u][0], u))
    costly = sorted((u for u, (a, t) in pairs.items() if a > 0 and t > 0),
                    key=lambda u: (-pairs[u][0] / pairs[u][1], u))
    return free + costly


def difference_order(scores: LayerScores, utility_weight: float = 1.0) -> list[Hashable]:
    """Units whose removal lowers the refusal loss (``a > 0``) by ``a - utility_weight x t``
    descending (safety gain minus the weighted task cost, both nats on their probes); ties by name
    and index. ``utility_weight=0``: by safety gain alone."""
    pairs = attributions(scores)
    return sorted((u for u, (a, _) in pairs.items() if a > 0),
                  key=lambda u: (-(pairs[u][0] - utility_weight * pairs[u][1]), u))


REPAIR_ORDERS = ("ratio", "difference", "safety")


def repair_order(scores: LayerScores, order: str = "ratio", utility_weight: float = 1.0) -> list[Hashable]:
    """The order a repair removes units in: ``"ratio"`` (:func:`budget_order`: gain per task cost),
    ``"difference"`` (:func:`difference_order`: gain minus ``utility_weight`` x cost) or
    ``"safety"`` (gain alone).

    Raises:
        ValueError: another order.
    """
    if order == "ratio":
        return budget_order(scores)
    if order == "difference":
        return difference_order(scores, utility_weight)
    if order == "safety":
        return difference_order(scores, 0.0)
    raise ValueError(f"order={order!r}: expected one of {', '.join(REPAIR_ORDERS)}.")


def task_cost_order(scores: LayerScores, units: Sequence[Hashable]) -> list[Hashable]:
    """``units`` by their task cost ``t`` descending (the trim pass tries the costliest first)."""
    pairs = attributions(scores)
    return sorted(units, key=lambda u: (-pairs[u][1], u))


def _select_budget(scores: LayerScores, budget: float | None, *, k: int | None, fraction: float | None) -> Selection:
    if budget is None or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"select='budget' needs a finite budget >= 0 (a share of the task loss), got budget={budget!r}.")
    task_loss = scores.losses.get("task")
    if task_loss is None:
        raise ValueError("select='budget' needs the task loss: score with utility=UtilityProbe(...).")
    order, pairs = budget_order(scores), attributions(scores)
    cap = len(order)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"select='budget' caps at an integer k >= 0, got k={k!r}.")
        cap = min(cap, k)
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"select='budget' caps at 0 <= fraction <= 1, got fraction={fraction!r}.")
        cap = min(cap, math.floor(fraction * len(pairs) + 0.5))
    taken, cost, limit = [], 0.0, budget * task_loss
    for unit in order[:cap]:
        if cost + pairs[unit][1] > limit:
            break
        taken.append(unit)
        cost += pairs[unit][1]
    return as_selection(taken, scores.granularity)


def random_layers(scores: LayerScores, count: int, seed: int) -> Selection:
    """``count`` eligible layers (components) drawn uniformly without replacement (local RNG, seeded)."""
    eligible = sorted(_suspicion(scores))
    if count > len(eligible):
        raise ValueError(f"Cannot draw {count} {scores.granularity}s: only {len(eligible)} are eligible.")
    return as_selection(random.Random(seed).sample(eligible, count), scores.granularity)


def random_matched(chosen: Selection, scores: LayerScores, seed: int) -> Selection:
    """A random selection with the same number of layers (components) of each module kind as
    ``chosen``, at ``chosen``'s granularity.

    The control spec 7 requires: a rule beats chance only if it beats this, since which module
    kinds are pruned can matter more than which layers. Seeded, no repeats, local RNG.

    Raises:
        ValueError: a unit of ``chosen`` is not eligible in ``scores``.
    """
    granularity = "component" if isinstance(chosen, Mapping) else "layer"
    if granularity != scores.granularity:
        scores = scores.with_granularity(granularity)
    units = selection_units(chosen)
    eligible = sorted(_suspicion(scores))
    kinds = {unit: _unit_kind(scores, unit) for unit in eligible}
    unknown = [unit for unit in units if unit not in kinds]
    if unknown:
        raise ValueError(f"random_matched: {unknown[:3]} are not eligible {granularity}s of these scores.")
    rng = random.Random(seed)
    control = []
    for kind, count in sorted(Counter(kinds[unit] for unit in units).items()):
        pool = [unit for unit in eligible if kinds[unit] == kind]
        control.extend(rng.sample(pool, count))
    return as_selection(control, granularity)


def removed_ranks(scores: LayerScores, chosen: Selection) -> dict[str, int]:
    """Module name -> how many ranks the selection removes there (its whole rank for a layer)."""
    if isinstance(chosen, Mapping):
        return {name: len(indices) for name, indices in chosen.items()}
    return {name: scores[name].rank for name in selection_units(chosen)}


def predicted_change(scores: LayerScores, chosen: Selection) -> dict[str, Any]:
    """What removing ``chosen`` should do, to first order (spec 3b, 3c), for reports.

    Returns:
        ``refusal_loss`` / ``task_loss`` (the probes' losses before, nats, when run),
        ``predicted_refusal_loss_change`` (``-sum a``) and ``predicted_task_loss_change``
        (``sum t``) where the attributions exist, and ``kept_rank``: module -> rank left.
    """
    component = isinstance(chosen, Mapping)
    gains, costs = [], []
    for unit in selection_units(chosen):
        score = scores[unit[0]] if component else scores[unit]
        fields = score.components or {}
        gain = fields.get("probe", [None] * (unit[1] + 1))[unit[1]] if component else score.probe
        cost = fields.get("utility", [None] * (unit[1] + 1))[unit[1]] if component else score.utility
        gains.append(gain)
        costs.append(cost)
    change: dict[str, Any] = {f"{key}_loss": value for key, value in scores.losses.items()}
    if gains and all(value is not None for value in gains):
        change["predicted_refusal_loss_change"] = -float(sum(gains))
    if costs and all(value is not None for value in costs):
        change["predicted_task_loss_change"] = float(sum(costs))
    change["kept_rank"] = {name: scores[name].rank - count for name, count in removed_ranks(scores, chosen).items()}
    return change
