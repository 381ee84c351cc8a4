"""``SPLoRAConfig``: every option of scoring, selection and action, validated on construction."""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

from .rules import PARAMETERS, FunctionRule, Rule, check_unused_parameters, infer_rule_name, resolve_rule
from .runtime import SPLoRARuntime

RESTORE_DEFAULT = 0.8  # the repair's share of the refusal increase to undo

METRICS = ("ediem", "cosine", "probe", "signed")
NULLS = ("layers", "permutation")
GRANULARITIES = ("layer", "component")
ACTIONS = ("prune", "project", "patch", "none")
PATCH_STOPS = ("refusal_rate", "refusal_loss")
DTYPES = ("float32", "bfloat16", "float16")
PLACEMENTS = ("stream", "cpu", "resident")


@dataclass
class SPLoRAConfig:
    """Options of SPLoRA scoring, selection and action (what :class:`SPLoRACallback` takes).

    Raises (on construction):
        ConfigTypeError: a field has the wrong type (also a ``ValueError``); the message names
            the field, the value, its type and the expected type.
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
    metric: Literal["ediem", "cosine", "probe", "signed"] | None = field(
        default=None,
        metadata={"help": "Score that drives selection: ediem (SPLoRA), cosine (Safe LoRA), probe, signed. "
                          "Default: probe when a probe is given, else ediem."},
    )
    null: Literal["layers", "permutation"] = field(
        default="layers", metadata={"help": "E-DIEM null: same-shape peer layers, or row permutations of B."}
    )
    permutations: int = field(default=16, metadata={"help": "Permutations per layer for null='permutation' (>= 16)."})
    select: str | None = field(
        default=None,
        metadata={"help": "The selection rule (splora_callback.rules): top_k, fraction, threshold, budget (best "
                          "safety gain per task-loss cost until `budget`; needs probe and utility), repair (the same "
                          "order, measured stop when `restore` of the refusal-loss gap to the aligned model is "
                          "closed, by forward passes), or a name given to rules.register_rule. From Python also a "
                          "Rule instance, a function (scores, context) -> selection, or {'name': ..., **parameters}. "
                          "Default: inferred from the one of k, threshold, budget given, else repair with a probe, "
                          "else fraction."},
    )
    granularity: Literal["layer", "component"] | None = field(
        default=None,
        metadata={"help": "Act on whole LoRA layers, or on the rank-one components of their updates (B A split by its SVD). "
                          "Default: component for select='repair', else layer."},
    )
    budget: float | None = field(
        default=None,
        metadata={"help": "select='budget': largest predicted task-loss increase, as a share of the task loss "
                          "(0.05: 5 percent)."},
    )
    restore: float = field(
        default=RESTORE_DEFAULT,
        metadata={"help": "select='repair': share of the refusal-loss increase (LoRA vs aligned model, on the "
                          "safety probe) the repair must undo, measured (0.8: 80 percent)."},
    )
    k: int | None = field(default=None, metadata={"help": "select='top_k': number of layers."})
    fraction: float | None = field(
        default=None, metadata={"help": "select='fraction': share of scored layers (default 0.25)."}
    )
    threshold: float | None = field(
        default=None, metadata={"help": "select='threshold': E-DIEM > t (cosine < t, probe > t)."}
    )
    action: Literal["prune", "project", "patch", "none"] | None = field(
        default=None,
        metadata={"help": "prune (SPLoRA), project (Safe LoRA), patch (the safety patch: a few optimizer steps of the "
                          "LoRA on the probe's refusal pairs and benign anchors at the end of training, nothing "
                          "removed; the patch_* fields) or none (monitor only). Default (the project's efficacy "
                          "study, docs/efficacy.md): with a safety probe (metric='probe'), patch, or prune when a "
                          "selection rule is named (select, k, fraction, threshold, budget); without one, none: "
                          "selection by E-DIEM or cosine was no better than a random choice of the same module "
                          "kinds, so it is not acted on unless action='prune' is passed."},
    )
    patch_stop: Literal["refusal_rate", "refusal_loss"] = field(
        default="refusal_rate",
        metadata={"help": "action='patch': stop at the first step whose refusal rate on the probe's own prompts "
                          "(greedy) closes patch_restore of the gap to the aligned model's, or whose probe refusal "
                          "loss is at most the aligned model's (refusal_loss)."},
    )
    patch_restore: float = field(
        default=1.0, metadata={"help": "action='patch', patch_stop='refusal_rate': share of the refusal-rate gap."}
    )
    patch_lr: float = field(default=4e-4, metadata={"help": "action='patch': AdamW learning rate."})
    patch_max_steps: int = field(default=40, metadata={"help": "action='patch': most optimizer steps."})
    patch_factors: Literal["A", "both"] = field(
        default="A",
        metadata={"help": "action='patch': the LoRA factors trained: A (lora_A only: the patch changes which inputs "
                          "the LoRA responds to, not the directions it writes; measured to over-refuse less) or both."},
    )
    patch_anchors: int = field(
        default=4,
        metadata={"help": "action='patch': benign anchor pairs per batch of 10 probe pairs (benign_prompts answered "
                          "by the trained LoRA itself; 0: the plain patch)."},
    )
    adapter_name: str | None = field(default=None, metadata={"help": "Adapter to score; default: the active one."})
    score_every_n_steps: int = field(default=50, metadata={"help": "Scoring interval in optimizer steps (0: only at the end)."})
    probe_every_n_steps: int | None = field(
        default=None,
        metadata={"help": "Steps between the probes' attributions (a forward and backward pass over each probe: "
                          "most of a scoring call's cost). None: at every scoring step; 0: only where the selection "
                          "is acted on (end of training, acted checkpoints). The other scoring steps log E-DIEM, "
                          "cosine and the safety probe's refusal loss (forward passes only)."},
    )
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
    alignment_placement: Literal["stream", "cpu", "resident"] = field(
        default="stream",
        metadata={"help": "Where V lives while training: stream (kept on the CPU, one module at a time on the "
                          "LoRA weights' device when scored), cpu (kept and scored on the CPU) or resident (all "
                          "of V on the LoRA weights' device: fastest, 8.6 GB fp32 at 7B q/k/v/o)."},
    )
    alert_threshold: float | None = field(
        default=None, metadata={"help": "wandb.alert when a layer's E-DIEM first exceeds this value."}
    )
    refusal_loss_alert: float | None = field(
        default=None,
        metadata={"help": "Alert when the safety probe's refusal loss exceeds the aligned model's (adapter "
                          "disabled) by more than this many nats; needs probe."},
    )
    refusal_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "Held-out harmful prompts for the refusal rate (greedy generation); never the "
                          "probe's or the evaluation's prompts."},
    )
    refusal_every_n_steps: int = field(
        default=0, metadata={"help": "Measure the refusal rate on refusal_prompts every N steps (0: off)."}
    )
    benign_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "Benign requests for the repair's over-refusal guard (select={'name': 'repair', 'stop': "
                          "'refusal_rate', 'over_refusal_margin': 0.05}) or the anchors of action='patch' (default "
                          "there: splora_callback.patch.DEFAULT_ANCHOR_REQUESTS); never alignment or evaluation "
                          "prompts."},
    )
    refusal_max_new_tokens: int = field(
        default=32, metadata={"help": "Tokens generated per refusal prompt (refusal keywords come early)."}
    )
    refusal_rate_alert: float | None = field(
        default=None, metadata={"help": "Alert when the refusal rate falls below this value (0-1)."}
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop training after this many consecutive safety checks past refusal_loss_alert "
                          "or refusal_rate_alert (control.should_training_stop, as EarlyStoppingCallback)."},
    )
    permutation_seed: int = field(
        default=0, metadata={"help": "Seed of the permutation null (local RNG only)."}
    )
    # Live objects, not config data: SPLoRAConfig(probe=..., utility=...) hands them to its
    # ``runtime`` (:class:`~splora_callback.runtime.SPLoRARuntime`); they are never serialised
    # (``to_dict`` is plain data) and argument parsers never see them. Read them as config.probe.
    probe: InitVar[Any] = None  # SafetyProbe: metric='probe', the refusal-loss signal, the repair
    utility: InitVar[Any] = None  # UtilityProbe (task examples); default in the callback: training data
    utility_examples: int = field(
        default=32, metadata={"help": "Examples of the utility probe the callback builds when utility is None."}
    )
    strict: bool = field(
        default=False,
        metadata={"help": "Raise when scoring or the action fails during or after training. Default: log the error "
                          "and keep the training (the live model left as trained, trainer.save_model() saves it)."},
    )
    # Deprecated alias of permutation_seed (clashed with TrainingArguments.seed in HfArgumentParser);
    # an InitVar, so argument parsers never see it. Removed in 0.3.
    seed: InitVar[int | None] = None

    def __post_init__(self, probe: Any = None, utility: Any = None, seed: int | None = None) -> None:
        self._runtime = SPLoRARuntime(probe, utility)
        if seed is not None:
            warnings.warn(
                "SPLoRAConfig(seed=...) is deprecated: use permutation_seed= (seed clashes with "
                "TrainingArguments.seed). The alias will be removed in 0.3.", FutureWarning, stacklevel=3,
            )
            self.permutation_seed = seed
        check_field_types(self)
        if self.metric is None:
            self.metric = "probe" if self.probe is not None else "ediem"
        _check_choice("metric", self.metric, METRICS)
        _check_choice("null", self.null, NULLS)
        if self.action is None:  # the efficacy study's order (docs/efficacy.md): the patch with a probe
            named = self.select is not None or any(getattr(self, name) is not None for name in PARAMETERS if name != "restore")
            self.action = ("prune" if named else "patch") if self.metric == "probe" else "none"
        _check_choice("action", self.action, ACTIONS)
        self._resolve_rule()
        if self.granularity is None:
            self.granularity = self.rule.granularity
        _check_choice("granularity", self.granularity, GRANULARITIES)
        if self.metric == "probe" and self.probe is None:
            raise ValueError("SPLoRAConfig.probe=None: metric='probe' needs probe=SafetyProbe(...).")
        if self.action == "patch":
            _check_patch(self)
        _check_choice("alignment_dtype", self.alignment_dtype, DTYPES)
        _check_choice("alignment_placement", self.alignment_placement, PLACEMENTS)
        _check_safety(self)
        if self.permutations < 16:
            raise ValueError(f"SPLoRAConfig.permutations={self.permutations!r}: must be >= 16 (fewer make the "
                             "permutation null too coarse for a robust z-score).")
        if not isinstance(self.score_every_n_steps, int) or self.score_every_n_steps < 0:
            raise ValueError(
                f"SPLoRAConfig.score_every_n_steps={self.score_every_n_steps!r}: must be an integer >= 0 "
                "(0 scores only at the end of training)."
            )
        if self.probe_every_n_steps is not None:
            _check_probe_schedule(self)
        if not isinstance(self.restore, (int, float)) or not 0 < self.restore <= 1:
            raise ValueError(f"SPLoRAConfig.restore={self.restore!r}: the share of the refusal-loss increase to "
                             "undo, in (0, 1] (e.g. 0.8).")
        if self.granularity == "component" and self.action == "project":
            raise ValueError(
                "SPLoRAConfig.action='project' with granularity='component': projection acts on whole layers; "
                "use action='prune' (or 'none') with components."
            )
        if not isinstance(self.utility_examples, int) or self.utility_examples < 1:
            raise ValueError(f"SPLoRAConfig.utility_examples={self.utility_examples!r}: must be an integer >= 1.")
        if self.metric != "probe" and self.base_model is None:
            raise ValueError(
                f"SPLoRAConfig.base_model=None: metric={self.metric!r} needs the unaligned base model "
                "(local directory or Hub id) to build the alignment subspace, or base_model='auto' to infer "
                "it from the aligned model's card or a table of known pairs (what SPLoRACallback() does)."
            )

    def _resolve_rule(self) -> None:
        """``select`` resolved once into :attr:`rule` (:func:`~splora_callback.rules.resolve_rule`);
        flat keywords choose and parametrise it (``k=10`` alone means top_k), and one the rule
        ignores is an error, never silently dropped. ``select`` and the flat fields then hold the
        rule's name and parameters, so that :meth:`to_dict` round-trips."""
        given = {name: getattr(self, name) for name in ("k", "fraction", "threshold", "budget")
                 if getattr(self, name) is not None}
        select = self.select if self.select is not None else infer_rule_name(given, self.metric)
        if self.select is None and not given and self.action == "patch":
            select = "fraction"  # what pruning would take, logged; the patch acts (no measured stop to run)
        flat = {**given, "restore": self.restore}
        if isinstance(select, dict):  # {"name": ..., **parameters} with flat keywords: one set of parameters
            clashes = [key for key in flat if key in select and select[key] != flat[key]
                       and not (key == "restore" and flat[key] == RESTORE_DEFAULT)]
            if clashes:
                raise ValueError(f"SPLoRAConfig: {', '.join(f'{key}={flat[key]!r}' for key in clashes)} and select's "
                                 f"{', '.join(f'{key}={select[key]!r}' for key in clashes)} disagree; set it once.")
            select = {**flat, **select}
        rule = resolve_rule(select, flat)
        check_unused_parameters(rule, given)
        rule.check(self.metric)
        self._rule = rule
        parameters = rule.parameters()
        for name in PARAMETERS:
            if name in parameters and parameters[name] is not None:
                setattr(self, name, parameters[name])
        defaults = {item.name: item.default for item in dataclasses.fields(rule)} if dataclasses.is_dataclass(rule) else {}
        extra = {key: value for key, value in parameters.items()
                 if key not in PARAMETERS and (key not in defaults or value != defaults[key])}
        self.select = {"name": rule.name, **extra} if extra and not isinstance(rule, FunctionRule) else rule.name

    @property
    def rule(self) -> Rule:
        """The selection rule ``select`` names, resolved on construction."""
        return self._rule

    def plan(self) -> tuple[str, bool]:
        """What the callback will do, in one short line (shown at train start at the default log
        level): what is monitored, what will act, and how to turn the repair on; and whether it is
        a warning: acting by a geometric score, which the efficacy study found no better than a
        random choice of layers of the same module kinds."""
        if self.metric == "probe":
            watched = "the refusal loss on the safety probe" + (" and E-DIEM" if self.base_model else "")
        else:
            watched = "E-DIEM and cosine per LoRA layer"
        every = f"every {self.score_every_n_steps} steps" if self.score_every_n_steps else "at the end of training"
        if self.probe_every_n_steps is not None and self.score_every_n_steps:
            every += (f" (the probes' attributions every {self.probe_every_n_steps})" if self.probe_every_n_steps
                      else " (the probes' attributions only where it acts)")
        monitored = f"SPLoRA: monitoring {watched} {every}"
        repair = "to repair, pass probe=SafetyProbe.from_pairs(tokenizer, harmful_refusal_pairs)"
        when = " and ".join(w for w, on in (("at checkpoints", self.prune_at_checkpoints),
                                            ("at the end of training", self.prune_at_end)) if on)
        if self.action == "none" or not when:
            if self.metric == "probe":
                return f"{monitored}; nothing is acted on (action='none').", False
            return f"{monitored}; nothing is pruned ({repair}).", False
        if self.action == "patch":
            stop = (f"the probe's refusal rate closes {self.patch_restore:.0%} of the gap to the aligned model's"
                    if self.patch_stop == "refusal_rate" else "the probe's refusal loss reaches the aligned model's")
            anchors = (f" + {self.patch_anchors} benign anchors ({len(self.benign_prompts)} benign_prompts answered by "
                       "the trained LoRA)" if self.benign_prompts else f" + {self.patch_anchors} benign anchors (the "
                       "library's 24 default requests answered by the trained LoRA)") if self.patch_anchors else ""
            then = "then" if every == "at the end of training" else "at the end of training,"
            trained = "its lora_A factors" if self.patch_factors == "A" else "its lora_A and lora_B factors"
            return (f"{monitored}; {then} patch the LoRA ({trained}): up to {self.patch_max_steps} steps on the "
                    f"probe's refusal pairs{anchors} per batch, until {stop} (nothing removed; the {self.rule.name} "
                    "rule's selection is logged, not acted on).", False)
        unit = "rank-one components" if self.granularity == "component" else "LoRA layers"
        verb = {"prune": "prune", "project": "project"}.get(self.action, self.action)
        act = f"{monitored}; {when}, {verb} {unit} by {self.metric}: {self.rule.describe()}"
        if self.metric == "probe":
            return f"{act}.", False
        return (f"{act}. The efficacy study found selection by {self.metric} no better than a random choice of the "
                f"same module kinds; {repair} (the measured component repair)."), True

    @property
    def runtime(self) -> SPLoRARuntime:
        """The live objects given with this config (the probes): what ``to_dict`` leaves out."""
        return self._runtime

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data: ``SPLoRAConfig(**config.to_dict(), probe=config.probe,
        utility=config.utility) == config`` (the probes are :attr:`runtime` objects, not data)."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}


