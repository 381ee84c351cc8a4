"""Selection rules: which layers (or rank-one components) to act on, one object per rule.

A rule holds its parameters, says what it needs (the safety probe, the utility probe, the live
model for forward passes) and at which granularity it selects by default, checks itself, and
chooses: ``rule.select(scores, context) -> Selection``. :data:`RULES` maps names to rule classes;
:func:`register_rule` adds one, and :func:`resolve_rule` turns what ``SPLoRAConfig.select``
accepts (a name, a ``{"name": ..., **params}`` dict, a :class:`Rule` or a plain function) into a
rule, once, on construction. Nothing outside this module compares rule names.

A rule of your own is one class (or function) and one call::

    @dataclass(frozen=True)
    class AboveMedianProbe(Rule):
        name: ClassVar[str] = "above_median_probe"
        needs_probe: ClassVar[bool] = True

        def select(self, scores, context):
            suspicion = scores.suspicion()
            middle = statistics.median(suspicion.values())
            return [name for name in rank_layers(scores) if suspicion[name] > middle]

        def describe(self):
            return "the layers whose probe score is above the median"

    register_rule(AboveMedianProbe.name, AboveMedianProbe)
    SPLoRACallback(metric="probe", probe=probe, select="above_median_probe")
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .repair import predicted_repair, repair_selection
from .scoring import LayerScores
from .selection import REPAIR_ORDERS, Selection, select_layers

# the flat SPLoRAConfig keywords that are rule parameters (k=10 alone means top_k)
PARAMETERS = ("k", "fraction", "threshold", "budget", "restore")
PROBE_FILES = ["--probe-prompts", "HARMFUL_PROMPTS.jsonl", "--utility-examples", "TASK_EXAMPLES.jsonl"]  # placeholders in the splora prune command of an error message


@dataclass
class SelectionContext:
    """What a rule may use besides the scores; filled by the callback (or the CLI).

    Attributes:
        model: the live PEFT model, for rules that measure candidates with forward passes.
        probe: the safety probe (``SafetyProbe``), when configured.
        aligned_refusal_loss: the aligned model's refusal loss on that probe (nats).
        adapter_name: the adapter being scored.
        acts: True where the selection is acted on (end of training, acted checkpoints); a
            measuring rule may use a cheaper stand-in elsewhere.
        progress: show a progress bar of long work (the main process, tqdm not disabled).
        tokenizer: for rules that generate answers (the repair's refusal-rate stop).
        benign_prompts: benign requests for an over-refusal guard (``SPLoRAConfig.benign_prompts``).
        notes: what the rule wants kept in the history entry and the report (e.g. the measured
            stop's trace under ``"repair_trace"``).
    """

    model: nn.Module | None = None
    probe: Any = None
    aligned_refusal_loss: float | None = None
    adapter_name: str | None = None
    acts: bool = True
    progress: bool = False
    tokenizer: Any = None
    benign_prompts: Sequence[str] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    """Base of every selection rule; subclasses are frozen dataclasses of their parameters.

    Class attributes: ``name`` (registry key), ``needs_probe`` / ``needs_utility`` (the safety /
    utility probe's attributions), ``needs_model`` (forward passes on the live model where it
    acts: not under FSDP / ZeRO-3 sharding), ``granularity`` (the default: ``"layer"`` or
    ``"component"``).
    """

    name: ClassVar[str] = "rule"
    needs_probe: ClassVar[bool] = False
    needs_utility: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    granularity: ClassVar[str] = "layer"

    def select(self, scores: LayerScores, context: SelectionContext) -> Selection:
        """The units to act on, most suspect first: module names, or ``{name: [component indices]}``."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the rule chooses, in a few words (``config.plan()``'s sentence, the card, the report)."""
        return f"the {self.name} selection"

    def check(self, metric: str) -> None:
        """Raise ``ValueError`` (naming the field, the value and the fix) on bad parameters."""

    def selects_every_layer(self, layers: int) -> bool:
        """Whether the rule, by its parameters alone, takes every one of ``layers`` layers."""
        return False

    def cli_arguments(self) -> list[str] | None:
        """The ``splora prune`` options that apply this rule to a saved adapter (capitals: files the
        user provides), or None where the command has none."""
        return None

    def parameters(self) -> dict[str, Any]:
        """The rule's parameters (its dataclass fields)."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}


def _needs_probe_metric(rule: Rule, metric: str) -> None:
    if metric != "probe":
        raise ValueError(
            f"SPLoRAConfig.metric={metric!r}: select={rule.name!r} trades the safety probe's gain against the "
            "utility probe's cost; set metric='probe' and probe=SafetyProbe(...).")


@dataclass(frozen=True)
class TopK(Rule):
    """The ``k`` most suspect units."""

    name: ClassVar[str] = "top_k"
    k: int | None = None

    def check(self, metric: str) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"SPLoRAConfig.k={self.k!r}: select='top_k' needs an integer k >= 0.")

    def select(self, scores: LayerScores, context: SelectionContext) -> Selection:
        return select_layers(scores, "top_k", k=self.k)

    def describe(self) -> str:
        return f"the top {self.k}"

    def cli_arguments(self) -> list[str]:
        return ["--top-k", str(self.k)]

    def selects_every_layer(self, layers: int) -> bool:
        return self.k >= layers


@dataclass(frozen=True)
class Fraction(Rule):
    """``round(fraction x eligible)`` most suspect units."""

    name: ClassVar[str] = "fraction"
    fraction: float = 0.25

    def check(self, metric: str) -> None:
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"SPLoRAConfig.fraction={self.fraction!r}: select='fraction' needs 0 <= fraction <= 1.")

    def select(self, scores: LayerScores, context: SelectionContext) -> Selection:
        return select_layers(scores, "fraction", fraction=self.fraction)

    def describe(self) -> str:
        return f"{self.fraction:.0%}"

    def cli_arguments(self) -> list[str]:
        return ["--fraction", str(self.fraction)]

    def selects_every_layer(self, layers: int) -> bool:
        return math.floor(self.fraction * layers + 0.5) >= layers


@dataclass(frozen=True)
class Threshold(Rule):
    """Every unit past ``threshold`` (E-DIEM > t, cosine < t, probe > t)."""

    name: ClassVar[str] = "threshold"
    threshold: float | None = None

    def check(self, metric: str) -> None:
        if self.threshold is None:
            raise ValueError("SPLoRAConfig.threshold=None: select='threshold' needs a number.")

    def select(self, scores: LayerScores, context: SelectionContext) -> Selection:
        return select_layers(scores, "threshold", threshold=self.threshold)

    def describe(self) -> str:
        return f"those past {self.threshold}"

    def cli_arguments(self) -> list[str]:
        return ["--threshold", str(self.threshold)]


@dataclass(frozen=True)
class Budget(Rule):
    """Best safety gain per task cost until the predicted task-loss increase reaches ``budget``."""

    name: ClassVar[str] = "budget"
    needs_probe: ClassVar[bool] = True
    needs_utility: ClassVar[bool] = True
    budget: float | None = None
    k: int | None = None  # caps the number of units taken

    def check(self, metric: str) -> None:
        if self.budget is None or not self.budget >= 0:
            raise ValueError(
                f"SPLoRAConfig.budget={self.budget!r}: select='budget' needs budget >= 0, the share of the task "
                "loss the repair may cost (e.g. 0.05).")
        _needs_probe_metric(self, metric)

    def select(self, scores: LayerScores, context: SelectionContext) -> Selection:
        return select_layers(scores, "budget", budget=self.budget, k=self.k)

    def describe(self) -> str:
        return f"a budget of {self.budget} x the task loss (predicted)"

    def cli_arguments(self) -> list[str]:
        return [*PROBE_FILES, "--budget", str(self.budget)] + (["--top-k", str(self.k)] if self.k is not None else [])


@dataclass(frozen=True)
class Repair(Rule):
    """Units in a repair order, with a measured stop: the fewest whose removal closes ``restore``
    of the gap to the aligned model, in refusal loss (``stop="refusal_loss"``) or in the greedy
    refusal rate on the probe's harmful prompts (``stop="refusal_rate"``), forward passes or
    generations where it acts.

    Attributes:
        restore: share of the gap to close, in (0, 1].
        stop: ``"refusal_loss"`` (teacher-forced, nats) or ``"refusal_rate"`` (answers judged).
        order: ``"ratio"`` (safety gain per task cost), ``"difference"`` (gain minus
            ``utility_weight`` x cost) or ``"safety"`` (gain alone).
        utility_weight: lambda of the difference order (both attributions are nats on their probe).
        trim: after the stop, put-back trials, costliest units for the task first (0: none).
        over_refusal_margin: with ``stop="refusal_rate"`` and benign prompts
            (``SPLoRAConfig.benign_prompts``), a removal that raises their refusal rate above the
            aligned model's + this margin is not taken (None: no guard).
        max_new_tokens: tokens generated per answer by the rate stop.
    """

    name: ClassVar[str] = "repair"
    needs_probe: ClassVar[bool] = True
    needs_utility: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True
    granularity: ClassVar[str] = "component"
    restore: float = 0.8
    stop: str = "refusal_loss"
    order: str = "ratio"
    utility_weight: float = 1.0
    trim: int = 0
    over_refusal_margin: float | None = None
    max_new_tokens: int = 8

    def check(self, metric: str) -> None:
        _needs_probe_metric(self, metric)
        if isinstance(self.restore, bool) or not isinstance(self.restore, (int, float)) or not 0 < self.restore <= 1:
            raise ValueError(f"SPLoRAConfig.restore={self.restore!r}: the share of the refusal increase to "
                             "undo, in (0, 1] (e.g. 0.8).")
        if self.stop not in STOPS:
            raise ValueError(f"select='repair': stop={self.stop!r}; expected one of {', '.join(STOPS)}.")
        if self.order not in REPAIR_ORDERS:
            raise ValueError(f"select='repair': order={self.order!r}; expected one of {', '.join(REPAIR_ORDERS)}.")
        numbers = {"utility_weight": self.utility_weight, "over_refusal_margin": self.over_refusal_margin}
        for key, value in numbers.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"select='repair': {key}={value!r} must be a finite number >= 0.")
        for key in ("trim", "max_new_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (key == "max_new_tokens"):
                raise ValueError(f"select='repair': {key}={value!r} must be an integer >= {int(key == 'max_new_tokens')}.")
        if self.over_refusal_margin is not None and self.stop != "refusal_rate":
            raise ValueError("select='repair': over_refusal_margin guards the refusal-rate stop: set "
                             "stop='refusal_rate', or drop over_refusal_margin.")

    def select(self, scores: LayerScores, context: SelectionContext) -> Selection:
        if not context.acts or context.model is None:  # the first-order stand-in: no forward pass
            return predicted_repair(scores, context.aligned_refusal_loss, self.restore, self.order, self.utility_weight)
        if self.over_refusal_margin is not None and not context.benign_prompts:
            raise ValueError("select='repair': over_refusal_margin needs benign requests to guard: "
                             "SPLoRAConfig.benign_prompts (splora prune --benign-prompts FILE).")
        margin = self.over_refusal_margin
        selected, trace = repair_selection(
            context.model, scores, context.probe, context.aligned_refusal_loss, self.restore, context.adapter_name,
            progress=context.progress, stop=self.stop, order=self.order, utility_weight=self.utility_weight,
            trim=self.trim, tokenizer=context.tokenizer, benign_prompts=context.benign_prompts,
            over_refusal_margin=margin, max_new_tokens=self.max_new_tokens)
        context.notes["repair_trace"] = trace.to_dict()
        return selected

    def describe(self) -> str:
        signal = "refusal rate on the probe's prompts" if self.stop == "refusal_rate" else "refusal-loss increase"
        order = {"ratio": "", "difference": ", safety gain minus task cost first",
                 "safety": ", safety gain first"}[self.order]
        trim = f", then up to {self.trim} put back" if self.trim else ""
        return f"a measured stop at {self.restore:.0%} of the {signal} undone{order}{trim}"

    def cli_arguments(self) -> list[str]:
        extra = [item for key, value in self.parameters().items() if key != "restore" and value != getattr(Repair, key)
                 for item in ("--rule-option", f"{key}={json.dumps(value) if not isinstance(value, str) else value}")]
        return [*PROBE_FILES, "--restore", str(self.restore), *extra]


STOPS = ("refusal_loss", "refusal_rate")


@dataclass(frozen=True)
class FunctionRule(Rule):
    """A plain function ``(scores, context) -> Selection`` used as a rule (``select=my_function``)."""

    function: Callable[[LayerScores, SelectionContext], Selection] | None = None
    label: str = "custom"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    def select(self, scores: LayerScores, context: SelectionContext) -> Selection:
        return self.function(scores, context)

    def describe(self) -> str:
        return f"the units {self.label}() returns"


RULES: dict[str, type[Rule] | Callable[..., Rule]] = {
    rule.name: rule for rule in (TopK, Fraction, Threshold, Budget, Repair)
}


def register_rule(name: str, rule: type[Rule] | Callable[..., Any]) -> None:
    """Make ``name`` a value of ``SPLoRAConfig.select`` (and ``splora prune --select``).

    Args:
        rule: a :class:`Rule` subclass (built with the config's parameters it declares), or a
            function ``(scores, context) -> Selection``.

    Raises:
        ValueError: ``name`` is a built-in rule's, or not an identifier.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_rule: the name {name!r} must be an identifier (e.g. 'above_median').")
    if name in ("top_k", "fraction", "threshold", "budget", "repair"):
        raise ValueError(f"register_rule: {name!r} is a built-in rule; choose another name.")
    RULES[name] = rule


def resolve_rule(select: Any, parameters: dict[str, Any]) -> Rule:
    """The rule ``SPLoRAConfig.select`` names: a registered name (parameters taken from the config's
    flat keywords that the rule declares), ``{"name": ..., **parameters}``, a :class:`Rule`
    instance, or a function.

    Raises:
        ValueError: an unknown name (with the close matches and how to register one).
    """
    if isinstance(select, Rule):
        return select
    if isinstance(select, dict):
        params = {key: value for key, value in select.items() if key != "name"}
        return resolve_rule(select.get("name"), params)
    if callable(select) and not isinstance(select, type):
        return FunctionRule(select, getattr(select, "__name__", "custom"))
    if isinstance(select, type) and issubclass(select, Rule):
        return _build(select, parameters)
    factory = RULES.get(select) if isinstance(select, str) else None
    if factory is None:
        close = difflib.get_close_matches(str(select), RULES, n=3)
        raise ValueError(
            f"SPLoRAConfig.select={select!r}: expected one of {', '.join(RULES)}"
            + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
            + "; a rule of your own is added with splora_callback.rules.register_rule(name, rule).")
    if isinstance(factory, type) and issubclass(factory, Rule):
        return _build(factory, parameters)
    return FunctionRule(factory, select)


def _build(rule: type[Rule], parameters: dict[str, Any]) -> Rule:
    """``rule(**parameters it declares)``; parameters left at None take the rule's defaults."""
    declared = {item.name for item in dataclasses.fields(rule)}
    return rule(**{key: value for key, value in parameters.items() if key in declared and value is not None})


def infer_rule_name(given: dict[str, Any], metric: str) -> str:
    """The rule flat keywords imply: ``k=10`` alone means top_k, ``budget`` (with a ``k`` cap)
    budget, nothing the measured repair with a probe (the study's best rule), else fraction.

    Raises:
        ValueError: two keywords that choose different rules.
    """
    default = "repair" if metric == "probe" else "fraction"
    inferred = {(): default, ("k",): "top_k", ("fraction",): "fraction", ("threshold",): "threshold",
                ("budget",): "budget", ("budget", "k"): "budget"}.get(tuple(sorted(given)))
    if inferred is None:
        raise ValueError(
            f"SPLoRAConfig: {' and '.join(f'{name}={value!r}' for name, value in given.items())} are both set; pass "
            "select= ('top_k', 'threshold' or 'budget') to say which one selects the layers.")
    return inferred


def check_unused_parameters(rule: Rule, given: dict[str, Any]) -> None:
    """A flat keyword the rule does not declare is an error, never silently dropped."""
    declared = {item.name for item in dataclasses.fields(rule)} if dataclasses.is_dataclass(rule) else set()
    for key, value in given.items():
        if key not in declared:
            users = [name for name, factory in RULES.items() if isinstance(factory, type)
                     and key in {item.name for item in dataclasses.fields(factory)}]
            wanted = f"pass select={users[0]!r} to select by {key}, or drop {key}" if users else f"drop {key}"
            raise ValueError(f"SPLoRAConfig.{key}={value!r} is set but select={rule.name!r} ignores it; {wanted}.")


def rule_from_options(select: str | None, parameters: dict[str, Any]) -> Rule | None:
    """The rule of ``splora prune`` / ``splora score``'s options: ``--select NAME`` with the flags as
    its parameters, else the one flag given (``--restore``: repair, ``--budget``: budget, ``--top-k``,
    ``--fraction``, ``--threshold``); None when no option selects."""
    given = {key: value for key, value in parameters.items() if value is not None}
    if select is not None:
        return resolve_rule(select, given)
    if "restore" in given:
        return resolve_rule("repair", given)
    if "budget" in given:
        return Budget(given["budget"], given.get("k"))
    for rule in (TopK, Fraction, Threshold):
        (field_name,) = [item.name for item in dataclasses.fields(rule)]
        if field_name in given:
            return rule(given[field_name])
    return None


def load_rule(spec: str) -> str:
    """``module:attribute`` (``--rule``): import it (the current folder first on the path), register
    what it names (a :class:`Rule` subclass or instance, or a function) under its name, return the name.

    Raises:
        ValueError: not ``module:attribute``, the module or attribute missing, or not a rule.
    """
    import importlib
    import os
    import sys

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--rule {spec!r}: expected MODULE:ATTRIBUTE, e.g. my_rules:AboveMedianProbe.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--rule {spec!r}: {error}; the module must be importable from the current folder "
                         "or the Python path.") from error
    if isinstance(found, Rule):
        found = type(found)
    if isinstance(found, type) and issubclass(found, Rule):
        name = found.name
    elif callable(found):
        name = found.__name__
    else:
        raise ValueError(f"--rule {spec!r} is a {type(found).__name__}; expected a Rule subclass or a function "
                         "(scores, context) -> selection.")
    if RULES.get(name) is not found:
        register_rule(name, found)
    return name
