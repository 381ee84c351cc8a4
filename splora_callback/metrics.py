"""Pure math of the scores (spec sections 2, 3, 5, 7): no model, no Trainer, no W&B.

Symbols follow ``shared/spec/SPLORA_MATH.md``; for one module with update ``dW = s B A``:

- ``V`` (m, n): alignment direction ``W_aligned - W_base``;
- ``X = s B`` (m, r), so ``dW = X A``;
- Safe LoRA's ``C = V V^T / ||V||_F`` and E-DIEM's soft projector ``Ct = V V^T / ||V||_2^2``.

No (m, m) matrix is ever formed: ``C X = V (V^T X) / ||V||_F`` costs two (m, n)-by-(n, r) products,
and every Frobenius quantity is a trace of r-by-r matrices against ``A A^T``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Power iterations for ||V||_2: the block's top Ritz value converges like (sigma_{p+1}/sigma_1)^(2k).
SPECTRAL_BLOCK = 8
SPECTRAL_ITERATIONS = 30


@dataclass(frozen=True)
class LayerGeometry:
    """Geometry of one update against its alignment direction.

    Attributes:
        update_norm: ``||dW||_F``.
        relative_distance: ``d = ||Ct dW - dW||_F / ||dW||_F`` in [0, 1]; 1 = orthogonal to V.
        cosine: Safe LoRA's ``<C dW, dW>_F / (||C dW||_F ||dW||_F)``; 0 when ``C dW = 0``.
        signed_alignment: ``<dW, V>_F / (||dW||_F ||V||_F)`` in [-1, 1]; negative = moves against
            alignment (spec 7: a diagnostic, blind spots of the other two).
    """

    update_norm: float
    relative_distance: float
    cosine: float
    signed_alignment: float


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 at least (bf16/fp16 products lose the digits the distances need), fp64 if given fp64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


@torch.no_grad()
def frobenius_norm(matrix: torch.Tensor) -> float:
    """``||M||_F``, accumulated in float64."""
    return float(torch.linalg.vector_norm(matrix, dtype=torch.float64))


@torch.no_grad()
def spectral_norm(matrix: torch.Tensor, seed: int = 0) -> float:
    """``||M||_2`` (largest singular value) by block power iteration, without a full SVD.

    Uses its own ``torch.Generator``, so the caller's RNG state (training!) is untouched.
    """
    dtype = compute_dtype(matrix)
    matrix = matrix.to(dtype)
    if min(matrix.shape) <= 2 * SPECTRAL_BLOCK:
        return float(torch.linalg.matrix_norm(matrix.double(), ord=2))
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    block = torch.randn(matrix.shape[1], SPECTRAL_BLOCK, generator=generator, device=matrix.device, dtype=dtype)
    for _ in range(SPECTRAL_ITERATIONS):
        # M^T (M Q) as ((M Q)^T M)^T: same flops, but BLAS streams M row-major instead of
        # multiplying a transposed (m, n) operand by a few columns (4.6x faster at 4096x4096 here).
        block = torch.linalg.qr(((matrix @ block).T @ matrix).T).Q
    return float(torch.linalg.svdvals((matrix @ block).double())[0])


@torch.no_grad()
def update_norm(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> float:
    """``||s B A||_F = sqrt(tr((s B)^T (s B) A A^T))``, r-by-r, accumulated in float64."""
    down_gram = (lora_A @ lora_A.T).double()
    up_gram = (lora_B.T @ lora_B).double() * scaling**2
    return math.sqrt(max(float(torch.sum(up_gram * down_gram)), 0.0))


@torch.no_grad()
def layer_geometry(
    alignment_direction: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    alignment_spectral_norm: float,
    alignment_frobenius_norm: float,
) -> LayerGeometry:
    """Relative distance, Safe LoRA cosine and signed alignment of ``dW = scaling * B @ A``.

    Args:
        alignment_direction: V, (m, n).
        lora_A: (r, n). lora_B: (m, r). scaling: s.
        alignment_spectral_norm: ``||V||_2`` (> 0). alignment_frobenius_norm: ``||V||_F`` (> 0).

    The caller handles ``dW = 0`` (inactive) and ``V = 0`` (no alignment) before calling.
    """
    dtype = compute_dtype(alignment_direction, lora_A, lora_B)
    direction = alignment_direction.to(dtype)
    down = lora_A.to(device=direction.device, dtype=dtype)
    up_scaled = scaling * lora_B.to(device=direction.device, dtype=dtype)  # X = s B, (m, r)

    direction_t_up = (up_scaled.T @ direction).T  # V^T X, (n, r), as (X^T V)^T: see spectral_norm
    soft_projected_up = direction @ direction_t_up / alignment_spectral_norm**2  # Ct X, (m, r)

    # r-by-r traces in float64: the distance is a small difference when Ct dW ~ dW (spec 5).
    down_gram = (down @ down.T).double()  # A A^T
    up_gram = (up_scaled.T @ up_scaled).double()  # X^T X
    update_norm = math.sqrt(max(float(torch.sum(up_gram * down_gram)), 0.0))

    residual = (soft_projected_up - up_scaled).double()  # (Ct - I) X: no cancellation of squares
    distance = math.sqrt(max(float(torch.sum((residual.T @ residual) * down_gram)), 0.0))

    # Safe LoRA: <C dW, dW> = tr(X^T V V^T X A A^T) / ||V||_F, ||C dW||^2 = tr((C X)^T (C X) A A^T).
    projected_gram = (direction_t_up.T @ direction_t_up).double()
    projected_norm_sq = float(torch.sum((soft_projected_up.double().T @ soft_projected_up.double()) * down_gram))
    inner = float(torch.sum(projected_gram * down_gram))
    # The ||V||_2^2 of Ct and the ||V||_F of C cancel in the cosine; use Ct's quantities as they are.
    projected_norm = math.sqrt(max(projected_norm_sq, 0.0)) * alignment_spectral_norm**2
    cosine = inner / (projected_norm * update_norm) if projected_norm > 0 else 0.0

    signed = float(torch.sum(direction_t_up.double() * down.T.double()))  # <X A, V> = tr(A V^T X)
    return LayerGeometry(
        update_norm=update_norm,
        relative_distance=distance / update_norm,
        cosine=cosine,
        signed_alignment=signed / (update_norm * alignment_frobenius_norm),
    )


@torch.no_grad()
def safe_lora_projection(alignment_direction: torch.Tensor, lora_B: torch.Tensor, frobenius_norm_v: float) -> torch.Tensor:
    """Safe LoRA's projected up-projection ``C B = V (V^T B) / ||V||_F``, (m, r), in B's dtype."""
    dtype = compute_dtype(alignment_direction, lora_B)
    direction = alignment_direction.to(device=lora_B.device, dtype=dtype)
    projected = direction @ (lora_B.to(dtype).T @ direction).T / frobenius_norm_v
    return projected.to(lora_B.dtype)


@torch.no_grad()
def permutation_distances(
    alignment_direction: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    alignment_spectral_norm: float,
    alignment_frobenius_norm: float,
    permutations: int,
    seed: int,
) -> list[float]:
    """Relative distances after randomly permuting the rows of B (spec 3, ``null="permutation"``).

    A permutation keeps ``||dW||`` and B's entry distribution but destroys the update's relation
    to the alignment subspace. Seeded with a local generator (training RNG untouched).
    """
    generator = torch.Generator().manual_seed(seed)
    distances = []
    for _ in range(permutations):
        order = torch.randperm(lora_B.shape[0], generator=generator).to(lora_B.device)
        distances.append(
            layer_geometry(
                alignment_direction,
                lora_A,
                lora_B[order],
                scaling,
                alignment_spectral_norm=alignment_spectral_norm,
                alignment_frobenius_norm=alignment_frobenius_norm,
            ).relative_distance
        )
    return distances


@dataclass(frozen=True)
class RobustScore:
    """``(d - median(N)) / IQR(N)``; when the IQR is 0, the unscaled ``d - median(N)`` (scaled=False)."""

    value: float
    scaled: bool


def robust_zscore(distance: float, null_distances: Sequence[float]) -> RobustScore:
    """E-DIEM of one distance against its null sample set (median and IQR, linear quantiles).

    No epsilon: a zero IQR (a single peer, identical peers) gives the raw centred distance and
    says so, instead of dividing by a tiny number (the reference code's defect, spec 6).
    """
    if not null_distances:
        raise ValueError("E-DIEM needs at least one null distance.")
    null = torch.tensor(list(null_distances), dtype=torch.float64)
    q1, median, q3 = torch.quantile(null, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    spread = q3 - q1
    if spread > 0:
        return RobustScore((distance - median) / spread, True)
    return RobustScore(distance - median, False)


def ediem_shape_peers(
    distances: Mapping[str, float], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, RobustScore]:
    """E-DIEM with ``null="layers"``: each layer against all scored layers of its weight shape."""
    peers: dict[tuple[int, int], list[float]] = {}
    for name, distance in distances.items():
        peers.setdefault(tuple(shapes[name]), []).append(distance)
    return {name: robust_zscore(distance, peers[tuple(shapes[name])]) for name, distance in distances.items()}