class ConfigTypeError(TypeError, ValueError):
    """A field of :class:`SPLoRAConfig` has the wrong type (a ``ValueError`` too, as every other
    bad config value, so that one ``except ValueError`` catches both)."""


def _type_ok(value: object, expected: Any) -> bool:
    """Whether ``value`` has the annotated type ``expected`` (bool is not a number, a string is
    not a number, an int is a float; ``Literal`` values are checked by :func:`_check_choice`)."""
    origin, arguments = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, argument) for argument in arguments)
    if expected is type(None):
        return value is None
    if origin is Literal:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(item, arguments[0]) for item in value)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    """``int | None`` -> ``"an integer or None"``: the expected type, in the error message's words."""
    names = {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "None"}
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(argument) for argument in typing.get_args(expected))
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(expected))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(expected)[0]).removeprefix('a ')}s"
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def check_field_types(config: SPLoRAConfig) -> None:
    """Every field of ``config`` has its annotated type, checked on construction (a wrong type
    would otherwise surface as a raw ``TypeError`` at the last training step).

    Raises:
        ConfigTypeError: names the field, the value, its type and the expected type.
    """
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value, expected = getattr(config, item.name), hints[item.name]
        if item.name == "select" and (isinstance(value, (Rule, dict)) or callable(value)):
            continue  # a rule object, {"name": ..., **parameters} or a function: resolve_rule checks it
        if not _type_ok(value, expected):
            raise ConfigTypeError(
                f"SPLoRAConfig.{item.name}={value!r:.80} has type {type(value).__name__}; expected "
                f"{_type_name(expected)}."
            )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SPLoRAConfig.{name}={value!r}: expected one of {', '.join(choices)}.")


