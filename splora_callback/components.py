"""Rank-one components of a LoRA update (spec 3c): basis, attribution, geometry, rewritten factors.

A LoRA update ``dW = s B A`` (m, n) is a sum of ``k = min(m, n, r)`` rank-one components,
``dW = sum_i sigma_i u_i v_i^T`` (its SVD). Everything here comes from r x r work: QR of ``B``
and ``A^T``, SVD of the r x r core ``s R_B R_A^T``; no (m, n) matrix is formed.

Each right singular vector lies in A's row space, ``v_i = A^T c_i``, so with the r x r
*interaction* ``M = sum_t g_t y_t^T`` of a probe pass (``y_t = A x_t`` the ``lora_A`` output,
``g_t = dL/dy_t``; ``tr(M)`` is the layer's probe attribution) the first-order attribution of
component i is ``a_i = c_i^T (A A^T) M c_i``, and ``sum_i a_i = tr(M)`` exactly. Removing component
i changes the loss by ``-a_i`` to first order. Derivation: ``docs/components.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Components whose singular value is below this share of the largest carry no update (a
# rank-deficient B or A): attribution 0, never selected.
RANK_RTOL = 1e-10


@dataclass(frozen=True)
class ComponentBasis:
    """The SVD of one update ``dW = s B A`` from r x r work, in float64.

    Attributes:
        sigma: (k,) singular values, descending (k = min(m, n, r)).
        left: (m, k) left singular vectors ``u_i`` (orthonormal columns).
        right: (n, k) right singular vectors ``v_i`` (orthonormal columns).
        coefficients: (r, k) ``c_i`` with ``v_i = A^T c_i``.
        down_gram: (r, r) ``A A^T``.
    """

    sigma: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    coefficients: torch.Tensor
    down_gram: torch.Tensor

    def __len__(self) -> int:
        return self.sigma.numel()

    def carries_update(self) -> torch.Tensor:
        """(k,) bool: the components with a non-negligible singular value."""
        if len(self) == 0 or float(self.sigma[0]) == 0.0:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.sigma > RANK_RTOL * self.sigma[0]


@torch.no_grad()
def component_basis(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> ComponentBasis:
    """The rank-one components of ``scaling * lora_B @ lora_A``.

    Args:
        lora_A: (r, n). lora_B: (m, r). scaling: s (PEFT's ``scaling[adapter]``).

    Float64 throughout: the attributions are sums of many small products, and the rewritten
    factors must reproduce the kept components to the last digit of the LoRA weights' dtype.
    """
    down = lora_A.detach().to(torch.float64)
    up = lora_B.detach().to(device=down.device, dtype=torch.float64)
    q_up, r_up = torch.linalg.qr(up)  # (m, k_b), (k_b, r)
    q_down, r_down = torch.linalg.qr(down.T)  # (n, k_a), (k_a, r)
    core = scaling * r_up @ r_down.T  # (k_b, k_a): dW = Q_B core Q_A^T
    core_left, sigma, core_right_t = torch.linalg.svd(core, full_matrices=False)
    core_right = core_right_t.T  # (k_a, k)
    # v_i = Q_A w_i and A^T = Q_A R_A, so A^T c_i = v_i for c_i = R_A^+ w_i (R_A^{-1} at full rank)
    coefficients = torch.linalg.pinv(r_down) @ core_right
    return ComponentBasis(
        sigma=sigma,
        left=q_up @ core_left,
        right=q_down @ core_right,
        coefficients=coefficients,
        down_gram=down @ down.T,
    )


def component_attribution(basis: ComponentBasis, interaction: torch.Tensor) -> torch.Tensor:
    """(k,) first-order attributions ``a_i = c_i^T (A A^T) M c_i``; 0 where ``sigma_i`` ~ 0.

    Args:
        interaction: (r, r) ``M = sum_t g_t y_t^T`` from a probe pass (``tr(M)`` = the layer's
            attribution). The result sums to ``tr(M)`` when every component carries an update.
    """
    interaction = interaction.to(device=basis.down_gram.device, dtype=torch.float64)
    attribution = (basis.coefficients * (basis.down_gram @ interaction @ basis.coefficients)).sum(dim=0)
    return torch.where(basis.carries_update(), attribution, torch.zeros_like(attribution))


@dataclass(frozen=True)
class ComponentGeometry:
    """Per-component geometry against the alignment direction V, shape (k,) each (float64).

    For a unit component ``u v^T``: Safe LoRA's cosine ``u^T C u / ||C u||``, E-DIEM's relative
    distance ``||Ct u - u||`` and the signed alignment ``u^T V v / ||V||_F`` (spec 2, 3, 7).
    """

    relative_distance: torch.Tensor
    cosine: torch.Tensor
    signed_alignment: torch.Tensor


@torch.no_grad()
def component_geometry(
    alignment_direction: torch.Tensor, basis: ComponentBasis, *, alignment_spectral_norm: float,
    alignment_frobenius_norm: float,
) -> ComponentGeometry:
    """Geometry of each component of ``basis`` against V (m, n): two (m, n)-by-(n, k) products."""
    direction = alignment_direction.to(torch.float64)
    left = basis.left.to(direction.device)
    right = basis.right.to(direction.device)
    direction_t_left = (left.T @ direction).T  # V^T u_i, (n, k), as (u^T V)^T: see metrics.spectral_norm
    back = direction @ direction_t_left  # V V^T u_i, (m, k)
    captured = (direction_t_left**2).sum(dim=0)  # u^T V V^T u = ||V^T u||^2
    back_norm = torch.linalg.vector_norm(back, dim=0)  # ||V V^T u||
    cosine = torch.where(back_norm > 0, captured / back_norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    soft = alignment_spectral_norm**2
    residual = back / soft - left  # (Ct - I) u_i: no cancellation of squares
    return ComponentGeometry(
        relative_distance=torch.linalg.vector_norm(residual, dim=0).cpu(),
        cosine=cosine.cpu(),
        signed_alignment=((direction_t_left * right).sum(dim=0) / alignment_frobenius_norm).cpu(),
    )


@torch.no_grad()
def kept_factors(
    basis: ComponentBasis, keep: Sequence[int], scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """New factors ``(lora_A', lora_B')`` of shapes (r', n), (m, r') whose update, at the same
    scaling, is exactly the sum of the kept components: ``s B' A' = sum_{i in keep} sigma_i u_i v_i^T``.

    Balanced split: both factors carry ``sqrt(sigma_i / s)``. Float64; cast to the weights' dtype.

    Raises:
        ValueError: ``scaling <= 0``, or an index out of range / repeated.
    """
    if not scaling > 0:
        raise ValueError(f"kept_factors: scaling={scaling!r} must be > 0.")
    keep = list(keep)
    if len(set(keep)) != len(keep) or any(not 0 <= index < len(basis) for index in keep):
        raise ValueError(f"kept_factors: component indices {keep} must be distinct, in [0, {len(basis)}).")
    index = torch.tensor(keep, dtype=torch.long)
    weight = torch.sqrt(basis.sigma[index] / scaling)
    return (basis.right[:, index] * weight).T.contiguous(), (basis.left[:, index] * weight).contiguous()


def kept_alpha(scaling: float, rank: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives scaling ``s`` at rank r' (PEFT: alpha/r', rsLoRA: alpha/sqrt(r'))."""
    return scaling * (math.sqrt(rank) if use_rslora else rank)
