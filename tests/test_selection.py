"""Selection rules and the random baselines: exact counts, deterministic ties, per-kind matching."""

from collections import Counter

import pytest

from splora_callback import LayerScore, LayerScores, random_layers, random_matched, select_layers


def make_scores(values: dict[str, float], metric: str = "ediem", inactive=()) -> LayerScores:
    scores = LayerScores(metric, "layers")
    for name, value in values.items():
        score = LayerScore(name, name.rsplit(".", 1)[-1], (8, 8), 2, "active", 1.0)
        score.ediem, score.cosine, score.probe, score.signed_alignment = value, -value, value, -value
        scores.layers[name] = score
    for name in inactive:
        scores.layers[name] = LayerScore(name, name.rsplit(".", 1)[-1], (8, 8), 2, "inactive", 0.0)
    return scores


VALUES = {"l0.q_proj": 0.5, "l0.v_proj": 2.0, "l1.q_proj": 2.0, "l1.v_proj": -1.0, "l2.q_proj": 3.0}


def test_top_k_is_exactly_k_most_suspect_with_ties_by_name():
    scores = make_scores(VALUES, inactive=["l9.q_proj"])
    assert select_layers(scores, "top_k", k=3) == ["l2.q_proj", "l0.v_proj", "l1.q_proj"]
    assert select_layers(scores, "top_k", k=0) == []
    assert len(select_layers(scores, "top_k", k=10)) == 5  # never the inactive layer


@pytest.mark.parametrize("metric", ["ediem", "cosine", "probe", "signed"])
def test_every_metric_selects_the_same_most_suspect(metric):
    # cosine and signed are stored negated above, so the most suspect layer is the same
    assert select_layers(make_scores(VALUES, metric), "top_k", k=1) == ["l2.q_proj"]


def test_fraction_rounds_half_up_over_eligible_layers():
    scores = make_scores(VALUES, inactive=["l9.q_proj"])
    assert select_layers(scores, "fraction", fraction=0.5) == ["l2.q_proj", "l0.v_proj", "l1.q_proj"]
    assert select_layers(scores, "fraction", fraction=0.0) == []
    assert len(select_layers(scores, "fraction", fraction=1.0)) == 5


def test_threshold_direction_per_metric():
    assert select_layers(make_scores(VALUES, "ediem"), "threshold", threshold=1.5) == ["l2.q_proj", "l0.v_proj", "l1.q_proj"]
    # cosine < tau: stored cosines are -VALUES, so cos < -1.5 picks the same layers
    assert select_layers(make_scores(VALUES, "cosine"), "threshold", threshold=-1.5) == ["l2.q_proj", "l0.v_proj", "l1.q_proj"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"select": "top_k"}, "needs k >= 0"),
        ({"select": "fraction", "fraction": 1.5}, "0 <= fraction <= 1"),
        ({"select": "threshold"}, "finite threshold"),
        ({"select": "best"}, "expected one of 'top_k'"),
    ],
)
def test_selection_errors_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_layers(make_scores(VALUES), **kwargs)


def test_random_matched_keeps_kind_counts_is_seeded_and_never_repeats():
    values = {f"l{i}.{kind}": float(i) for i in range(10) for kind in ("q_proj", "k_proj", "v_proj", "o_proj")}
    scores = make_scores(values)
    chosen = ["l9.o_proj", "l8.o_proj", "l7.o_proj", "l9.v_proj", "l1.q_proj"]
    control = random_matched(chosen, scores, seed=0)
    assert Counter(name.split(".")[1] for name in control) == Counter(name.split(".")[1] for name in chosen)
    assert len(set(control)) == len(control) == len(chosen)
    assert control == random_matched(chosen, scores, seed=0)
    assert any(random_matched(chosen, scores, seed=s) != control for s in range(1, 5))
    with pytest.raises(ValueError, match="not eligible"):
        random_matched(["l0.up_proj"], scores, seed=0)


def test_random_layers_seeded_without_repeats():
    scores = make_scores(VALUES)
    draw = random_layers(scores, 3, seed=1)
    assert draw == random_layers(scores, 3, seed=1) and len(set(draw)) == 3
    with pytest.raises(ValueError, match="only 5 are eligible"):
        random_layers(scores, 6, seed=1)