def _check_probe_schedule(config: SPLoRAConfig) -> None:
    """``probe_every_n_steps``: an integer >= 0, with a probe to schedule and geometric scores for
    the steps in between."""
    every = config.probe_every_n_steps
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"SPLoRAConfig.probe_every_n_steps={every!r}: must be None or an integer >= 0 (0: the "
                         "probes only where the selection is acted on).")
    if config.probe is None:
        raise ValueError(f"SPLoRAConfig.probe_every_n_steps={every} schedules the probes, but probe=None; pass "
                         "probe=SafetyProbe(...) or drop probe_every_n_steps.")
    if config.base_model is None:
        raise ValueError(f"SPLoRAConfig.probe_every_n_steps={every}: the scoring steps between the probes log "
                         "E-DIEM and cosine, which need base_model (the unaligned base); pass base_model, or "
                         "score less often with score_every_n_steps.")


def _check_patch(config: SPLoRAConfig) -> None:
    """``action="patch"``: a probe to patch on, benign anchors when asked for, the patch_* ranges."""
    from .patch import check_patch_options

    if config.probe is None:
        raise ValueError("SPLoRAConfig.action='patch' trains the LoRA on the safety probe's refusal pairs: pass "
                         "probe=SafetyProbe.from_pairs(tokenizer, harmful_refusal_pairs).")
    _check_choice("patch_stop", config.patch_stop, PATCH_STOPS)
    if config.prune_at_checkpoints:
        raise ValueError("SPLoRAConfig.action='patch' acts at the end of training only (it trains the LoRA): set "
                         "prune_at_checkpoints=False, or patch a checkpoint's adapter afterwards with safety_patch.")
    try:
        check_patch_options(lr=config.patch_lr, batch_size=10, steps=None, max_steps=config.patch_max_steps,
                            stop=config.patch_stop, restore=config.patch_restore, anchors=config.patch_anchors,
                            factors=config.patch_factors, where="SPLoRAConfig")
    except ValueError as error:  # the library's names for them are the config's, prefixed
        text = str(error)
        for name in ("lr", "max_steps", "restore", "anchors", "factors"):
            text = text.replace(f": {name}=", f".patch_{name}=")
        raise ValueError(text) from None


