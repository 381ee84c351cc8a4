"""``SPLoRACallback``: score LoRA layers while a ``Trainer`` runs, act at the end, report.

```python
config = SPLoRAConfig(base_model="meta-llama/Llama-2-7b-hf", select="top_k", k=10)
trainer = Trainer(model=peft_model, args=TrainingArguments(..., report_to="wandb"), train_dataset=ds,
                  callbacks=[SPLoRACallback(config)])
trainer.train()          # scores logged while training; pruned at the end
trainer.save_model()     # saves the pruned adapter
```

Thin by design: the math lives in :mod:`.scoring`, :mod:`.selection` and :mod:`.pruning`, the
figures and payloads in :mod:`.report`. Every rank scores and acts (the same decision everywhere:
selection breaks ties by name); only the world-zero process logs and writes files.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from . import preflight
from .alignment import AlignmentMismatchError, AlignmentSubspace
from .base_models import AUTO, aligned_name_or_path, infer_base_model
from .checkpoint import CheckpointError
from .config import SPLoRAConfig
from .dashboard import write_html_report
from .distributed import (
    alignment_for_rank,
    alignment_info,
    apply_action_distributed,
    broadcast_object,
    save_acted_adapter_distributed,
    score_layers_distributed,
)
from .layers import resolve_adapter_name
from .memory import device_account, place_alignment, placement_info, storage_device
from .model_card import facts_from_report, write_model_card
from .probe import UtilityProbe
from .repair import RepairTrace, predicted_repair, repair_selection
from .report import REPORT_HTML, REPORT_JSON, build_report, write_json_report
from .safety import SafetyChecks, probe_loss
from .scoring import LayerScores
from .selection import predicted_change, removed_ranks, select_layers
from .sharding import lora_layers, warn_if_sharded
from .trackers import CONSOLE_LOGGER, Trackers, configure_logging, final_line

logger = logging.get_logger(__name__)
console = logging.get_logger(CONSOLE_LOGGER)

CHECKPOINT_SUBDIR = "splora"
# The probes are not JSON, so a resumed callback (rebuilt by the Trainer from JSON args) finds the
# (safety, utility) probes of the callback the user passed in this process here, keyed by the rest
# of the config.
_PROBES: dict[str, tuple[Any, Any]] = {}
NOT_SERIALISED = ("probe", "utility")


def _config_args(config: SPLoRAConfig) -> dict[str, Any]:
    """The JSON-able constructor arguments of ``config`` (everything but the probes)."""
    return {key: value for key, value in config.to_dict().items() if key not in NOT_SERIALISED}


def _probe_key(config_args: dict[str, Any]) -> str:
    return json.dumps(config_args, sort_keys=True)


def default_utility_probe(train_dataloader: Any, examples: int, seed: int) -> tuple[UtilityProbe, str]:
    """The callback's utility probe when the user gave none: a seeded sample of the training data,
    collated by the Trainer's own collator (local RNG: the training order is not touched).

    Pass ``SPLoRAConfig(utility=UtilityProbe.from_dataset(eval_dataset, collator))`` to use
    held-out examples instead; training data that mixes in harmful compliance counts it as utility.

    Raises:
        ValueError: no map-style training dataset to sample from.
    """
    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise ValueError(
            "SPLoRACallback: select='budget' needs task examples and the training data cannot be sampled "
            "(no map-style train_dataset); pass SPLoRAConfig(utility=UtilityProbe.from_pairs(...))."
        )
    probe = UtilityProbe.from_dataset(dataset, train_dataloader.collate_fn, examples, seed=seed)
    source = f"train_dataset: {len(probe)} examples sampled with seed {seed}"
    logger.info("SPLoRA utility probe: %s (pass SPLoRAConfig(utility=...) for held-out examples).", source)
    return probe, source


class SPLoRACallback(TrainerCallback, ExportableState):
    """Monitor LoRA layers' safety drift during training and act on the worst at the end.

    Args:
        config: a :class:`SPLoRAConfig`, or its ``to_dict()`` without the probe (how the Trainer
            rebuilds the callback when resuming with ``restore_callback_states_from_checkpoint``).
        **kwargs: instead of ``config``, its fields as keywords, like ``EarlyStoppingCallback``'s:
            ``SPLoRACallback(base_model=..., select="top_k", k=10)``. ``SPLoRACallback()`` alone uses
            ``base_model="auto"``: the unaligned base is inferred from the aligned model's card or a
            table of well-known pairs at ``on_train_begin`` (:mod:`.base_models`).

    Attributes:
        history: one entry per scoring call: ``{"step", "seconds", "selected", "scores"}`` with
            ``scores`` a :meth:`LayerScores.to_dict`. Survives resume (``ExportableState``).
        selected: layers chosen at the end of training; ``action_report``: what was done to them.

    Raises (in ``on_train_begin``, before the first step):
        NoLoraLayersError, UnsupportedAdapterError: the model has no (plain) LoRA layer.
        AlignmentMismatchError, CheckpointError: ``config.base_model`` does not match the model.
        BaseModelNotFound: ``base_model="auto"`` and neither the aligned model's card nor the known
            pairs name its base (the message names ``base_model``).
        ValueError: ``refusal_prompts`` without a tokenizer (``Trainer(processing_class=...)``).
    """

    def __init__(self, config: SPLoRAConfig | dict[str, Any] | None = None, **kwargs: Any):
        if config is None:  # keywords: SPLoRACallback(base_model=..., select="top_k", k=10), or none at all
            geometry = kwargs.get("metric", "ediem") != "probe"  # metric="probe" alone needs no base model
            config = SPLoRAConfig(**{"base_model": AUTO if geometry else None, **kwargs})
        elif kwargs:
            raise TypeError(
                f"SPLoRACallback takes an SPLoRAConfig or its fields as keywords, not both (got config and "
                f"{', '.join(sorted(kwargs))}); put them in the SPLoRAConfig."
            )
        if not isinstance(config, (SPLoRAConfig, dict)):
            raise TypeError(
                f"SPLoRACallback takes an SPLoRAConfig, got {type(config).__name__} {config!r:.60}; write "
                "SPLoRACallback(base_model=..., select='top_k', k=10) or SPLoRACallback(SPLoRAConfig(...))."
            )
        if isinstance(config, dict):
            probe, utility = _PROBES.get(_probe_key(config), (None, None))
            if config.get("metric") == "probe" and probe is None:
                raise ValueError(
                    "SPLoRACallback: cannot rebuild a metric='probe' callback from saved state without "
                    "its probe; pass SPLoRACallback(SPLoRAConfig(..., probe=...)) with the same config to "
                    "the Trainer."
                )
            config = SPLoRAConfig(**config, probe=probe, utility=utility)
        elif config.probe is not None or config.utility is not None:
            _PROBES[_probe_key(_config_args(config))] = (config.probe, config.utility)
        self.config = config
        self.history: list[dict[str, Any]] = []
        self.alerted: list[str] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.selected: list[str] = []
        self.action_report: dict[str, Any] | None = None
        self._alignment: AlignmentSubspace | None = None
        self._alignment_info: dict[str, Any] | None = None
        self._scores: LayerScores | None = None
        self._utility = config.utility
        self.utility_source: str | None = "user" if config.utility is not None else None
        self.safety_state: dict[str, Any] = {}  # SafetyChecks' JSON state (restored on resume)
        self.base_model_source = "given" if config.base_model != AUTO else None
        self._safety = SafetyChecks(config)
        self._trackers = Trackers(None, None)  # the report_to backends, opened in on_train_begin (main process)
        self._lora_device = torch.device("cpu")
        self._aligned_model: str | None = config.aligned_model
        self._created = time.time()  # TensorBoardCallback's folder appears after this (trackers.tensorboard_dir)

    def state(self) -> dict[str, Any]:
        """JSON state saved in every checkpoint's ``trainer_state.json`` (``ExportableState``)."""
        return {
            "args": {"config": _config_args(self.config)},
            "attributes": {"history": self.history, "alerted": self.alerted, "checkpoints": self.checkpoints,
                           "safety_state": self._safety.state()},
        }

    # --- the one scoring call site ---------------------------------------------------------------

    def compute_scores(self, model: nn.Module, probes: bool = True) -> LayerScores:
        """Score every LoRA layer of ``model``: E-DIEM, cosine, signed diagnostic (and the probes).

        The single place scores are computed. In a multi-process run each rank scores its slice
        of the layers and every rank gets all scores (:func:`score_layers_distributed`); in one
        process this is exactly :func:`score_layers`. Runs under ``torch.no_grad()`` on the
        device ``on_train_begin`` put the alignment subspace on (the LoRA weights' device); a probe
        takes its own gradients inside (``torch.enable_grad``) and restores modes and RNG states.
        ``probes=False`` (``probe_every_n_steps``): the geometric scores and the safety probe's
        refusal loss only (forward passes), no attributions.
        """
        config = self.config
        account = device_account(self._alignment)  # alignment_placement="stream": bytes placed per call
        if account is not None:
            account.reset_peak()
        metric = config.metric if probes or config.metric != "probe" else "ediem"
        with torch.no_grad():
            scores = score_layers_distributed(
                model, self._alignment, metric, null=config.null, permutations=config.permutations,
                seed=config.permutation_seed, adapter_name=config.adapter_name,
                probe=config.probe if probes else None, utility=self._utility if probes else None,
                granularity=config.granularity,
            )
        if not probes and config.probe is not None:
            scores.losses["refusal"] = probe_loss(config.probe, model)
        return scores

    def _probes_due(self, step: int) -> bool:
        """Whether the scoring call at ``step`` runs the probes' attributions (``probe_every_n_steps``)."""
        every = self.config.probe_every_n_steps
        return every is None or (every > 0 and step % every == 0)

    # --- Trainer events --------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs) -> None:
        """Build the alignment subspace once; fail before the first step if it cannot be built.

        Also: this library's log level from ``args.log_level`` (trackers.configure_logging), the base
        model for ``base_model="auto"``, the safety signal's references (adapter disabled) and the
        ``report_to`` backends.
        """
        configure_logging(args)
        config = self.config
        if state.global_step > 0 and not self.history and not args.restore_callback_states_from_checkpoint:
            logger.warning(
                "Resuming at step %d without TrainingArguments(restore_callback_states_from_checkpoint="
                "True): SPLoRA's score history before this step is not restored.", state.global_step)
        adapter, layers = lora_layers(model, config.adapter_name)  # no LoRA / DoRA: raise now
        if config.base_model == AUTO:
            self._resolve_base_model(model)
        sharded = warn_if_sharded(model, config.action)
        preflight.resume_without_state(state, self, args.restore_callback_states_from_checkpoint)
        preflight.check_not_pruning_everything(config, len(layers))
        preflight.check_output_dir(args.output_dir)  # not after training, when the report is written
        preflight.check_acted_outputs(args.output_dir, model, adapter, config, sharded)
        attributed = [entry for entry in self.history if entry.get("probes", True)]
        if attributed:  # restored from a checkpoint
            self._scores = LayerScores.from_dict(attributed[-1]["scores"])
        if config.select == "repair" and sharded:
            raise ValueError(
                "SPLoRAConfig.select='repair' measures each candidate with forward passes on the live LoRA "
                "weights, which FSDP / ZeRO-3 shard; use select='budget' (predicted stop) under sharding, or "
                "repair the saved adapter afterwards in one process."
            )
        if config.select in ("budget", "repair") and self._utility is None:
            self._utility, self.utility_source = default_utility_probe(
                kwargs.get("train_dataloader"), config.utility_examples, args.seed)
        if state.is_world_process_zero:
            plan, doubtful = config.plan()
            (logger.warning if doubtful else logger.info)("%s", plan)
        self._safety = SafetyChecks(config, self.safety_state)  # restored on resume
        self._safety.begin(model, kwargs.get("processing_class"))  # every rank: the same forward passes
        if state.is_world_process_zero:
            self._trackers = Trackers.open(args, sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
                                           since=self._created)
        self._lora_device = layers[0][1].lora_A[adapter].weight.device  # scoring runs where LoRA weights live
        self._aligned_model = config.aligned_model or aligned_name_or_path(model, config.adapter_name)
        if config.base_model is None:  # metric="probe" without geometry
            return
        try:
            self._alignment = alignment_for_rank(  # each rank builds V for its slice of layers only
                config.base_model, model, aligned=config.aligned_model,
                adapter_name=config.adapter_name, cache_file=config.alignment_cache,
                dtype=getattr(torch, config.alignment_dtype),
                device=storage_device(config.alignment_placement, self._lora_device),  # CPU unless "resident"
                progress=state.is_world_process_zero and not args.disable_tqdm,
            )
        except (AlignmentMismatchError, CheckpointError) as error:
            raise type(error)(
                f"SPLoRACallback: config.base_model={config.base_model!r} does not match the model being "
                f"trained: {error}"
            ) from error
        self._alignment_info = alignment_info(self._alignment)
        place_alignment(self._alignment, config.alignment_placement, self._lora_device)  # memory.py

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs) -> None:
        """Score on schedule, at the last step, and before a checkpoint that gets an acted adapter.

        Scoring before the save (``control.should_save`` is set by ``DefaultFlowCallback``, which
        runs first) puts the scores into that checkpoint's callback state. The refusal rate runs on
        its own schedule; after either, the safety signal may stop training (early stop, as
        ``EarlyStoppingCallback`` does: ``control.should_training_stop``).
        """
        every = self.config.score_every_n_steps
        acts = state.global_step >= state.max_steps or (self.config.prune_at_checkpoints and control.should_save)
        if (every and state.global_step % every == 0) or acts:
            self._score(args, state, model, measured=acts)
        if self._safety.rate_due(state.global_step, state.max_steps):
            scalars, alerts = self._safety.measure_rate(model, state.global_step)
            if state.is_world_process_zero:
                self._trackers.log_scalars(scalars, state.global_step)
                self._safety_alerts(alerts)
        if self._safety.should_stop(state.global_step):  # the same decision on every rank
            logger.warning("SPLoRA: stopping training at step %d: the safety signal was past its alert level at %d "
                           "checks in a row (early_stopping_patience).", state.global_step,
                           self.config.early_stopping_patience)
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs) -> None:
        """Write ``checkpoint-N/splora/`` (acted adapter + report) and refresh the running report."""
        if self.config.prune_at_checkpoints:
            scores = self._latest_scores(args, state, model)  # scored in on_step_end unless an epoch save
            self._write_checkpoint(args, state, model, scores, self.history[-1]["selected"])
        if state.is_world_process_zero and self.history:
            selected = next((entry["selected"] for entry in reversed(self.history) if entry["selected"] is not None), [])
            write_json_report(args.output_dir, self._report("running", state, selected, None))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs) -> None:
        """Final scores, selection and action on the live model; then the report and dashboards.

        Runs after the Trainer's last checkpoint was saved (that checkpoint keeps the unpruned
        adapter, so resuming from it stays exact) and before the user's ``trainer.save_model()``,
        which therefore writes the pruned adapter.
        """
        unmeasured = self.config.select == "repair" and bool(self.history) and "repair_trace" not in self.history[-1]
        self._latest_scores(args, state, model, rescore=args.load_best_model_at_end or unmeasured)
        self.selected = copy.deepcopy(self.history[-1]["selected"])
        config = self.config
        refused = config.prune_at_end and preflight.refusal_to_prune_everything(
            config, self.selected, self.history[-1]["scores"])
        if refused:  # every layer selected: the model stays as trained, the report says why
            self.action_report = refused
        elif config.prune_at_end and warn_if_sharded(model, config.action):
            # FSDP / ZeRO-3: the live flat parameters are not edited; the acted adapter is written aside
            target = Path(args.output_dir) / CHECKPOINT_SUBDIR
            save_acted_adapter_distributed(model, target, self.selected, config.action, self._alignment,
                                           config.adapter_name, overwrite=True)
            self.action_report = {"action": config.action, "layers": list(self.selected),
                                  "applied_to": str(target), "live_model": "unchanged (sharded)"}
        elif config.prune_at_end:
            acted = apply_action_distributed(model, self._alignment, self.selected, config.action,
                                             config.adapter_name)
            self.action_report = acted.to_dict()
            if config.action != "none" and self.selected:  # the measured effect: every rank, the same passes
                self._safety.after_action(model, self._measured_refusal_loss())
        if state.is_world_process_zero:
            self._finish(args, state, model)
        self._alignment = None  # V can be as large as the adapted weights: free it

    # --- helpers ---------------------------------------------------------------------------------

    def _finish(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        """Main process, end of training: report (JSON, then HTML: always, the offline record),
        trackers, the model card, and one console line saying what was done and where things are."""
        report = self._report("finished", state, self.selected, self.action_report)
        write_json_report(args.output_dir, report)
        self._trackers.final(report)
        html = write_html_report(args.output_dir)
        action = self.action_report or {}
        if action.get("live_model"):  # sharded: the acted adapter was written aside
            folder, adapter, link = Path(action["applied_to"]), action["applied_to"], f"../{REPORT_HTML}"
        else:
            folder, link = Path(args.output_dir), REPORT_HTML
            done = action.get("action") not in (None, "none") and action.get("layers")
            adapter = (f"{'acted on in the live model; ' if done else 'as trained; '}trainer.save_model() writes it "
                       f"(to {args.output_dir} by default, next to its model card)")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "add_model_tags"):  # PEFT's card update keeps the model's tags (TRL does the same)
            base.add_model_tags(["splora"])
        card = write_model_card(folder, facts_from_report(report, link))
        logger.info("SPLoRA report %s (%s), model card %s", html, REPORT_JSON, card)
        console.info(final_line(report, html, adapter))

    def _resolve_base_model(self, model: nn.Module) -> None:
        """``base_model="auto"``: the base from the aligned model's card or the known pairs (every rank
        reads the same files; no Hub request offline)."""
        aligned = self.config.aligned_model or aligned_name_or_path(model, self.config.adapter_name)
        self.config.base_model, self.base_model_source = infer_base_model(aligned)
        if self.config.probe is not None or self.config.utility is not None:  # found again on resume
            _PROBES[_probe_key(_config_args(self.config))] = (self.config.probe, self.config.utility)

    def _safety_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """Main process: each new safety alert as a warning and a W&B alert."""
        for alert in alerts:
            text = self._safety.alert_text(alert)
            logger.warning("SPLoRA: %s", text)
            self._trackers.alert(f"SPLoRA: {alert['signal'].replace('_', ' ')} alert at step {alert['step']}", text)

    def _score(self, args: TrainingArguments, state: TrainerState, model: nn.Module,
               measured: bool = True) -> LayerScores:
        """Score, select and log. ``select="repair"``: the measured stop where the selection is acted
        on (``measured``), its first-order stand-in at the other scoring steps (no forward passes)."""
        probes = measured or self._probes_due(state.global_step)
        start = time.perf_counter()
        scores = self.compute_scores(model, probes)
        seconds = time.perf_counter() - start
        entry: dict[str, Any] = {"step": state.global_step, "seconds": seconds}
        aligned_loss = self._safety.monitor.aligned_refusal_loss
        if not probes:  # geometry and the refusal loss only: a probe rule selects nothing here
            entry["probes"] = False
            needs_probes = self.config.metric == "probe" or self.config.select in ("budget", "repair")
            selected = None if needs_probes else select_layers(scores, **self.config.selection_kwargs())
        elif self.config.select == "repair" and measured:  # forward passes with units masked, every rank alike
            selected, trace = repair_selection(model, scores, self.config.probe, aligned_loss, self.config.restore,
                                               self.config.adapter_name)
            entry["repair_trace"] = trace.to_dict()
        elif self.config.select == "repair":
            selected = predicted_repair(scores, aligned_loss, self.config.restore)
        else:
            selected = select_layers(scores, **self.config.selection_kwargs())
        self.history.append({**entry, "selected": selected, "scores": scores.to_dict()})
        if probes:
            self._scores = scores
        safety, alerts = self._safety.after_scores(state.global_step, scores.losses)
        if state.is_world_process_zero:
            self._trackers.log_scores(scores, state.global_step, selected, self.config.to_dict(), seconds, safety)
            self._alert(scores, state.global_step)
            self._safety_alerts(alerts)
        return scores

    def _measured_refusal_loss(self) -> float | None:
        """The refusal loss the measured stop took on the pruned selection it returned (the same
        weights as the acted model: masking is pruning), or None (another rule, or another action)."""
        trace = self.history[-1].get("repair_trace") if self.history else None
        if trace is None or self.config.action != "prune":
            return None
        return RepairTrace(**trace).refusal_loss_at(trace["chosen"])

    def _latest_scores(self, args: TrainingArguments, state: TrainerState, model: nn.Module,
                       rescore: bool = False) -> LayerScores:
        """The scores of this step: reused if already computed with the probes (and the weights not reloaded)."""
        current = (bool(self.history) and self.history[-1]["step"] == state.global_step
                   and self.history[-1].get("probes", True))
        if rescore or self._scores is None or not current:
            return self._score(args, state, model)
        return self._scores

    def _alert(self, scores: LayerScores, step: int) -> None:
        """Warn (and ``wandb.alert``) once per layer when its E-DIEM first exceeds ``alert_threshold``."""
        threshold = self.config.alert_threshold
        if threshold is None:
            return
        crossed = [s.name for s in scores
                   if s.ediem is not None and s.ediem > threshold and s.name not in self.alerted]
        if not crossed:
            return
        self.alerted.extend(crossed)
        text = f"Step {step}: E-DIEM > {threshold} for {len(crossed)} layer(s): {', '.join(crossed[:10])}"
        logger.warning("SPLoRA: %s", text)
        self._trackers.alert(f"SPLoRA: safety drift at step {step}", text)

    def _write_checkpoint(self, args: TrainingArguments, state: TrainerState, model: nn.Module,
                          scores: LayerScores, chosen: list[str]) -> None:
        """``checkpoint-N/splora/``: the adapter as the action would leave it, and its report."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not broadcast_object(folder.is_dir() if state.is_world_process_zero else None):
            logger.warning("SPLoRA: checkpoint folder %s not found; no acted adapter written.", folder)
            return
        target, action = folder / CHECKPOINT_SUBDIR, self.config.action
        if preflight.refusal_to_prune_everything(self.config, chosen, scores) is not None:
            return  # every layer selected: no acted copy (it could not be loaded); logged
        if action != "none":  # collective: adapter tensors are gathered to the main process, which writes
            save_acted_adapter_distributed(model, target, chosen, action, self._alignment,
                                           self.config.adapter_name, overwrite=True)
        if not state.is_world_process_zero:
            return
        removed = 0
        if action == "prune":  # (m + n) LoRA parameters per removed rank-one component or rank
            removed = sum(count * sum(scores[name].shape) for name, count in removed_ranks(scores, chosen).items())
        acted = {"action": action, "layers": chosen, "parameters_removed": removed,
                 "adapter_name": resolve_adapter_name(model, self.config.adapter_name),
                 "applied_to": "checkpoint copy"}
        self.checkpoints.append({"step": state.global_step, "path": str(target.relative_to(args.output_dir)),
                                 "layers": chosen})
        report = self._report("checkpoint", state, chosen, acted)
        write_json_report(target, report)
        if action != "none":  # the acted copy gets its card (`splora report` makes the HTML from the JSON)
            write_model_card(target, facts_from_report(report, REPORT_JSON))

    def _report(self, status: str, state: TrainerState, selected: list[str],
                action: dict[str, Any] | None) -> dict[str, Any]:
        report = build_report(
            self.config.to_dict(), self.history, selected=selected, action=action, status=status,
            step=state.global_step, checkpoints=self.checkpoints, alignment=self._alignment_info,
        )
        if self._scores is not None and (self._scores.losses or self.config.granularity == "component"):
            report["repair"] = {"utility_source": self.utility_source,
                                **predicted_change(self._scores, selected)}
            if self.history and "repair_trace" in self.history[-1]:
                report["repair"]["measured_stop"] = self.history[-1]["repair_trace"]
        report["safety"] = self._safety.report_section()
        report["aligned_model"] = self._aligned_model
        report["base_model_source"] = self.base_model_source
        report["memory"] = placement_info(self._alignment, self.config.alignment_placement, self._lora_device)
        return report
