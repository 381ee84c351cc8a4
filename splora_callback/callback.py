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

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .alignment import AlignmentMismatchError, AlignmentSubspace
from .checkpoint import CheckpointError
from .config import SPLoRAConfig
from .dashboard import wandb_final_media, write_html_report
from .distributed import (
    alignment_for_rank,
    alignment_info,
    apply_action_distributed,
    broadcast_object,
    save_acted_adapter_distributed,
    score_layers_distributed,
)
from .layers import resolve_adapter_name
from .report import (
    build_report,
    over_threshold,
    wandb_step_payload,
    wandb_summary,
    write_json_report,
)
from .scoring import LayerScores
from .selection import select_layers
from .sharding import lora_layers, warn_if_sharded

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "splora"
# The probe is not JSON, so a resumed callback (rebuilt by the Trainer from JSON args) finds the
# probe of the callback the user passed in this process here, keyed by the rest of the config.
_PROBES: dict[str, Any] = {}


def _config_args(config: SPLoRAConfig) -> dict[str, Any]:
    """The JSON-able constructor arguments of ``config`` (everything but the probe)."""
    return {key: value for key, value in config.to_dict().items() if key != "probe"}


def _probe_key(config_args: dict[str, Any]) -> str:
    return json.dumps(config_args, sort_keys=True)


def _wandb(args: TrainingArguments) -> Any | None:
    """The wandb module when W&B is a ``report_to`` backend and ``WandbCallback`` opened a run."""
    if "wandb" not in (args.report_to or []):
        return None
    import wandb  # lazy, as transformers' WandbCallback and TRL do

    if wandb.run is None:
        logger.warning("report_to has 'wandb' but no W&B run is open: SPLoRA writes only its report.")
        return None
    return wandb