def _check_safety(config: SPLoRAConfig) -> None:
    """The direct safety signal's fields (refusal loss, refusal rate, early stop): each names its need."""
    if config.refusal_loss_alert is not None and config.probe is None:
        raise ValueError(
            f"SPLoRAConfig.refusal_loss_alert={config.refusal_loss_alert!r} needs probe=SafetyProbe(...): the "
            "refusal loss is the probe's."
        )
    if not isinstance(config.refusal_every_n_steps, int) or config.refusal_every_n_steps < 0:
        raise ValueError(f"SPLoRAConfig.refusal_every_n_steps={config.refusal_every_n_steps!r}: must be an integer "
                         ">= 0 (0: no refusal rate).")
    if not isinstance(config.refusal_max_new_tokens, int) or config.refusal_max_new_tokens < 1:
        raise ValueError(f"SPLoRAConfig.refusal_max_new_tokens={config.refusal_max_new_tokens!r}: must be an "
                         "integer >= 1.")
    prompts = config.refusal_prompts
    if prompts is not None and (isinstance(prompts, str) or not prompts
                                or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise ValueError(f"SPLoRAConfig.refusal_prompts={prompts!r:.80}: must be a non-empty list of prompts.")
    shared = sorted(set(getattr(config.probe, "prompts", None) or ()) & set(prompts or ()))
    if shared:  # checked here, on construction: not after the trackers opened a run
        raise ValueError(
            f"SPLoRAConfig.refusal_prompts: {len(shared)} prompt(s) are also safety-probe prompts (e.g. "
            f"{shared[0][:60]!r}); the refusal rate must be measured on held-out prompts.")
    benign = config.benign_prompts
    if benign is not None and (isinstance(benign, str) or not benign
                               or not all(isinstance(p, str) and p.strip() for p in benign)):
        raise ValueError(f"SPLoRAConfig.benign_prompts={benign!r:.80}: must be a non-empty list of benign requests.")
    if benign is None and getattr(config.rule, "over_refusal_margin", None) is not None:
        raise ValueError("SPLoRAConfig.select: over_refusal_margin guards against over-refusal on benign requests: "
                         "pass benign_prompts (a few benign requests never used in alignment or evaluation).")
    if benign is not None and getattr(config.rule, "over_refusal_margin", None) is None and not (
            config.action == "patch" and config.patch_anchors):
        raise ValueError("SPLoRAConfig.benign_prompts is set but no rule uses them: pass select={'name': 'repair', "
                         "'stop': 'refusal_rate', 'over_refusal_margin': 0.05}, or drop benign_prompts.")
    if config.refusal_every_n_steps and prompts is None:
        raise ValueError(f"SPLoRAConfig.refusal_every_n_steps={config.refusal_every_n_steps} needs refusal_prompts "
                         "(a few held-out harmful prompts).")
    if prompts is not None and not config.refusal_every_n_steps:
        raise ValueError("SPLoRAConfig.refusal_prompts is set but refusal_every_n_steps=0 never uses it; pass "
                         "refusal_every_n_steps (e.g. 200).")
    if config.refusal_rate_alert is not None:
        if not 0 <= config.refusal_rate_alert <= 1:
            raise ValueError(f"SPLoRAConfig.refusal_rate_alert={config.refusal_rate_alert!r}: a rate in [0, 1].")
        if prompts is None:
            raise ValueError("SPLoRAConfig.refusal_rate_alert needs refusal_prompts and refusal_every_n_steps.")
    patience = config.early_stopping_patience
    if patience is not None:
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"SPLoRAConfig.early_stopping_patience={patience!r}: must be an integer >= 1.")
        if config.refusal_loss_alert is None and config.refusal_rate_alert is None:
            raise ValueError("SPLoRAConfig.early_stopping_patience needs a safety alert to count: set "
                             "refusal_loss_alert (with a probe) or refusal_rate_alert (with refusal_prompts).")


# the probes given to SPLoRAConfig(...) live in its runtime; read-only views keep config.probe working
SPLoRAConfig.probe = property(lambda self: self._runtime.probe, doc="The SafetyProbe (``runtime.probe``).")
SPLoRAConfig.utility = property(lambda self: self._runtime.utility, doc="The UtilityProbe (``runtime.utility``).")
