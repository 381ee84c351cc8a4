"""Score every LoRA layer: E-DIEM, Safe LoRA cosine, signed diagnostic (and the probe, if given).

All geometric scores come from one pass (they share the O(m n r) products), so ``metric`` only says
which one drives selection. Higher *suspicion* = prune first, whatever the metric (spec 3: E-DIEM
is reported as a distance, so its sign is never ambiguous).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from .alignment import AlignmentSubspace
from .components import RANK_RTOL, component_attribution, component_basis, component_geometry
from .layers import LoraUpdate, lora_updates_from_model
from .metrics import ediem_shape_peers, layer_geometry, permutation_distances, robust_zscore, update_norm
from .probe import ProbeAttribution, SafetyProbe, UtilityProbe

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
        probe: safety-probe attribution (spec 3b), when a probe was run: > 0 = removing the
            update lowers the refusal loss (suspect).
        utility: utility-probe attribution with its sign turned (spec 3c): > 0 = removing the
            update raises the task loss.
        components: with ``granularity="component"``, per rank-one component of the update (SVD
            order, largest first): ``sigma`` (singular values) and, where computed, ``probe``,
            ``utility`` (same signs as above, summing to the layer's values), ``relative_distance``,
            ``cosine``, ``signed_alignment`` and ``ediem`` (shape peers: all components of layers
            of the same weight shape).
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
    utility: float | None = None
    components: dict[str, list[float]] | None = None


# metric -> suspicion of an active layer (higher = more suspect = selected first)
SUSPICION: dict[str, Callable[[LayerScore], float]] = {
    "ediem": lambda score: score.ediem,
    "cosine": lambda score: -score.cosine,
    "signed": lambda score: -score.signed_alignment,
    "probe": lambda score: score.probe,
}
# metric -> (component field, sign): the suspicion of a rank-one component
COMPONENT_SUSPICION: dict[str, tuple[str, float]] = {
    "ediem": ("ediem", 1.0),
    "cosine": ("cosine", -1.0),
    "signed": ("signed_alignment", -1.0),
    "probe": ("probe", 1.0),
}
GRANULARITIES = ("layer", "component")
Component = tuple[str, int]  # (module name, component index in SVD order)


@dataclass
class LayerScores:
    """Per-layer scores of one scoring call, in module order.

    Attributes:
        metric: which score drives selection (a key of :data:`SUSPICION`).
        null: E-DIEM's null sample set (``"layers"`` or ``"permutation"``).
        layers: module name -> :class:`LayerScore`.
        granularity: what selection chooses: ``"layer"`` (module names) or ``"component"``
            (rank-one components; needs the layers' ``components``).
        losses: the probes' mean losses when run (nats): ``"refusal"`` (safety probe), ``"task"``
            (utility probe).
    """

    metric: str
    null: str
    layers: dict[str, LayerScore] = field(default_factory=dict)
    granularity: str = "layer"
    losses: dict[str, float] = field(default_factory=dict)

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

    def component_suspicion(self) -> dict[Component, float]:
        """Eligible component -> suspicion under ``metric``: components of active layers that carry
        an update (``sigma`` above :data:`~splora_callback.components.RANK_RTOL` of the largest)."""
        key, sign = COMPONENT_SUSPICION[self.metric]
        suspicion = {}
        for score in self:
            values = (score.components or {}).get(key)
            if score.status != "active" or values is None:
                continue
            for index in eligible_components(score):
                suspicion[(score.name, index)] = sign * float(values[index])
        return suspicion

    def with_metric(self, metric: str) -> LayerScores:
        """The same scores, selecting by another metric."""
        if metric not in SUSPICION:
            raise ValueError(f"metric={metric!r}; expected one of {sorted(SUSPICION)}.")
        return LayerScores(metric, self.null, self.layers, self.granularity, self.losses)

    def with_granularity(self, granularity: str) -> LayerScores:
        """The same scores, selecting layers or rank-one components.

        Raises:
            ValueError: unknown granularity, or ``"component"`` for scores without components.
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}; expected one of {', '.join(GRANULARITIES)}.")
        if granularity == "component" and not any(score.components for score in self):
            raise ValueError("These scores have no component scores: score with granularity='component'.")
        return LayerScores(self.metric, self.null, self.layers, granularity, self.losses)

    def non_finite(self) -> list[str]:
        """Every NaN or infinite number of these scores, as ``"<layer>.<field>=<value>"`` (losses as
        ``"losses.<name>=<value>"``, components as ``"<layer>.components.<field>[i]=<value>"``);
        ``[]`` when all are finite. What a selection or a JSON report must never be built from."""
        found = [f"losses.{name}={value!r}" for name, value in self.losses.items()
                 if value is not None and not math.isfinite(value)]
        for score in self:
            for key, value in asdict(score).items():
                if isinstance(value, float) and not math.isfinite(value):
                    found.append(f"{score.name}.{key}={value!r}")
            for key, values in (score.components or {}).items():
                found.extend(f"{score.name}.components.{key}[{index}]={value!r}" for index, value in enumerate(values)
                             if value is not None and not math.isfinite(value))
        return found

    def to_dict(self) -> dict:
        return {"metric": self.metric, "null": self.null, "granularity": self.granularity,
                "losses": dict(self.losses), "layers": [asdict(score) for score in self]}

    @classmethod
    def from_dict(cls, data: dict) -> LayerScores:
        layers = {}
        for item in data["layers"]:
            layers[item["name"]] = LayerScore(**{**item, "shape": tuple(item["shape"])})
        return cls(data["metric"], data["null"], layers, data.get("granularity", "layer"),
                   dict(data.get("losses", {})))


