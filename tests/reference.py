"""Dense float64 forms of the spec's formulas: the references every fast path is tested against."""

from __future__ import annotations

import torch


def dense_geometry(direction: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """Spec sections 2, 3 and 7 written out with (m, m) matrices, all in float64."""
    direction, delta = direction.double(), delta.double()
    frobenius = torch.linalg.matrix_norm(direction)
    spectral = torch.linalg.matrix_norm(direction, ord=2)
    alignment_matrix = direction @ direction.T / frobenius  # C, Safe LoRA
    soft_projector = direction @ direction.T / spectral**2  # Ct, E-DIEM
    projected = alignment_matrix @ delta
    soft_projected = soft_projector @ delta
    delta_norm = torch.linalg.matrix_norm(delta)
    projected_norm = torch.linalg.matrix_norm(projected)
    cosine = torch.sum(projected * delta) / (projected_norm * delta_norm) if projected_norm > 0 else torch.tensor(0.0)
    return {
        "update_norm": float(delta_norm),
        "relative_distance": float(torch.linalg.matrix_norm(soft_projected - delta) / delta_norm),
        "cosine": float(cosine),
        "signed_alignment": float(torch.sum(delta * direction) / (delta_norm * frobenius)),
        "spectral_norm": float(spectral),
    }


def dense_robust_zscore(distance: float, null: list[float]) -> float:
    values = torch.tensor(null, dtype=torch.float64)
    q1, median, q3 = (torch.quantile(values, q).item() for q in (0.25, 0.5, 0.75))
    return (distance - median) / (q3 - q1)
