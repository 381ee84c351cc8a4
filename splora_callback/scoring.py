"""Score every LoRA layer: E-DIEM, Safe LoRA cosine, signed diagnostic (and the probe, if given).

All geometric scores come from one pass (they share the O(m n r) products), so ``metric`` only says
which one drives selection. Higher *suspicion* = prune first, whatever the metric (spec 3: E-DIEM
is reported as a distance, so its sign is never ambiguous).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from .alignment import AlignmentSubspace
from .layers import LoraUpdate, lora_updates_from_model
from .metrics import ediem_shape_peers, layer_geometry, permutation_distances, robust_zscore, update_norm

Status = Literal["active", "inactive", "no_alignment"]
Metric = Literal["ediem", "cosine", "probe"]
Null = Literal["layers", "permutation"]


@dataclass
class LayerScore:
    """Scores of one LoRA layer. Score fields are ``None`` exactly when ``status != "active"``.

    Attributes:
        status: ``"active"``; ``"inactive"`` (dW = 0, e.g. B still at its zero init: never
            selected); ``"no_alignment"`` (V = 0 there: cannot be judged, never selected).
        ediem: robust distance score, higher = strays further from the alignment subspace.
        ediem_scaled: False when the null's IQR was 0 and ``ediem`` is the unscaled centred distance.
        relative_distance: ``||Ct dW - dW|| / ||dW||`` in [0, 1].
        cosine: Safe LoRA's cosine, lower = more suspect.
        signed_alignment: ``<dW, V> / (||dW|| ||V||)``, negative = against alignment (diagnostic).
        probe: safety-probe attribution (spec 3b), when a probe was run.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    status: Status
    update_norm: float
    relative_distance: float | None = None
    cosine: float | None = None
    ediem: float | None = None
    ediem_scaled: bool | None = None
    signed_alignment: float | None = None
    probe: float | None = None


# metric -> suspicion of an active layer (higher = more suspect = selected first)
SUSPICION: dict[str, Callable[[LayerScore], float]] = {
    "ediem": lambda score: score.ediem,
    "cosine": lambda score: -score.cosine,
    "signed": lambda score: -score.signed_alignment,
    "probe": lambda score: score.probe,
}


@dataclass
class LayerScores:
    """Per-layer scores of one scoring call, in module order.

    Attributes:
        metric: which score drives selection (a key of :data:`SUSPICION`).
        null: E-DIEM's null sample set (``"layers"`` or ``"permutation"``).
        layers: module name -> :class:`LayerScore`.
    """

    metric: str
    null: str
    layers: dict[str, LayerScore] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerScore:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def eligible(self) -> list[LayerScore]:
        """Layers that can be selected: active, with a value for the metric."""
        key = SUSPICION[self.metric]
        return [score for score in self if score.status == "active" and key(score) is not None]

    def suspicion(self) -> dict[str, float]:
        """Eligible layer name -> suspicion under ``metric`` (higher = more suspect)."""
        key = SUSPICION[self.metric]
        return {score.name: float(key(score)) for score in self.eligible()}

    def with_metric(self, metric: str) -> LayerScores:
        """The same scores, selecting by another metric."""
        if metric not in SUSPICION:
            raise ValueError(f"metric={metric!r}; expected one of {sorted(SUSPICION)}.")
        return LayerScores(metric, self.null, self.layers)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "null": self.null, "layers": [asdict(score) for score in self]}

    @classmethod
    def from_dict(cls, data: dict) -> LayerScores:
        layers = {}
        for item in data["layers"]:
            layers[item["name"]] = LayerScore(**{**item, "shape": tuple(item["shape"])})
        return cls(data["metric"], data["null"], layers)


