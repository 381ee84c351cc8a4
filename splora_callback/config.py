"""``SPLoRAConfig``: every option of scoring, selection and action, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

METRICS = ("ediem", "cosine", "probe", "signed")
NULLS = ("layers", "permutation")
SELECTS = ("top_k", "fraction", "threshold")
ACTIONS = ("prune", "project", "none")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SPLoRAConfig:
    """Options of SPLoRA scoring, selection and action (what :class:`SPLoRACallback` takes).

    Raises (on construction):
        ValueError: a field is out of range; the message names the field, the value and the
            accepted values.
    """

    base_model: str | None = field(
        default=None,
        metadata={"help": "Unaligned base checkpoint (local dir or Hub id), e.g. meta-llama/Llama-2-7b-hf."},
    )
    aligned_model: str | None = field(
        default=None,
        metadata={"help": "Aligned checkpoint; default: the live model's frozen base weights."},
    )
    metric: Literal["ediem", "cosine", "probe", "signed"] = field(
        default="ediem",
        metadata={"help": "Score that drives selection: ediem (SPLoRA), cosine (Safe LoRA), probe, signed."},
    )
    null: Literal["layers", "permutation"] = field(
        default="layers", metadata={"help": "E-DIEM null: same-shape peer layers, or row permutations of B."}
    )
    permutations: int = field(default=16, metadata={"help": "Permutations per layer for null='permutation' (>= 16)."})
    select: Literal["top_k", "fraction", "threshold"] = field(
        default="fraction", metadata={"help": "How many layers to act on."}
    )
    k: int | None = field(default=None, metadata={"help": "select='top_k': number of layers."})
    fraction: float | None = field(default=0.25, metadata={"help": "select='fraction': share of scored layers."})
    threshold: float | None = field(
        default=None, metadata={"help": "select='threshold': E-DIEM > t (cosine < t, probe > t)."}
    )
    action: Literal["prune", "project", "none"] = field(
        default="prune", metadata={"help": "prune (SPLoRA), project (Safe LoRA) or none (monitor only)."}
    )
    adapter_name: str | None = field(default=None, metadata={"help": "Adapter to score; default: the active one."})
    score_every_n_steps: int = field(default=50, metadata={"help": "Scoring interval in optimizer steps (0: only at the end)."})
    prune_at_end: bool = field(default=True, metadata={"help": "Apply the action to the live model at train end."})
    prune_at_checkpoints: bool = field(
        default=False, metadata={"help": "Write an acted adapter to checkpoint-N/splora/ at every save."}
    )
    alignment_cache: str | None = field(
        default=None, metadata={"help": "Safetensors file caching the alignment subspace."}
    )
    alignment_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Storage dtype of V (bfloat16 halves memory)."}
    )
    alert_threshold: float | None = field(
        default=None, metadata={"help": "wandb.alert when a layer's E-DIEM first exceeds this value."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the permutation null (local RNG only)."})
    probe: Any = field(
        default=None, metadata={"help": "SafetyProbe for metric='probe' (not serialised)."}, repr=False
    )

    def __post_init__(self) -> None:
        _check_choice("metric", self.metric, METRICS)
        _check_choice("null", self.null, NULLS)
        _check_choice("select", self.select, SELECTS)
        _check_choice("action", self.action, ACTIONS)
        _check_choice("alignment_dtype", self.alignment_dtype, DTYPES)
        if self.permutations < 16:
            raise ValueError(f"SPLoRAConfig.permutations={self.permutations!r}: must be >= 16 (spec 3).")
        if self.select == "top_k" and (not isinstance(self.k, int) or self.k < 0):
            raise ValueError(f"SPLoRAConfig.k={self.k!r}: select='top_k' needs an integer k >= 0.")
        if self.select == "fraction" and (self.fraction is None or not 0 <= self.fraction <= 1):
            raise ValueError(f"SPLoRAConfig.fraction={self.fraction!r}: select='fraction' needs 0 <= fraction <= 1.")
        if self.select == "threshold" and self.threshold is None:
            raise ValueError("SPLoRAConfig.threshold=None: select='threshold' needs a number.")
        if not isinstance(self.score_every_n_steps, int) or self.score_every_n_steps < 0:
            raise ValueError(
                f"SPLoRAConfig.score_every_n_steps={self.score_every_n_steps!r}: must be an integer >= 0 "
                "(0 scores only at the end of training)."
            )
        if self.metric == "probe" and self.probe is None:
            raise ValueError("SPLoRAConfig.probe=None: metric='probe' needs probe=SafetyProbe(...).")
        if self.metric != "probe" and self.base_model is None:
            raise ValueError(
                f"SPLoRAConfig.base_model=None: metric={self.metric!r} needs the unaligned base model "
                "(local directory or Hub id) to build the alignment subspace."
            )

    def selection_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`select_layers` for this config."""
        return {"select": self.select, "k": self.k, "fraction": self.fraction, "threshold": self.threshold}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (the probe is summarised, not serialised)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "probe"}
        data["probe"] = None if self.probe is None else repr(self.probe)
        return data


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SPLoRAConfig.{name}={value!r}: expected one of {', '.join(choices)}.")
