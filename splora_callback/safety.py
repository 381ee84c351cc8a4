"""The direct safety signal the dashboard leads with: refusal loss and refusal rate, alerts, early stop.

Geometric scores (E-DIEM, cosine) are proxies: on this project's demo E-DIEM carried no information
beyond module kind. What a user watching "safety drift" needs is the thing itself:

- the **refusal loss** ``L`` of the safety probe (mean token loss of refusal responses to harmful
  prompts, spec 3b) at every scoring call: the probe's own pass computes it
  (``LayerScores.losses["refusal"]``); rising ``L`` = the model refuses less readily;
- its **aligned reference** ``L_aligned``: the same probe with the adapter disabled (the aligned
  model), one forward pass at the start of training (:func:`aligned_refusal_loss`);
- optionally the **refusal rate** of greedy generations on a few held-out harmful prompts
  (:func:`refusal_rate_now`), every ``refusal_every_n_steps`` (off by default: generation costs
  ``refusal_max_new_tokens`` forward passes per batch; ``benchmarks/safety_signal_cost.py``).

:class:`SafetyMonitor` turns them into alerts (``refusal_loss_alert``: ``L - L_aligned`` above it;
``refusal_rate_alert``: the rate below it) and an early stop after ``early_stopping_patience``
consecutive checks past an alert level, as ``EarlyStoppingCallback`` counts evaluations.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.utils import logging

from .evaluation import generate, refusal_rate
from .probe import ProbeSet
from .sharding import unwrap_parallel
from .teacher_forced import probe_loss

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every PEFT adapter layer of ``model`` off inside (the aligned model), exactly as before after.

    Flips each layer's ``_disable_adapters`` flag, what ``PeftModel.disable_adapter()`` does, but
    without its ``enable_adapters(True)`` on exit, which sets ``requires_grad`` on every active
    adapter (a user's frozen LoRA weights would be unfrozen). Works under DDP/FSDP wrappers (the
    flag lives on the inner layers).

    Raises:
        ValueError: ``model`` has no PEFT adapter layer.
    """
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise ValueError("adapters_disabled: the model has no PEFT adapter layer to disable.")
    before = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer._disable_adapters = flag


def aligned_refusal_loss(probe: ProbeSet, model: nn.Module) -> float:
    """``L_aligned``: the probe's refusal loss with the adapter disabled, i.e. of the aligned model."""
    with adapters_disabled(model):
        return probe_loss(probe, model)


def refusal_rate_now(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                     batch_size: int = 8) -> float:
    """Share of ``prompts`` the model refuses (greedy, chat template, keyword judge; see evaluation.py).

    Modes, padding side and RNG states are restored (``evaluation.generate``).
    """
    texts = [g.text for g in generate(unwrap_parallel(model), tokenizer, list(prompts),
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)]
    return refusal_rate(texts)


