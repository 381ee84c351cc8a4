"""The recipe's own sections, ``evaluation``, ``data`` and ``probe``, as dataclasses with their defaults.

    spec = evaluation_section(config)        # EvaluationSection; spec.fractions, spec.workers, ...

The YAML stays plain mappings (``inherit:`` and ``--override`` work on them, and the cache
fingerprint hashes them as written); these classes are how the scripts read them. Every key is a
field below, named by the checks of ``recipe_config.check_config``: an unknown key is an error that
names the section and the closest fields, a missing one (no default) an error that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

# Keys of the old schema (and common short names) -> the field they mean, for "did you mean".
OLD_NAMES = {
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs",
    "lr_scheduler": "lr_scheduler_type",
    "warmup": "warmup_steps",
    "sampling": "train_sampling_strategy",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "seed": "permutation_seed",
}


def section(cls: type, default: Any = dataclasses.MISSING) -> Any:
    """A field that is a nested section (a mapping read as ``cls``)."""
    return dataclasses.field(default=default, metadata={"section": cls})


@dataclasses.dataclass(frozen=True)
class OneShotPatchSection:
    """``evaluation.one_shot_patch`` (one_shot_patch.py, splora_callback.patch): AdamW steps on the
    probe's refusal pairs; checked by ``patch.check_patch_options``.

    ``anchors``: benign anchor pairs (benign requests with the LoRA model's own answers, passed by
    the caller as ``anchor_pairs``) mixed into each batch besides ``batch_size`` probe pairs, so the
    patch keeps answering benign requests; 0 (default): refusal pairs only, as before.
    ``stop``: ``refusal_loss`` (fixed ``steps``, or calibrated on the refusal loss) or
    ``refusal_rate`` (per model: the first step whose refusal rate on the probe's own prompts closes
    ``restore`` of the gap to the aligned model's, at most ``max_steps``; ``max_new_tokens`` judged).
    ``factors``: ``both`` (lora_A and lora_B: the study's patches) or ``A`` (lora_A only: the
    library's default, ``SPLoRAConfig.patch_factors``). ``rebuild`` (``rate_patch`` only): False
    evaluates the callback's own ``adapter/`` (``action: patch`` with these settings) instead of
    training the patch again from ``adapter-lora/`` and checking it against ``adapter/``.
    """

    lr: float
    batch_size: int
    steps: int | None = None  # None: calibrate, up to max_steps
    max_steps: int | None = None
    anchors: int = 0
    stop: str = "refusal_loss"
    restore: float = 0.9
    max_new_tokens: int = 8
    factors: str = "both"
    rebuild: bool = True

    def __post_init__(self) -> None:
        from splora_callback.patch import check_patch_options

        check_patch_options(lr=self.lr, batch_size=self.batch_size, steps=self.steps, max_steps=self.max_steps,
                            stop=self.stop, restore=self.restore, anchors=self.anchors, factors=self.factors,
                            where="config: evaluation.<patch>")


CALLBACK_PATCH_FIELDS = ("lr", "max_steps", "anchors", "stop", "restore", "factors")  # section field = patch_<field>


def callback_patch_differences(spec: OneShotPatchSection, settings: dict[str, Any]) -> list[str]:
    """Where ``spec`` (``evaluation.rate_patch``) and the callback's ``patch_*`` ``settings`` (a
    ``splora`` section or a report's config; absent keys: SPLoRAConfig's defaults) differ, named."""
    from splora_callback import SPLoRAConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SPLoRAConfig) if f.name.startswith("patch_")}
    merged = {**defaults, **{key: value for key, value in settings.items() if key.startswith("patch_")}}
    return [f"{name}: {getattr(spec, name)!r} vs splora.patch_{name}: {merged.get('patch_' + name)!r}"
            for name in CALLBACK_PATCH_FIELDS if getattr(spec, name) != merged.get(f"patch_{name}")]


@dataclasses.dataclass(frozen=True)
class GatesSection:
    """``evaluation.gates`` (splora_callback.gates): projected-Adam steps on a gate per rank-one
    component, on ``refusal_weight`` x the probe's refusal loss + ``task_weight`` x the utility
    probe's task loss + ``anchor_weight`` x the loss of benign requests answered by the LoRA itself;
    ``threshold``: None keeps the gates as scales (an exact LoRA), a number rounds them."""

    steps: int = 12
    lr: float = 0.05
    refusal_weight: float = 1.0
    task_weight: float = 1.0
    anchor_weight: float = 1.0
    threshold: float | None = None


@dataclasses.dataclass(frozen=True)
class SafeDeltaSection:
    """``evaluation.safe_delta`` (safe_delta.py): the peer baseline on the merged LoRA delta.
    ``scale``: the budget's s; None calibrates it (the largest of ``scales`` whose probe refusal
    rate reaches the aligned model's), on the calibration cell; the driver freezes it for the rest."""

    scale: float | None = None
    # the budget grows with s x mean sensitivity, which grows with the probe's token count: on the
    # 135M demo model s = 1e-4 already keeps 36 % of the delta entries (measured), hence a low grid
    scales: list[float] = dataclasses.field(default_factory=lambda: [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1e-2])
    damp: float = 0.01
    block: int = 128
    never_keep: float = 0.15


@dataclasses.dataclass(frozen=True)
class EvaluationSection:
    """``evaluation`` (evaluation_run.py, variants.py): what is evaluated and how."""

    harmful_split: str
    harmful_max_new_tokens: int
    task_max_new_tokens: int
    batch_size: int
    rules: list[str]
    fractions: list[float]
    random_seeds: list[int]
    require_lora_effect: bool
    premise_refusal_ratio: float = 0.5
    run_dir: str | None = None  # evaluate this finished run (results still go to output_dir)
    benign_split: str | None = None  # heldout: measure over-refusal (needs demo_models)
    benign_count: int | None = None  # a cap, for smoke runs
    benign_max_new_tokens: int | None = None
    over_refusal: list[str] | None = None  # None: every rule's own model
    over_refusal_controls: list[str] | None = None  # None: no control
    controls: list[str] | None = None
    workers: int = 1
    utility_examples: int = 20
    utility_max_length: int = 256
    utility_batch_size: int = 10
    one_shot_patch: OneShotPatchSection | None = section(OneShotPatchSection, default=None)
    anchored_patch: OneShotPatchSection | None = section(OneShotPatchSection, default=None)
    rate_patch: OneShotPatchSection | None = section(OneShotPatchSection, default=None)
    gates: GatesSection | None = section(GatesSection, default=None)
    safe_delta: SafeDeltaSection | None = section(SafeDeltaSection, default=None)

    def __post_init__(self) -> None:
        for rule in ("one_shot_patch", "anchored_patch", "rate_patch"):
            if rule in self.rules and getattr(self, rule) is None:
                raise ValueError(f"config: evaluation.rules has {rule}; set evaluation.{rule} (lr, batch_size, steps)")
        for rule in ("anchored_patch", "rate_patch"):
            if rule in self.rules and not getattr(self, rule).anchors:
                raise ValueError(f"config: evaluation.{rule}.anchors must be >= 1 (benign anchor pairs per batch)")
        if "rate_patch" in self.rules and self.rate_patch.stop != "refusal_rate":
            raise ValueError("config: evaluation.rate_patch.stop must be refusal_rate (the anchored patch stopped on the "
                             "probe's refusal rate)")


# What each source of data.task / data.harmful reads besides the counts and the seed.
TASK_DATASET_KEYS = ("path", "train_split", "eval_split", "prompt_template", "response_column")
HARMFUL_KEYS = {
    "templated_compliance": ("split", "seed"),
    "dataset": ("path", "split", "prompt_column", "response_column", "seed"),
}


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """``data.task`` (recipe_data.task_pairs): ``demo_dialogues``, or a dataset's columns."""

    source: str
    train_samples: int | None
    eval_samples: int | None
    seed: int
    path: str | None = None
    name: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    prompt_template: str | None = None
    response_column: str | None = None

    def __post_init__(self) -> None:
        if self.source == "dataset":
            require("data.task", self, TASK_DATASET_KEYS)


@dataclasses.dataclass(frozen=True)
class HarmfulSection:
    """``data.harmful`` (recipe_data.harmful_training_pairs): harmful pairs in the fine-tune mix."""

    source: str
    num_samples: int | None = None  # None or 0: no harmful pairs
    split: str | None = None
    seed: int | None = None
    path: str | None = None
    name: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None

    def __post_init__(self) -> None:
        if self.num_samples:
            require("data.harmful", self, HARMFUL_KEYS.get(self.source, ()))


@dataclasses.dataclass(frozen=True)
class DataSection:
    """``data``: the fine-tune mix and its chat examples' lengths."""

    max_length: int
    min_response_tokens: int
    task: TaskSection = section(TaskSection)
    harmful: HarmfulSection = section(HarmfulSection)


@dataclasses.dataclass(frozen=True)
class ProbeSection:
    """``probe`` (recipe_data.build_probe): the safety probe's prompts and batches."""

    split: str
    max_length: int
    batch_size: int


def require(name: str, spec: Any, keys: Sequence[str]) -> None:
    """Raise naming the ``keys`` of ``spec`` that are unset (None) although its source reads them."""
    missing = [key for key in keys if getattr(spec, key) is None]
    if missing:
        raise ValueError(f"config: {name}.source={spec.source!r} needs {missing}; see recipes/configs/")


def check_fields(name: str, spec: Any, cls: type, filled_in: Sequence[str] = ()) -> None:
    """Every key of ``spec`` is an ``__init__`` field of the dataclass ``cls`` (values: ``cls`` checks them)."""
    if not isinstance(spec, dict):
        raise ValueError(f"config: {name} must be a mapping of {cls.__name__} fields, got {spec!r}")
    fields = {field.name for field in dataclasses.fields(cls) if field.init}
    for key in spec:
        if key in filled_in:
            raise ValueError(f"config: {name}.{key} is filled in by the recipe; remove it")
        if key not in fields:
            close = [OLD_NAMES[key]] if OLD_NAMES.get(key) in fields else []
            close += [
                field for field in difflib.get_close_matches(key, fields, n=3, cutoff=0.5) if field not in close
            ]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"config: {name}.{key} is not a field of {cls.__name__}{hint}")


def read_section(name: str, spec: Any, cls: type) -> Any:
    """``cls(**spec)``, nested sections read the same way; unknown and missing keys named.

    Raises:
        ValueError: ``spec`` is not a mapping, has a key that is not a field of ``cls`` (with the
            closest fields), or lacks one without a default.
    """
    check_fields(name, spec, cls)
    values = dict(spec)
    for field in dataclasses.fields(cls):
        nested = field.metadata.get("section")
        if nested is not None and values.get(field.name) is not None:
            values[field.name] = read_section(f"{name}.{field.name}", values[field.name], nested)
    missing = [
        field.name for field in dataclasses.fields(cls)
        if field.name not in values and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"config: {name} is missing {missing}; see recipes/configs/cpu-demo.yaml")
    return cls(**values)


def evaluation_section(config: dict[str, Any]) -> EvaluationSection:
    return read_section("evaluation", config["evaluation"], EvaluationSection)


def data_section(config: dict[str, Any]) -> DataSection:
    return read_section("data", config["data"], DataSection)


def probe_section(config: dict[str, Any]) -> ProbeSection:
    return read_section("probe", config["probe"], ProbeSection)
