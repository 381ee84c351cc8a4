"""Every low-rank formula of metrics.py against the dense float64 form of the spec."""

import math

import pytest
import torch
from reference import dense_geometry, dense_robust_zscore

from splora_callback.metrics import (
    ediem_shape_peers,
    frobenius_norm,
    layer_geometry,
    permutation_distances,
    robust_zscore,
    safe_lora_projection,
    spectral_norm,
    update_norm,
)

RELATIVE_TOLERANCE = 1e-6
SHAPES = [(64, 64), (32, 64), (96, 32), (40, 72)]  # square, GQA k_proj, Conv1D c_attn, odd
RANKS = [1, 4, 8]


def random_case(m: int, n: int, r: int, seed: int, dtype=torch.float64, alignment_rank: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    if alignment_rank is None:
        direction = torch.randn(m, n, generator=generator, dtype=dtype)
    else:  # low rank, as alignment deltas often are
        direction = torch.randn(m, alignment_rank, generator=generator, dtype=dtype) @ torch.randn(
            alignment_rank, n, generator=generator, dtype=dtype
        )
    lora_a = torch.randn(r, n, generator=generator, dtype=dtype)
    lora_b = torch.randn(m, r, generator=generator, dtype=dtype)
    return direction, lora_a, lora_b


def fast_geometry(direction, lora_a, lora_b, scaling):
    return layer_geometry(
        direction, lora_a, lora_b, scaling,
        alignment_spectral_norm=spectral_norm(direction),
        alignment_frobenius_norm=frobenius_norm(direction),
    )


def assert_close(actual: float, expected: float, tolerance: float = RELATIVE_TOLERANCE) -> None:
    assert abs(actual - expected) <= tolerance * max(abs(expected), 1e-12) + 1e-12, (actual, expected)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("scaling", [2.0, 16 / math.sqrt(8)])  # alpha/r and rsLoRA's alpha/sqrt(r)
@pytest.mark.parametrize("alignment_rank", [None, 3])
def test_layer_geometry_matches_dense(m, n, r, scaling, alignment_rank):
    direction, lora_a, lora_b = random_case(m, n, r, seed=m * 1000 + n * 10 + r, alignment_rank=alignment_rank)
    fast = fast_geometry(direction, lora_a, lora_b, scaling)
    dense = dense_geometry(direction, scaling * lora_b @ lora_a)
    for key in ("update_norm", "relative_distance", "cosine", "signed_alignment"):
        assert_close(getattr(fast, key), dense[key])
    assert 0 <= fast.relative_distance <= 1 + 1e-12


def test_fan_in_fan_out_orientation_matches_dense():
    """A Conv1D module stores W as (n, m); the update in weight orientation is still s B A."""
    direction, lora_a, lora_b = random_case(96, 32, 4, seed=7)
    stored_direction = direction.T.contiguous()  # how the checkpoint holds it
    fast = fast_geometry(stored_direction.T, lora_a, lora_b, 2.0)
    dense = dense_geometry(direction, 2.0 * lora_b @ lora_a)
    assert_close(fast.relative_distance, dense["relative_distance"])
    assert_close(fast.cosine, dense["cosine"])


def test_float32_inputs_stay_accurate_when_update_is_nearly_inside():
    """The residual form avoids the cancellation of ||P||^2 + ||dW||^2 - 2<P, dW> (spec 5)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(256, 4, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(128, 4, generator=generator, dtype=torch.float64)).Q
    direction = left @ right.T  # equal singular values: Ct is the projector onto span(left)
    inside = left @ torch.randn(4, 8, generator=generator, dtype=torch.float64)
    outside = torch.randn(256, 8, generator=generator, dtype=torch.float64)
    lora_b = inside + 1e-4 * (outside - left @ (left.T @ outside))
    lora_a = torch.randn(8, 128, generator=generator, dtype=torch.float64)
    dense = dense_geometry(direction, lora_b @ lora_a)
    fast32 = fast_geometry(direction.float(), lora_a.float(), lora_b.float(), 1.0)
    assert dense["relative_distance"] < 1e-3
    assert abs(fast32.relative_distance - dense["relative_distance"]) < 1e-3 * dense["relative_distance"] + 1e-6


def test_edge_cases_orthogonal_and_top_direction():
    generator = torch.Generator().manual_seed(3)
    left = torch.linalg.qr(torch.randn(32, 2, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(16, 2, generator=generator, dtype=torch.float64)).Q
    direction = left @ torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)) @ right.T
    lora_a = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    outside = torch.randn(32, 3, generator=generator, dtype=torch.float64)
    orthogonal = fast_geometry(direction, lora_a, outside - left @ (left.T @ outside), 1.0)
    assert orthogonal.relative_distance == pytest.approx(1.0, abs=1e-12)
    assert orthogonal.cosine == pytest.approx(0.0, abs=1e-12)  # P = 0 while dW != 0: the most suspect value (spec 4)
    along_top = fast_geometry(direction, lora_a, left[:, :1] @ torch.ones(1, 3, dtype=torch.float64), 1.0)
    assert along_top.relative_distance == pytest.approx(0.0, abs=1e-12)
    assert along_top.cosine == pytest.approx(1.0, abs=1e-12)
    against = fast_geometry(direction, right.T[:1].expand(1, 16).clone(), -left[:, :1] * 2.0, 1.0)
    assert against.signed_alignment < 0  # moves against alignment: the sign-blind scores cannot see it


@pytest.mark.parametrize("m,n", SHAPES)
def test_spectral_norm_matches_svd(m, n):
    matrix = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n), dtype=torch.float64)
    assert_close(spectral_norm(matrix), float(torch.linalg.matrix_norm(matrix, ord=2)))


def test_spectral_norm_does_not_touch_global_rng():
    state = torch.get_rng_state()
    spectral_norm(torch.randn(128, 64, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("m,n,r", [(64, 64, 4), (32, 64, 8)])
def test_update_norm_and_projection_match_dense(m, n, r):
    direction, lora_a, lora_b = random_case(m, n, r, seed=11)
    assert_close(update_norm(lora_a, lora_b, 1.5), float(torch.linalg.matrix_norm(1.5 * lora_b @ lora_a)))
    alignment_matrix = direction @ direction.T / torch.linalg.matrix_norm(direction)
    projected = safe_lora_projection(direction, lora_b, frobenius_norm(direction))
    torch.testing.assert_close(projected, alignment_matrix @ lora_b, rtol=1e-9, atol=1e-12)


def test_permutation_distances_match_dense_with_same_permutations():
    direction, lora_a, lora_b = random_case(40, 24, 4, seed=5, alignment_rank=2)
    fast = permutation_distances(
        direction, lora_a, lora_b, 2.0,
        alignment_spectral_norm=spectral_norm(direction), alignment_frobenius_norm=frobenius_norm(direction),
        permutations=16, seed=9,
    )
    generator = torch.Generator().manual_seed(9)
    dense = [
        dense_geometry(direction, 2.0 * lora_b[torch.randperm(40, generator=generator)] @ lora_a)["relative_distance"]
        for _ in range(16)
    ]
    for actual, expected in zip(fast, dense, strict=True):
        assert_close(actual, expected)
    assert len(set(round(value, 12) for value in fast)) > 1  # permutations differ


def test_robust_zscore_by_hand():
    # null [0.1, 0.2, 0.3, 0.4, 0.5]: median 0.3, Q1 0.2, Q3 0.4 (linear) -> IQR 0.2
    result = robust_zscore(0.7, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert result.scaled and result.value == pytest.approx((0.7 - 0.3) / 0.2)
    assert result.value == pytest.approx(dense_robust_zscore(0.7, [0.1, 0.2, 0.3, 0.4, 0.5]))


def test_robust_zscore_zero_iqr_reports_unscaled_centred_distance():
    result = robust_zscore(0.9, [0.5])  # a single peer: IQR = 0, no epsilon division
    assert not result.scaled
    assert result.value == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least one null distance"):
        robust_zscore(0.5, [])


def test_shape_peers_group_by_weight_shape_not_name():
    distances = {"a.q_proj": 0.1, "b.q_proj": 0.9, "a.k_proj": 0.5, "b.k_proj": 0.6, "c.o_proj": 0.2}
    shapes = {"a.q_proj": (8, 8), "b.q_proj": (8, 8), "c.o_proj": (8, 8), "a.k_proj": (4, 8), "b.k_proj": (4, 8)}
    scores = ediem_shape_peers(distances, shapes)
    square_peers = [0.1, 0.9, 0.2]
    assert scores["b.q_proj"].value == pytest.approx(dense_robust_zscore(0.9, square_peers))
    assert scores["c.o_proj"].value == pytest.approx(dense_robust_zscore(0.2, square_peers))
    assert scores["a.k_proj"].value == pytest.approx(dense_robust_zscore(0.5, [0.5, 0.6]))
