"""Choose the layers to act on, deterministically (ties broken by name: every rank agrees).

Also the baselines every comparison of selection rules needs (spec 7): a uniformly random choice,
and a random choice with the same number of layers of each module kind as a given selection.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from typing import Literal

from .scoring import LayerScores

logger = logging.getLogger(__name__)

Select = Literal["top_k", "fraction", "threshold"]


def rank_layers(scores: LayerScores) -> list[str]:
    """Eligible layers, most suspect first; equal suspicion in name order."""
    suspicion = scores.suspicion()
    return sorted(suspicion, key=lambda name: (-suspicion[name], name))


def select_layers(
    scores: LayerScores,
    select: Select = "top_k",
    *,
    k: int | None = None,
    fraction: float | None = None,
    threshold: float | None = None,
) -> list[str]:
    """The layers to act on, most suspect first. Inactive and unjudgeable layers are never chosen.

    Args:
        select: ``"top_k"``: exactly the ``k`` most suspect (fewer only if fewer are eligible);
            ``"fraction"``: ``round(fraction * eligible)`` most suspect; ``"threshold"``: every
            layer past ``threshold`` (E-DIEM > tau, cosine < tau, probe > tau, signed < tau).

    Raises:
        ValueError: unknown ``select``, or its parameter missing / out of range.
    """
    ranked = rank_layers(scores)
    if select == "top_k":
        if k is None or k < 0:
            raise ValueError(f"select='top_k' needs k >= 0, got k={k!r}.")
        if k > len(ranked):
            logger.warning("k=%d but only %d layers are eligible: selecting all of them.", k, len(ranked))
        return ranked[:k]
    if select == "fraction":
        if fraction is None or not 0 <= fraction <= 1:
            raise ValueError(f"select='fraction' needs 0 <= fraction <= 1, got fraction={fraction!r}.")
        return ranked[: math.floor(fraction * len(ranked) + 0.5)]
    if select == "threshold":
        if threshold is None or not math.isfinite(threshold):
            raise ValueError(f"select='threshold' needs a finite threshold, got threshold={threshold!r}.")
        # suspicion negates cosine and signed, so "past the threshold" is one comparison
        limit = -threshold if scores.metric in ("cosine", "signed") else threshold
        suspicion = scores.suspicion()
        return [name for name in ranked if suspicion[name] > limit]
    raise ValueError(f"select={select!r}; expected one of 'top_k', 'fraction', 'threshold'.")


def random_layers(scores: LayerScores, count: int, seed: int) -> list[str]:
    """``count`` eligible layers drawn uniformly without replacement (local RNG, seeded)."""
    eligible = sorted(scores.suspicion())
    if count > len(eligible):
        raise ValueError(f"Cannot draw {count} layers: only {len(eligible)} are eligible.")
    return random.Random(seed).sample(eligible, count)


def random_matched(chosen: list[str], scores: LayerScores, seed: int) -> list[str]:
    """A random selection with the same number of layers of each module kind as ``chosen``.

    The control spec 7 requires: a rule beats chance only if it beats this, since which module
    kinds are pruned can matter more than which layers. Seeded, no repeats, local RNG.

    Raises:
        ValueError: a layer of ``chosen`` is not eligible in ``scores``.
    """
    eligible = sorted(scores.suspicion())
    kinds = {name: scores[name].kind for name in eligible}
    unknown = [name for name in chosen if name not in kinds]
    if unknown:
        raise ValueError(f"random_matched: {unknown[:3]} are not eligible layers of these scores.")
    rng = random.Random(seed)
    control = []
    for kind, count in sorted(Counter(kinds[name] for name in chosen).items()):
        pool = [name for name in eligible if kinds[name] == kind]
        control.extend(rng.sample(pool, count))
    return control
