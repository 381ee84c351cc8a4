"""``SPLoRACallback``: score LoRA layers while a ``Trainer`` runs, act at the end, report.

```python
config = SPLoRAConfig(base_model="meta-llama/Llama-2-7b-hf", select="top_k", k=10, action="prune")
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
from ._io import remove_stale_temporaries
from .acting import end_action, repair_command, write_acted_copy
from .alignment import AlignmentMismatchError, AlignmentSubspace
from .base_models import AUTO, aligned_name_or_path, infer_base_model
from .checkpoint import CheckpointError
from .config import SPLoRAConfig
from .dashboard import write_html_report
from .distributed import alignment_for_rank, alignment_info, score_layers_distributed
from .layers import resolve_adapter_name
from .memory import device_account, place_alignment, placement_info, storage_device
from .model_card import calling_trainer, facts_from_report, keep_card_through, write_model_card
from .processes import all_gather_object, broadcast_object
from .pruning import PreparedAction
from .repair import RepairTrace
from .report import REPORT_HTML, REPORT_JSON, build_report, write_json_report
from .resume import (
    CHECKPOINT_SUBDIR,
    checkpoint_copies,
    config_changes,
    drop_loaded_copies,
    passed_callback,
    remember_passed,
)
from .rules import SelectionContext
from .runtime import SPLoRARuntime, default_utility_probe
from .safety import SafetyChecks
from .scoring import LayerScores
from .selection import predicted_change
from .sharding import lora_layers, warn_if_sharded
from .teacher_forced import probe_loss
from .trackers import CONSOLE_LOGGER, Trackers, configure_logging, final_line

logger = logging.get_logger(__name__)
console = logging.get_logger(CONSOLE_LOGGER)

class SPLoRACallback(TrainerCallback, ExportableState):
    """Monitor LoRA layers' safety drift during training and repair at the end: with a safety probe,
    the safety patch (``action="patch"``) or pruning by a named rule; without one, prune only when asked.

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

    def __new__(cls, config: SPLoRAConfig | dict[str, Any] | None = None, _resumed: bool = False, **kwargs: Any):
        """A resuming Trainer rebuilds the callback from the checkpoint's JSON (``type(callback)(**args)``,
        with ``restore_callback_states_from_checkpoint=True``; ``_resumed`` marks those args): it gets
        back the callback the user passed in this process, with its config and probes (differences
        from the saved config are logged in ``on_train_begin``), and the saved history restored into it."""
        if _resumed and isinstance(config, dict) and not kwargs:
            passed = passed_callback(cls)
            if passed is not None:
                passed._handed_back = True
                return passed
        return super().__new__(cls)

    def __init__(self, config: SPLoRAConfig | dict[str, Any] | None = None, _resumed: bool = False, **kwargs: Any):
        if _resumed and getattr(self, "_handed_back", False):  # the user's callback, handed back on resume
            return
        if config is None:  # keywords: SPLoRACallback(base_model=..., select="top_k", k=10), or none at all
            geometry = kwargs.get("metric", "ediem") != "probe"  # metric="probe" alone needs no base model
            config = SPLoRAConfig(**{"base_model": AUTO if geometry else None, **kwargs})
        elif set(kwargs) - {"probe", "utility"}:
            raise TypeError(
                f"SPLoRACallback takes an SPLoRAConfig or its fields as keywords, not both (got config and "
                f"{', '.join(sorted(set(kwargs) - {'probe', 'utility'}))}); put them in the SPLoRAConfig."
            )
        elif kwargs:  # SPLoRACallback(config, probe=..., utility=...): the live objects beside the plain config
            if not isinstance(config, SPLoRAConfig):
                raise TypeError("SPLoRACallback(config, probe=..., utility=...) takes an SPLoRAConfig as config.")
            runtime = SPLoRARuntime(kwargs.get("probe", config.probe), kwargs.get("utility", config.utility))
            config = SPLoRAConfig(**config.to_dict(), probe=runtime.probe, utility=runtime.utility)
        if not isinstance(config, (SPLoRAConfig, dict)):
            raise TypeError(
                f"SPLoRACallback takes an SPLoRAConfig, got {type(config).__name__} {config!r:.60}; write "
                "SPLoRACallback(base_model=..., select='top_k', k=10) or SPLoRACallback(SPLoRAConfig(...))."
            )
        if isinstance(config, dict):  # a saved state, with no callback of this process to hand back
            if config.get("metric") == "probe":
                raise ValueError(
                    "SPLoRACallback: cannot rebuild a metric='probe' callback from saved state without "
                    "its probe; pass SPLoRACallback(SPLoRAConfig(..., probe=...)) to the Trainer."
                )
            config = SPLoRAConfig(**{key: value for key, value in config.items() if key not in ("probe", "utility")})
        else:
            remember_passed(self)
        self.config = config
        self.history: list[dict[str, Any]] = []
        self.alerted: list[str] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.selected: list[str] = []
        self.action_report: dict[str, Any] | None = None
        self.previous_actions: list[dict[str, Any]] = []  # of earlier train() calls on this callback
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
            "args": {"config": self.config.to_dict(), "_resumed": True},
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

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Tidy what a killed run left in ``output_dir`` (half-written copies) before a resume reads it:
        ``Trainer.train()`` loads the checkpoint before ``on_train_begin``."""
        if state.is_world_process_zero:
            remove_stale_temporaries(args.output_dir)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs) -> None:
        """Build the alignment subspace once; fail before the first step if it cannot be built.

        Also: this library's log level from ``args.log_level`` (trackers.configure_logging), the base
        model for ``base_model="auto"``, the safety signal's references (adapter disabled) and the
        ``report_to`` backends.
        """
        configure_logging(args)
        trainer = calling_trainer()  # its create_model_card() (push_to_hub calls it) keeps the SPLoRA card
        if trainer is not None:
            keep_card_through(trainer, lambda: getattr(self, "_card", None))
        config = self.config
        self._begin_again(state)
        if state.global_step > 0 and not self.history and not args.restore_callback_states_from_checkpoint:
            logger.warning(
                "Resuming at step %d without TrainingArguments(restore_callback_states_from_checkpoint="
                "True): SPLoRA's score history before this step is not restored.", state.global_step)
        dropped = drop_loaded_copies(model, resolve_adapter_name(model, config.adapter_name)) if state.global_step else []
        if dropped and state.is_world_process_zero:
            logger.warning("SPLoRA: resuming, the Trainer loaded the checkpoint's %s/ folder (SPLoRA's acted copy) as "
                           "a second adapter %r; it was removed: only the adapter being trained runs and is saved.",
                           CHECKPOINT_SUBDIR, dropped[0])
        adapter, layers = lora_layers(model, config.adapter_name)  # no LoRA / DoRA: raise now
        if config.base_model == AUTO:
            self._resolve_base_model(model)
        self._compare_saved_config(state)
        sharded = warn_if_sharded(model, config.action)
        preflight.resume_without_state(state, self, args.restore_callback_states_from_checkpoint)
        preflight.check_not_pruning_everything(config, len(layers))
        preflight.check_action_needs(model, adapter, config, [name for name, _ in layers])
        preflight.check_output_dir(args.output_dir)  # not after training, when the report is written
        preflight.check_acted_outputs(args.output_dir, model, adapter, config, sharded)
        if state.is_world_process_zero:
            preflight.warn_if_card_unmergeable(args.output_dir)
            self.checkpoints = checkpoint_copies(args.output_dir, self.checkpoints)
        attributed = [entry for entry in self.history if entry.get("probes", True)]
        if attributed:  # restored from a checkpoint
            self._scores = LayerScores.from_dict(attributed[-1]["scores"])
        if config.rule.needs_model and sharded:
            raise ValueError(
                f"SPLoRAConfig.select={config.rule.name!r} measures each candidate with forward passes on the live "
                "LoRA weights, which FSDP / ZeRO-3 shard; use select='budget' (predicted stop) under sharding, or "
                "repair the saved adapter afterwards in one process."
            )
        if config.rule.needs_utility and self._utility is None:
            self._utility, self.utility_source = default_utility_probe(
                kwargs.get("train_dataloader"), config.utility_examples, args.seed)
        if state.is_world_process_zero:  # on the console at the default level, as the end-of-training line
            plan, doubtful = config.plan()
            (console.warning if doubtful else console.info)("%s", plan)
        self._safety = SafetyChecks(config, self.safety_state)  # restored on resume
        self._safety.begin(model, kwargs.get("processing_class"))  # every rank: the same forward passes
        self._tokenizer = kwargs.get("processing_class")
        if config.action == "patch" and config.prune_at_end:
            preflight.check_patch_needs(config, self._tokenizer, sharded)
        if getattr(config.rule, "stop", None) == "refusal_rate":  # what the stop needs, before step 1
            if self._tokenizer is None:
                raise ValueError("SPLoRAConfig.select: the repair's refusal-rate stop generates answers and needs the "
                                 "tokenizer: pass it to the Trainer as processing_class=tokenizer (SFTTrainer does).")
            if not getattr(config.probe, "prompts", None):
                raise ValueError("SPLoRAConfig.select: the repair's refusal-rate stop answers the safety probe's "
                                 "prompts; this probe has none: build it with SafetyProbe.from_pairs(tokenizer, pairs).")
        if state.is_world_process_zero:
            self._trackers = Trackers.open(args, sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
                                           since=self._created)
            self._trackers.log_config(config.to_dict())  # W&B run config: splora/<field>
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
            self._guarded(f"scoring at step {state.global_step}", self._score, args, state, model, measured=acts)
        if self._safety.rate_due(state.global_step, state.max_steps):
            self._guarded(f"the refusal rate at step {state.global_step}", self._measure_rate, state, model)
        if self._safety.should_stop(state.global_step):  # the same decision on every rank
            logger.warning("SPLoRA: stopping training at step %d: the safety signal was past its alert level at %d "
                           "checks in a row (early_stopping_patience).", state.global_step,
                           self.config.early_stopping_patience)
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs) -> None:
        """Write ``checkpoint-N/splora/`` (acted adapter + report) and refresh the running report."""
        if self.config.prune_at_checkpoints:
            self._guarded(f"the acted copy of checkpoint {state.global_step}", self._write_checkpoint, args, state, model)
        if state.is_world_process_zero:  # save_total_limit may have deleted old checkpoints (and their copies)
            self.checkpoints = checkpoint_copies(args.output_dir, self.checkpoints)
        if state.is_world_process_zero and self.history:
            selected = next((entry["selected"] for entry in reversed(self.history) if entry["selected"] is not None), [])
            self._guarded("the running report", lambda: write_json_report(
                args.output_dir, self._report("running", state, selected, None)))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs) -> None:
        """Final scores, selection and action on the live model; then the report and dashboards.

        Runs after the Trainer's last checkpoint was saved (that checkpoint keeps the unpruned
        adapter, so resuming from it stays exact) and before the user's ``trainer.save_model()``,
        which therefore writes the pruned adapter. All or nothing: the action is built aside and
        swapped into the live model in one step; if anything fails on the way, on any rank
        (scoring, the action, the report, the card), the live model is left as trained, the error
        is logged with how to repair the saved adapter afterwards, and training is not lost
        (``strict=True`` raises instead).
        """
        prepared, error = None, None
        try:
            prepared = self._prepare_end_action(args, state, model)
            if prepared is not None:
                self.action_report = prepared.commit().to_dict()
                if self.config.action != "none" and self.selected:  # the measured effect: every rank, the same passes
                    self._safety.after_action(model, self._measured_refusal_loss())
            if state.is_world_process_zero:
                self._finish(args, state, model)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the training must not be lost
            error = exc
        failures = [text for text in all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
                    if text is not None]
        if failures:
            if prepared is not None:
                prepared.rollback()
            self._action_failed(args, state, model, failures[0])
        self._alignment = None  # V can be as large as the adapted weights: free it
        if failures and self.config.strict:
            raise error if error is not None else RuntimeError(f"SPLoRA: another process failed: {failures[0]}")

    # --- helpers ---------------------------------------------------------------------------------

    def _prepare_end_action(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> PreparedAction | None:
        """The final scores and selection, and the action built aside (None: nothing to swap in);
        nothing of the live model changes here."""
        config = self.config
        unmeasured = config.rule.needs_model and bool(self.history) and not self.history[-1].get(
            "measured", "repair_trace" in self.history[-1])  # a checkpoint restored from an older version
        self._latest_scores(args, state, model, rescore=args.load_best_model_at_end or unmeasured)
        entry = self.history[-1]
        self.selected = copy.deepcopy(entry["selected"])
        if not config.prune_at_end:
            return None
        prepared, self.action_report = end_action(
            config, model, self._alignment, self.selected, entry, args.output_dir, tokenizer=self._tokenizer,
            aligned_refusal_loss=self._safety.monitor.aligned_refusal_loss,
            progress=state.is_world_process_zero and not args.disable_tqdm)
        if entry.get("non_finite"):
            self.selected = []
        return prepared

    def _action_failed(self, args: TrainingArguments, state: TrainerState, model: nn.Module, failure: str) -> None:
        """Log a failed end of training with what was kept and how to repair afterwards; record it
        in the report when the report can still be written."""
        self.action_report = {"action": "none", "layers": [], "failed": failure,
                              "live_model": "as trained (unpruned)", "selected": self.selected}
        self._safety.monitor.after_action.clear()  # measured on the acted model, which was rolled back
        if not state.is_world_process_zero:
            return
        logger.error(
            "SPLoRA: the action at the end of training failed (%s). The live model is left as trained and "
            "trainer.save_model() saves it unpruned; nothing of the training is lost. To repair the saved adapter "
            "afterwards: %s (SPLoRAConfig(strict=True) raises instead of this message).", failure,
            repair_command(self.config, args.output_dir, self._aligned_model))
        try:
            report = self._report("failed", state, self.selected or [], self.action_report)
            write_json_report(args.output_dir, report)
            write_model_card(args.output_dir, facts_from_report(report, REPORT_JSON))  # no claim of an action
        except Exception as error:  # noqa: BLE001 - the message above is the record then
            logger.error("SPLoRA: the report could not be written either (%s: %s).", type(error).__name__, error)

    def _guarded(self, what: str, work: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``work``; an exception is logged (naming ``what``) and training goes on, unless
        ``strict``. A monitoring step is never worth the training."""
        try:
            return work(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if self.config.strict:
                raise
            logger.error("SPLoRA: %s failed (%s: %s); training goes on without it (SPLoRAConfig(strict=True) "
                         "raises instead).", what, type(error).__name__, error)
            return None

    def _measure_rate(self, state: TrainerState, model: nn.Module) -> None:
        """The refusal rate on ``refusal_prompts`` (greedy generation), logged and alerted on."""
        scalars, alerts = self._safety.measure_rate(model, state.global_step)
        if state.is_world_process_zero:
            self._trackers.log_scalars(scalars, state.global_step)
            self._safety_alerts(alerts)

    def _begin_again(self, state: TrainerState) -> None:
        """A second ``train()`` on the same callback: the earlier action is kept in the report
        (``previous_actions``) and said, as the live model already carries it."""
        if self.action_report is None:
            return
        self.previous_actions.append({**self.action_report, "history_steps": [e["step"] for e in self.history]})
        self.action_report, self.selected = None, []
        if state.is_world_process_zero:
            logger.warning("SPLoRA: train() again on a callback that already acted (%s on %d unit(s)): the live model "
                           "keeps that action and this run's action comes on top; the report lists both "
                           "(previous_actions).", self.previous_actions[-1].get("action"),
                           len(self.previous_actions[-1].get("layers") or []))

    def _compare_saved_config(self, state: TrainerState) -> None:
        """Resuming: say which settings differ from the checkpoint's saved config (the new ones are used)."""
        saved = (state.stateful_callbacks.get(type(self).__name__) or {}) if state.global_step else {}
        if isinstance(saved, list):
            saved = saved[0] if saved else {}
        saved_config = (saved.get("args") or {}).get("config")
        if not isinstance(saved_config, dict) or not state.is_world_process_zero:
            return
        changes = config_changes(saved_config, self.config.to_dict())
        if changes:
            logger.warning("SPLoRA: resuming at step %d with a config that differs from the checkpoint's: %s. The new "
                           "config is used from here on; the history before this step was scored with the old one.",
                           state.global_step, "; ".join(changes))

    def _finish(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        """Main process, end of training: report (JSON, then HTML: always, the offline record),
        trackers, the model card, and one console line saying what was done and where things are."""
        self.checkpoints = checkpoint_copies(args.output_dir, self.checkpoints)
        report = self._report("finished", state, self.selected, self.action_report)
        write_json_report(args.output_dir, report)
        self._trackers.final(report)
        html = write_html_report(args.output_dir)
        action = self.action_report or {}
        if action.get("live_model"):  # sharded: the acted adapter was written aside
            folder, adapter, link = Path(action["applied_to"]), action["applied_to"], f"../{REPORT_HTML}"
        else:
            folder, link = Path(args.output_dir), REPORT_HTML
            done = action.get("action") not in (None, "none") and (
                action.get("layers") or (action.get("patch") or {}).get("steps"))
            state_words = ("patched in the live model; " if action.get("action") == "patch" else
                           "acted on in the live model; ") if done else "as trained; "
            adapter = (f"{state_words}trainer.save_model() writes it "
                       f"(to {args.output_dir} by default, next to its model card)")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "add_model_tags"):  # PEFT's card update keeps the model's tags (TRL does the same)
            base.add_model_tags(["splora"])
        facts = facts_from_report(report, link)
        card = write_model_card(folder, facts)
        self._card = (folder, facts)  # written again after trainer.create_model_card (model_card.keep_card_through)
        logger.info("SPLoRA report %s (%s), model card %s", html, REPORT_JSON, card)
        console.info(final_line(report, html, adapter))

    def _resolve_base_model(self, model: nn.Module) -> None:
        """``base_model="auto"``: the base from the aligned model's card or the known pairs (every rank
        reads the same files; no Hub request offline)."""
        aligned = self.config.aligned_model or aligned_name_or_path(model, self.config.adapter_name)
        self.config.base_model, self.base_model_source = infer_base_model(aligned)

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
        non_finite = scores.non_finite()
        if non_finite:  # never a selection (or an action) by NaN / inf: named, nothing selected
            entry["non_finite"] = non_finite[:20]
            selected = None
            (logger.warning if measured else logger.info)(
                "SPLoRA: step %d: %d non-finite score(s) (%s%s); nothing is selected%s.", state.global_step,
                len(non_finite), ", ".join(non_finite[:3]), ", ..." if len(non_finite) > 3 else "",
                " and nothing acted on: the adapter is kept as trained" if measured else " at this step")
        elif not probes and (self.config.metric == "probe" or self.config.rule.needs_probe):
            entry["probes"] = False  # geometry and the refusal loss only: a probe rule selects nothing here
            selected = None
        else:  # a measuring rule runs its forward passes where it acts (every rank alike)
            if not probes:
                entry["probes"] = False
            context = SelectionContext(model=model, probe=self.config.probe, aligned_refusal_loss=aligned_loss,
                                       adapter_name=self.config.adapter_name, acts=measured,
                                       progress=state.is_world_process_zero and not args.disable_tqdm,
                                       tokenizer=getattr(self, "_tokenizer", None),
                                       benign_prompts=self.config.benign_prompts)
            selected = self.config.rule.select(scores, context)
            entry.update(context.notes)
            if self.config.rule.needs_model:
                entry["measured"] = measured
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
        return RepairTrace(**trace).final.get("refusal")

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

    def _write_checkpoint(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        """``checkpoint-N/splora/``: the adapter as the action would leave it, and its report."""
        scores = self._latest_scores(args, state, model)  # scored in on_step_end unless an epoch save
        chosen = self.history[-1]["selected"]
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not broadcast_object(folder.is_dir() if state.is_world_process_zero else None):
            logger.warning("SPLoRA: checkpoint folder %s not found; no acted adapter written.", folder)
            return
        target = folder / CHECKPOINT_SUBDIR
        acted = write_acted_copy(self.config, model, self._alignment, chosen, scores, target,
                                 state.is_world_process_zero)
        if acted is None:
            return
        self.checkpoints.append({"step": state.global_step, "path": str(target.relative_to(args.output_dir)),
                                 "layers": chosen})
        report = self._report("checkpoint", state, chosen, acted)
        write_json_report(target, report)
        if acted["action"] != "none":  # the acted copy gets its card (`splora report` makes the HTML from the JSON)
            write_model_card(target, facts_from_report(report, REPORT_JSON))

    def _report(self, status: str, state: TrainerState, selected: list[str],
                action: dict[str, Any] | None) -> dict[str, Any]:
        report = build_report(
            self.config.to_dict(), self.history, selected=selected, action=action, status=status,
            step=state.global_step, checkpoints=self.checkpoints, alignment=self._alignment_info,
        )
        report["runtime"] = self.config.runtime.summary()  # the probes, summarised (not config data)
        if self.previous_actions:
            report["previous_actions"] = self.previous_actions
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