class SPLoRACallback(TrainerCallback, ExportableState):
    """Monitor LoRA layers' safety drift during training and act on the worst at the end.

    Args:
        config: a :class:`SPLoRAConfig`, or its ``to_dict()`` without the probe (how the Trainer
            rebuilds the callback when resuming with ``restore_callback_states_from_checkpoint``).

    Attributes:
        history: one entry per scoring call: ``{"step", "seconds", "selected", "scores"}`` with
            ``scores`` a :meth:`LayerScores.to_dict`. Survives resume (``ExportableState``).
        selected: layers chosen at the end of training; ``action_report``: what was done to them.

    Raises (in ``on_train_begin``, before the first step):
        NoLoraLayersError, UnsupportedAdapterError: the model has no (plain) LoRA layer.
        AlignmentMismatchError, CheckpointError: ``config.base_model`` does not match the model.
    """

    def __init__(self, config: SPLoRAConfig | dict[str, Any]):
        if isinstance(config, dict):
            probe = _PROBES.get(_probe_key(config))
            if config.get("metric") == "probe" and probe is None:
                raise ValueError(
                    "SPLoRACallback: cannot rebuild a metric='probe' callback from saved state without "
                    "its probe; pass SPLoRACallback(SPLoRAConfig(..., probe=...)) with the same config to "
                    "the Trainer."
                )
            config = SPLoRAConfig(**config, probe=probe)
        elif config.probe is not None:
            _PROBES[_probe_key(_config_args(config))] = config.probe
        self.config = config
        self.history: list[dict[str, Any]] = []
        self.alerted: list[str] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.selected: list[str] = []
        self.action_report: dict[str, Any] | None = None
        self._alignment: AlignmentSubspace | None = None
        self._alignment_info: dict[str, Any] | None = None
        self._scores: LayerScores | None = None

    def state(self) -> dict[str, Any]:
        """JSON state saved in every checkpoint's ``trainer_state.json`` (``ExportableState``)."""
        return {
            "args": {"config": _config_args(self.config)},
            "attributes": {"history": self.history, "alerted": self.alerted, "checkpoints": self.checkpoints},
        }

    # --- the one scoring call site ---------------------------------------------------------------

    def compute_scores(self, model: nn.Module) -> LayerScores:
        """Score every LoRA layer of ``model``: E-DIEM, cosine, signed diagnostic (and the probe).

        The single place scores are computed. In a multi-process run each rank scores its slice
        of the layers and every rank gets all scores (:func:`score_layers_distributed`); in one
        process this is exactly :func:`score_layers`. Runs under ``torch.no_grad()`` on the
        device ``on_train_begin`` put the alignment subspace on (the LoRA weights' device); a probe
        takes its own gradients inside (``torch.enable_grad``) and restores modes and RNG states.
        """
        config = self.config
        with torch.no_grad():
            return score_layers_distributed(
                model, self._alignment, config.metric, null=config.null, permutations=config.permutations,
                seed=config.seed, adapter_name=config.adapter_name, probe=config.probe,
            )

    # --- Trainer events --------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs) -> None:
        """Build the alignment subspace once; fail before the first step if it cannot be built."""
        config = self.config
        if state.global_step > 0 and not self.history and not args.restore_callback_states_from_checkpoint:
            logger.warning(
                "Resuming at step %d without TrainingArguments(restore_callback_states_from_checkpoint="
                "True): SPLoRA's score history before this step is not restored.", state.global_step)
        adapter, layers = lora_layers(model, config.adapter_name)  # no LoRA / DoRA: raise now
        warn_if_sharded(model, config.action)
        if self.history:  # restored from a checkpoint
            self._scores = LayerScores.from_dict(self.history[-1]["scores"])
        if config.base_model is None:  # metric="probe" without geometry
            return
        try:
            self._alignment = alignment_for_rank(  # each rank builds V for its slice of layers only
                config.base_model, model, aligned=config.aligned_model,
                adapter_name=config.adapter_name, cache_file=config.alignment_cache,
                dtype=getattr(torch, config.alignment_dtype),
                device=layers[0][1].lora_A[adapter].weight.device,  # scoring runs where LoRA weights live
                progress=state.is_world_process_zero and not args.disable_tqdm,
            )
        except (AlignmentMismatchError, CheckpointError) as error:
            raise type(error)(
                f"SPLoRACallback: config.base_model={config.base_model!r} does not match the model being "
                f"trained: {error}"
            ) from error
        self._alignment_info = alignment_info(self._alignment)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs) -> None:
        """Score on schedule, at the last step, and before a checkpoint that gets an acted adapter.

        Scoring before the save (``control.should_save`` is set by ``DefaultFlowCallback``, which
        runs first) puts the scores into that checkpoint's callback state.
        """
        every = self.config.score_every_n_steps
        if ((every and state.global_step % every == 0) or state.global_step >= state.max_steps
                or (self.config.prune_at_checkpoints and control.should_save)):
            self._score(args, state, model)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs) -> None:
        """Write ``checkpoint-N/splora/`` (acted adapter + report) and refresh the running report."""
        if self.config.prune_at_checkpoints:
            scores = self._latest_scores(args, state, model)  # scored in on_step_end unless an epoch save
            self._write_checkpoint(args, state, model, scores, self.history[-1]["selected"])
        if state.is_world_process_zero and self.history:
            selected = self.history[-1]["selected"]
            write_json_report(args.output_dir, self._report("running", state, selected, None))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs) -> None:
        """Final scores, selection and action on the live model; then the report and dashboards.

        Runs after the Trainer's last checkpoint was saved (that checkpoint keeps the unpruned
        adapter, so resuming from it stays exact) and before the user's ``trainer.save_model()``,
        which therefore writes the pruned adapter.
        """
        self._latest_scores(args, state, model, rescore=args.load_best_model_at_end)
        self.selected = list(self.history[-1]["selected"])
        config = self.config
        if config.prune_at_end and warn_if_sharded(model, config.action):
            # FSDP / ZeRO-3: the live flat parameters are not edited; the acted adapter is written aside
            target = Path(args.output_dir) / CHECKPOINT_SUBDIR
            save_acted_adapter_distributed(model, target, self.selected, config.action, self._alignment,
                                           config.adapter_name, overwrite=True)
            self.action_report = {"action": config.action, "layers": self.selected,
                                  "applied_to": str(target), "live_model": "unchanged (sharded)"}
        elif config.prune_at_end:
            acted = apply_action_distributed(model, self._alignment, self.selected, config.action,
                                             config.adapter_name)
            self.action_report = acted.to_dict()
        if state.is_world_process_zero:
            report = self._report("finished", state, self.selected, self.action_report)
            path = write_json_report(args.output_dir, report)
            wandb = _wandb(args)
            if wandb is not None:
                wandb.run.log({**wandb_final_media(wandb, report), "train/global_step": state.global_step})
                wandb.run.summary.update(wandb_summary(report))
            else:
                path = write_html_report(args.output_dir)
            logger.info("SPLoRA report written to %s", path)
        self._alignment = None  # V can be as large as the adapted weights: free it

    # --- helpers ---------------------------------------------------------------------------------

    def _score(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> LayerScores:
        start = time.perf_counter()
        scores = self.compute_scores(model)
        seconds = time.perf_counter() - start
        selected = select_layers(scores, **self.config.selection_kwargs())
        self.history.append({"step": state.global_step, "seconds": seconds, "selected": selected,
                             "scores": scores.to_dict()})
        self._scores = scores
        if state.is_world_process_zero:
            wandb = _wandb(args)
            if wandb is not None:  # no step=: the Trainer owns W&B's step; charts use train/global_step
                threshold = over_threshold(self.config.to_dict())
                wandb.run.log(wandb_step_payload(scores, state.global_step, selected, threshold, seconds))
            self._alert(wandb, scores, state.global_step)
        return scores

    def _latest_scores(self, args: TrainingArguments, state: TrainerState, model: nn.Module,
                       rescore: bool = False) -> LayerScores:
        """The scores of this step: reused if already computed (and the weights not reloaded)."""
        current = bool(self.history) and self.history[-1]["step"] == state.global_step
        if rescore or self._scores is None or not current:
            return self._score(args, state, model)
        return self._scores

    def _alert(self, wandb: Any | None, scores: LayerScores, step: int) -> None:
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
        if wandb is not None:
            # one title per step: W&B drops an alert whose title repeats within wait_duration (1 min)
            wandb.run.alert(title=f"SPLoRA: safety drift at step {step}", text=text, level="WARN")

    def _write_checkpoint(self, args: TrainingArguments, state: TrainerState, model: nn.Module,
                          scores: LayerScores, chosen: list[str]) -> None:
        """``checkpoint-N/splora/``: the adapter as the action would leave it, and its report."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not broadcast_object(folder.is_dir() if state.is_world_process_zero else None):
            logger.warning("SPLoRA: checkpoint folder %s not found; no acted adapter written.", folder)
            return
        target, action = folder / CHECKPOINT_SUBDIR, self.config.action
        if action != "none":  # collective: adapter tensors are gathered to the main process, which writes
            save_acted_adapter_distributed(model, target, chosen, action, self._alignment,
                                           self.config.adapter_name, overwrite=True)
        if not state.is_world_process_zero:
            return
        removed = 0
        if action == "prune":  # r (m + n) LoRA parameters per pruned layer
            removed = sum(scores[name].rank * sum(scores[name].shape) for name in chosen)
        acted = {"action": action, "layers": chosen, "parameters_removed": removed,
                 "adapter_name": resolve_adapter_name(model, self.config.adapter_name),
                 "applied_to": "checkpoint copy"}
        self.checkpoints.append({"step": state.global_step, "path": str(target.relative_to(args.output_dir)),
                                 "layers": chosen})
        write_json_report(target, self._report("checkpoint", state, chosen, acted))

    def _report(self, status: str, state: TrainerState, selected: list[str],
                action: dict[str, Any] | None) -> dict[str, Any]:
        return build_report(
            self.config.to_dict(), self.history, selected=selected, action=action, status=status,
            step=state.global_step, checkpoints=self.checkpoints, alignment=self._alignment_info,
        )