def eligible_components(score: LayerScore) -> list[int]:
    """Indices of the components of an active layer that carry an update (never selected otherwise)."""
    sigma = (score.components or {}).get("sigma") or []
    if score.status != "active" or not sigma or sigma[0] <= 0:
        return []
    return [index for index, value in enumerate(sigma) if value > RANK_RTOL * sigma[0]]


def component_fields(
    update: LoraUpdate, alignment: AlignmentSubspace | None, safety: torch.Tensor | None,
    utility: torch.Tensor | None,
) -> dict[str, list[float]]:
    """Per-component scores of one active update (spec 3c), all but E-DIEM (which needs peers).

    Args:
        safety, utility: the layer's (r, r) interaction ``M`` from the safety / utility probe pass.
    """
    basis = component_basis(update.lora_A, update.lora_B, update.scaling)
    fields = {"sigma": basis.sigma.tolist()}
    if safety is not None:
        fields["probe"] = component_attribution(basis, safety).tolist()
    if utility is not None:
        fields["utility"] = (-component_attribution(basis, utility)).tolist()
    if alignment is not None and update.name in alignment and alignment.has_signal(update.name):
        geometry = component_geometry(
            alignment.directions[update.name], basis,
            alignment_spectral_norm=alignment.spectral_norms[update.name],
            alignment_frobenius_norm=alignment.frobenius_norms[update.name],
        )
        fields["relative_distance"] = geometry.relative_distance.tolist()
        fields["cosine"] = geometry.cosine.tolist()
        fields["signed_alignment"] = geometry.signed_alignment.tolist()
    return fields


def add_component_ediem(scores: LayerScores) -> None:
    """E-DIEM of every component against all components of the layers of the same weight shape."""
    distances, shapes = {}, {}
    for score in scores:
        values = (score.components or {}).get("relative_distance")
        if values is None:
            continue
        for index in eligible_components(score):
            distances[(score.name, index)] = values[index]
            shapes[(score.name, index)] = score.shape
    for score in scores:
        if (score.components or {}).get("relative_distance") is not None:
            score.components["ediem"] = [None] * len(score.components["sigma"])
    for (name, index), robust in ediem_shape_peers(distances, shapes).items():
        scores.layers[name].components["ediem"][index] = robust.value


def attach_probes(scores: LayerScores, safety: ProbeAttribution | None, utility: ProbeAttribution | None) -> None:
    """Put the probes' losses and per-layer attributions into ``scores`` (active layers)."""
    if safety is not None:
        scores.losses["refusal"] = safety.loss
    if utility is not None:
        scores.losses["task"] = utility.loss
    for score in scores:
        if score.status != "active":
            continue
        if safety is not None:
            score.probe = safety.layers[score.name]
        if utility is not None:
            score.utility = -utility.layers[score.name]


def attach_components(
    scores: LayerScores, updates: Sequence[LoraUpdate], alignment: AlignmentSubspace | None,
    safety: ProbeAttribution | None, utility: ProbeAttribution | None,
) -> None:
    """Per-component scores (:func:`component_fields`) of the active layers among ``updates``."""
    for update in updates:
        if scores.layers[update.name].status == "active":
            scores.layers[update.name].components = component_fields(
                update, alignment, None if safety is None else safety.interactions[update.name],
                None if utility is None else utility.interactions[update.name],
            )


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
        del direction  # a streamed V (memory.py) is this module's own copy: free it before the next one
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
    probe: SafetyProbe | None = None,
    utility: UtilityProbe | None = None,
    granularity: str = "layer",
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
        utility: a :class:`~splora_callback.probe.UtilityProbe` (task examples): fills ``utility``
            and ``losses["task"]``, which ``select="budget"`` needs.
        granularity: ``"component"`` also scores every rank-one component of every active update
            (spec 3c; r x r work per layer plus, with an alignment, two (m, n)-by-(n, r) products),
            and selection then chooses components.

    Raises:
        NoLoraLayersError, UnsupportedAdapterError: see :mod:`splora_callback.layers`.
        ValueError: unknown metric/null/granularity, NaN/inf LoRA weights, shape mismatch.
    """
    check_scoring_options(metric, alignment, probe, granularity)
    updates = lora_updates_from_model(model, adapter_name)
    scores = score_updates(updates, alignment, metric, null=null, permutations=permutations, seed=seed)
    scores.granularity = granularity
    safety = None if probe is None else probe.run(model, adapter_name=adapter_name)
    task = None if utility is None else utility.run(model, adapter_name=adapter_name)
    attach_probes(scores, safety, task)
    if granularity == "component":
        attach_components(scores, updates, alignment, safety, task)
        if alignment is not None:
            add_component_ediem(scores)
    return scores


def check_scoring_options(
    metric: str, alignment: AlignmentSubspace | None, probe: object | None, granularity: str
) -> None:
    """Raise ``ValueError`` for a combination :func:`score_layers` cannot score, naming the fix."""
    if metric == "probe" and probe is None:
        raise ValueError("metric='probe' needs probe=SafetyProbe(...) (see splora_callback.probe).")
    if alignment is None and metric != "probe":
        raise ValueError(f"metric={metric!r} needs an alignment subspace (AlignmentSubspace.from_pretrained).")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; expected one of {', '.join(GRANULARITIES)}.")