@torch.no_grad()
def score_updates(
    updates: Sequence[LoraUpdate],
    alignment: AlignmentSubspace | None,
    metric: Metric = "ediem",
    *,
    null: Null = "layers",
    permutations: int = 16,
    seed: int = 0,
) -> LayerScores:
    """Score LoRA updates against the alignment subspace (see :func:`score_layers`)."""
    if metric not in SUSPICION:
        raise ValueError(f"metric={metric!r}; expected one of {sorted(SUSPICION)}.")
    if null not in ("layers", "permutation"):
        raise ValueError(f"null={null!r}; expected 'layers' or 'permutation'.")
    scores = LayerScores(metric, null)
    distances, shapes, permuted = {}, {}, {}
    for update in updates:
        if not (torch.isfinite(update.lora_A).all() and torch.isfinite(update.lora_B).all()):
            raise ValueError(f"{update.name}: LoRA weights hold NaN/inf; training diverged, nothing to score.")
        score = LayerScore(update.name, update.kind, update.shape, update.rank, "active", 0.0)
        scores.layers[update.name] = score
        if not update.lora_A.any() or not update.lora_B.any() or update.scaling == 0:
            score.status = "inactive"
            continue
        if alignment is None:
            score.update_norm = update_norm(update.lora_A, update.lora_B, update.scaling)
            continue
        if update.name not in alignment:
            raise KeyError(
                f"{update.name} has a LoRA update but is not in the alignment subspace; rebuild it for "
                "this model's LoRA layers."
            )
        if not alignment.has_signal(update.name):
            score.status = "no_alignment"
            continue
        direction = alignment.directions[update.name]
        if tuple(direction.shape) != update.shape:
            raise ValueError(
                f"{update.name}: alignment direction has shape {tuple(direction.shape)} but the LoRA "
                f"update has {update.shape}: the alignment subspace is for another model."
            )
        norms = {
            "alignment_spectral_norm": alignment.spectral_norms[update.name],
            "alignment_frobenius_norm": alignment.frobenius_norms[update.name],
        }
        geometry = layer_geometry(direction, update.lora_A, update.lora_B, update.scaling, **norms)
        score.update_norm = geometry.update_norm
        score.relative_distance = geometry.relative_distance
        score.cosine = geometry.cosine
        score.signed_alignment = geometry.signed_alignment
        distances[update.name] = geometry.relative_distance
        shapes[update.name] = update.shape
        if null == "permutation":
            layer_seed = seed + zlib.crc32(update.name.encode())
            permuted[update.name] = permutation_distances(
                direction, update.lora_A, update.lora_B, update.scaling,
                permutations=permutations, seed=layer_seed, **norms,
            )
    if null == "layers":
        ediem = ediem_shape_peers(distances, shapes)
    else:
        ediem = {name: robust_zscore(distances[name], permuted[name]) for name in distances}
    for name, robust in ediem.items():
        scores.layers[name].ediem = robust.value
        scores.layers[name].ediem_scaled = robust.scaled
    return scores


def score_layers(
    model: nn.Module,
    alignment: AlignmentSubspace | None,
    metric: Metric = "ediem",
    *,
    null: Null = "layers",
    permutations: int = 16,
    seed: int = 0,
    adapter_name: str | None = None,
    probe: object | None = None,
) -> LayerScores:
    """Score every LoRA layer of ``model`` (a ``PeftModel`` or a model with LoRA layers).

    Args:
        alignment: from :meth:`AlignmentSubspace.from_pretrained`; may be None with
            ``metric="probe"`` (geometric scores are then left empty).
        metric: ``"ediem"`` (SPLoRA), ``"cosine"`` (Safe LoRA) or ``"probe"`` (spec 3b): the score
            that drives selection. E-DIEM, cosine and the signed diagnostic are always computed.
        null: E-DIEM's null sample set: ``"layers"`` (peers of the same weight shape) or
            ``"permutation"`` (``permutations`` row permutations of B per layer, seeded).
        adapter_name: the adapter to score; default: the single active one.
        probe: a :class:`~splora_callback.probe.SafetyProbe`; required for ``metric="probe"``.

    Raises:
        NoLoraLayersError, UnsupportedAdapterError: see :mod:`splora_callback.layers`.
        ValueError: unknown metric/null, NaN/inf LoRA weights, shape mismatch.
    """
    if metric == "probe" and probe is None:
        raise ValueError("metric='probe' needs probe=SafetyProbe(...) (see splora_callback.probe).")
    if alignment is None and metric != "probe":
        raise ValueError(f"metric={metric!r} needs an alignment subspace (AlignmentSubspace.from_pretrained).")
    updates = lora_updates_from_model(model, adapter_name)
    scores = score_updates(updates, alignment, metric, null=null, permutations=permutations, seed=seed)
    if probe is not None:
        attributions = probe.attribute(model, adapter_name=adapter_name)
        for name, value in attributions.items():
            if scores.layers[name].status == "active":
                scores.layers[name].probe = value
    return scores