@dataclass
class SafetyMonitor:
    """Alert levels, consecutive counts and the early-stop decision over the safety checks.

    Attributes:
        aligned_refusal_loss, aligned_refusal_rate: the references (adapter disabled), or None.
        refusal_rates: ``[{"step", "value"}]``, one per refusal-rate measurement.
        alerts: ``[{"step", "signal", "value", "level"}]``, one per crossing (the first check past
            the level after a check below it).
        streak: signal -> consecutive checks past its level so far.
        stopped_at: the step at which the monitor asked the Trainer to stop, or None.
        after_action: the signal measured once after the end-of-training action.
    """

    loss_alert: float | None = None
    rate_alert: float | None = None
    patience: int | None = None
    aligned_refusal_loss: float | None = None
    aligned_refusal_rate: float | None = None
    refusal_rates: list[dict[str, float]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    streak: dict[str, int] = field(default_factory=dict)
    stopped_at: int | None = None
    after_action: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> SafetyMonitor:
        return cls(config.refusal_loss_alert, config.refusal_rate_alert, config.early_stopping_patience)

    def loss_level(self) -> float | None:
        """The refusal loss past which an alert fires (``L_aligned + refusal_loss_alert``)."""
        if self.loss_alert is None or self.aligned_refusal_loss is None:
            return None
        return self.aligned_refusal_loss + self.loss_alert

    def check(self, step: int, signal: str, value: float | None) -> dict[str, Any] | None:
        """Count one check of ``signal`` (``"refusal_loss"`` or ``"refusal_rate"``); the new alert, if any."""
        level = self.loss_level() if signal == "refusal_loss" else self.rate_alert
        if value is None or level is None or not math.isfinite(value):
            return None
        past = value > level if signal == "refusal_loss" else value < level
        before = self.streak.get(signal, 0)
        self.streak[signal] = before + 1 if past else 0
        if not past or before:
            return None
        alert = {"step": step, "signal": signal, "value": value, "level": level}
        self.alerts.append(alert)
        return alert

    def should_stop(self, step: int) -> bool:
        """True once some signal was past its level ``patience`` checks in a row (recorded once)."""
        if self.patience is None or self.stopped_at is not None:
            return False
        if any(count >= self.patience for count in self.streak.values()):
            self.stopped_at = step
            return True
        return False

    def record_rate(self, step: int, value: float) -> dict[str, Any] | None:
        self.refusal_rates.append({"step": step, "value": value})
        return self.check(step, "refusal_rate", value)

    def state(self) -> dict[str, Any]:
        """JSON for ``ExportableState`` (resume) and the report."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any], config: Any) -> SafetyMonitor:
        monitor = cls.from_config(config)
        for key in ("aligned_refusal_loss", "aligned_refusal_rate", "refusal_rates", "alerts", "streak",
                    "stopped_at", "after_action"):
            if key in state:
                setattr(monitor, key, state[key])
        return monitor


def alert_text(alert: dict[str, Any], aligned: float | None) -> str:
    """One line naming the signal, its value, the level and what to do."""
    if alert["signal"] == "refusal_loss":
        return (f"Step {alert['step']}: refusal loss on the safety probe {alert['value']:.3f} nats is past the "
                f"alert level {alert['level']:.3f} (aligned model: {aligned:.3f}): the fine-tune is eroding "
                "refusals. See the SPLoRA report's safety chart.")
    return (f"Step {alert['step']}: refusal rate {alert['value']:.2f} fell below the alert level "
            f"{alert['level']:.2f}" + (f" (aligned model: {aligned:.2f})" if aligned is not None else "") + ".")


class SafetyChecks:
    """The safety signal of one training run, for :class:`~splora_callback.callback.SPLoRACallback`.

    Holds the config, the tokenizer (for the refusal rate) and a :class:`SafetyMonitor`; every
    method that runs the model is called on every rank (the same passes everywhere), the returned
    scalars and alerts are the same on every rank, and only the main process logs them.
    """

    def __init__(self, config: Any, state: dict[str, Any] | None = None):
        self.config = config
        self.monitor = SafetyMonitor.from_state(state or {}, config)
        self.tokenizer: Any = None

    def begin(self, model: nn.Module, tokenizer: Any = None) -> None:
        """Measure the references with the adapter disabled: the probe's loss, the refusal rate.

        Raises:
            ValueError: ``refusal_prompts`` without a tokenizer (``Trainer(processing_class=...)``);
                a refusal prompt that is also a probe prompt is refused on construction
                (``SPLoRAConfig``), before any tracker opens a run.
        """
        config = self.config
        if config.refusal_prompts is not None:
            if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "decode"):
                raise ValueError(
                    "SPLoRAConfig.refusal_prompts needs the tokenizer to generate: pass it to the Trainer as "
                    "processing_class=tokenizer (SFTTrainer does so by default)."
                )
            self.tokenizer = tokenizer
        if config.probe is not None and self.monitor.aligned_refusal_loss is None:
            self.monitor.aligned_refusal_loss = aligned_refusal_loss(config.probe, model)
            logger.info("SPLoRA safety probe: aligned model's refusal loss %.4f nats (adapter disabled)",
                        self.monitor.aligned_refusal_loss)
        if self.tokenizer is not None and self.monitor.aligned_refusal_rate is None:
            with adapters_disabled(model):
                self.monitor.aligned_refusal_rate = self._rate(model)
            logger.info("SPLoRA refusal rate of the aligned model: %.3f on %d prompts",
                        self.monitor.aligned_refusal_rate, len(config.refusal_prompts))

    def _rate(self, model: nn.Module) -> float:
        return refusal_rate_now(model, self.tokenizer, self.config.refusal_prompts, self.config.refusal_max_new_tokens)

    def after_scores(self, step: int, losses: dict[str, float]) -> tuple[dict[str, float], list[dict]]:
        """The ``splora/safety/*`` scalars of one scoring call and the alert it raised (if any)."""
        scalars: dict[str, float] = {}
        refusal, aligned = losses.get("refusal"), self.monitor.aligned_refusal_loss
        if refusal is not None:
            scalars["splora/safety/refusal_loss"] = refusal
            if aligned is not None:
                scalars["splora/safety/refusal_loss_aligned"] = aligned
                scalars["splora/safety/refusal_loss_increase"] = refusal - aligned
        if losses.get("task") is not None:
            scalars["splora/safety/task_loss"] = losses["task"]
        alert = self.monitor.check(step, "refusal_loss", refusal)
        return scalars, [alert] if alert else []

    def rate_due(self, step: int, max_steps: int) -> bool:
        every = self.config.refusal_every_n_steps
        return bool(every) and self.tokenizer is not None and (step % every == 0 or step >= max_steps)

    def measure_rate(self, model: nn.Module, step: int) -> tuple[dict[str, float], list[dict]]:
        """Generate on the held-out prompts now: the ``splora/safety/refusal_rate`` scalars and alert."""
        value = self._rate(model)
        alert = self.monitor.record_rate(step, value)
        scalars = {"splora/safety/refusal_rate": value}
        if self.monitor.aligned_refusal_rate is not None:
            scalars["splora/safety/refusal_rate_aligned"] = self.monitor.aligned_refusal_rate
        return scalars, [alert] if alert else []

    def after_action(self, model: nn.Module, refusal_loss: float | None = None) -> None:
        """The signal once more on the acted live model (the card's and report's "measured effect").

        ``refusal_loss``: the probe's loss on these weights when already measured (the measured
        stop's pass at the chosen prefix, whose masked update is the pruned one): not run again.
        """
        if self.config.probe is not None:
            self.monitor.after_action["refusal_loss"] = (
                probe_loss(self.config.probe, model) if refusal_loss is None else float(refusal_loss))
        if self.tokenizer is not None:
            self.monitor.after_action["refusal_rate"] = self._rate(model)

    def should_stop(self, step: int) -> bool:
        return self.monitor.should_stop(step)

    def alert_text(self, alert: dict[str, Any]) -> str:
        aligned = (self.monitor.aligned_refusal_loss if alert["signal"] == "refusal_loss"
                   else self.monitor.aligned_refusal_rate)
        return alert_text(alert, aligned)

    def state(self) -> dict[str, Any]:
        return self.monitor.state()

    def report_section(self) -> dict[str, Any]:
        """The report's ``safety``: the monitor's state, alert levels, probe and prompt counts."""
        probe = self.config.probe
        return {**self.monitor.state(), "loss_level": self.monitor.loss_level(),
                "rate_alert": self.monitor.rate_alert,
                "probe": None if probe is None else {"examples": len(probe), "response_tokens": probe.response_tokens},
                "refusal_prompts": None if self.config.refusal_prompts is None else len(self.config.refusal_prompts)}
