"""What :class:`SPLoRACallback` checks in ``on_train_begin``, so that nothing fails after training.

A failure in ``on_train_end`` comes after the live model was pruned and before the user's
``trainer.save_model()``: the training would be lost. So everything that can be known before
step 1 is checked here: the output folder can be written, the acted adapters will not land on an
input, the selection cannot prune every layer, and a checkpoint saved without the callback can be
resumed (transformers raises ``KeyError`` at the next save otherwise).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from ._io import OutputNotWritableError, check_output_path, check_writable
from .adapter_files import check_adapter_patterns
from .layer_names import NothingLeftError, check_not_everything, model_input_paths
from .model_card import CARD, UNPARSED_CARD, card_problem

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: str) -> None:
    """The Trainer's ``output_dir`` can be written (created if missing).

    Raises:
        OutputNotWritableError: names ``output_dir`` and why; raised before step 1.
    """
    try:
        check_writable(output_dir, "TrainingArguments.output_dir", directory=True)
    except OutputNotWritableError as error:
        raise OutputNotWritableError(
            f"SPLoRACallback: {error} The report (and, with save_strategy='no', everything else) is written "
            "there after training; set output_dir to a folder you can write to."
        ) from error


def check_acted_outputs(output_dir: str, model: nn.Module, adapter: str, config: Any, sharded: bool) -> None:
    """The acted adapters (``output_dir/splora``, ``checkpoint-N/splora``) never land on an input.

    Raises:
        UnsafeOutputError: ``output_dir`` is, contains or lies inside the model's checkpoint, the
            base or the aligned model.
    """
    if config.action == "none" or not (config.prune_at_checkpoints or (config.prune_at_end and sharded)):
        return
    inputs = model_input_paths(model, adapter)
    inputs.update({"base model": config.base_model, "aligned model": config.aligned_model,
                   "alignment cache": config.alignment_cache})
    check_output_path(Path(output_dir) / "splora", inputs, what="SPLoRA's adapter folder")


def check_action_needs(model: nn.Module, adapter: str, config: Any, names: list[str]) -> None:
    """What the action at the end will need of the adapter config (its regexes, the pattern keys
    component pruning adds), checked before step 1 rather than after training.

    Raises:
        ValueError: names the field (``exclude_modules``, ``rank_pattern``, ``alpha_pattern``), the
            key and the fix.
    """
    if config.action in ("none", "patch") or not (config.prune_at_end or config.prune_at_checkpoints):
        return  # the patch changes factor values only
    peft_config = model.peft_config[adapter] if hasattr(model, "peft_config") else {}
    try:
        check_adapter_patterns(peft_config, names, components=config.action == "prune" and config.granularity == "component")
    except ValueError as error:
        raise ValueError(f"SPLoRACallback: {error} (checked before step 1: the action at the end of training "
                         "would fail on it)") from error


def check_patch_needs(config: Any, tokenizer: Any, sharded: bool) -> None:
    """What ``action="patch"`` will need at the end of training, checked before step 1.

    Raises:
        ValueError: the model is sharded (FSDP / ZeRO-3); no tokenizer (the anchors' answers and the
            rate stop generate); the rate stop with a probe without prompts. Each names the fix.
    """
    if sharded:
        raise ValueError("SPLoRAConfig.action='patch' trains the live LoRA factors, which FSDP / ZeRO-3 shard: train "
                         "with action='none' (or prune) and patch the saved adapter in one process afterwards "
                         "(splora_callback.safety_patch).")
    if tokenizer is None and (config.patch_anchors or config.patch_stop == "refusal_rate"):
        raise ValueError("SPLoRAConfig.action='patch' generates answers (the benign anchors, the refusal-rate stop) "
                         "and needs the tokenizer: pass it to the Trainer as processing_class=tokenizer (SFTTrainer "
                         "does).")
    if config.patch_stop == "refusal_rate" and not getattr(config.probe, "prompts", None):
        raise ValueError("SPLoRAConfig.patch_stop='refusal_rate' answers the safety probe's prompts; this probe has "
                         "none: build it with SafetyProbe.from_pairs(tokenizer, pairs), or patch_stop='refusal_loss'.")


def warn_if_card_unmergeable(output_dir: str) -> None:
    """Warn before step 1 when ``output_dir/README.md`` cannot be merged: PEFT's ``save_pretrained``
    fails on it; at the end of training SPLoRA moves it aside (``model_card.write_model_card``)."""
    problem = card_problem(output_dir)
    if problem is not None:
        logger.warning(
            "SPLoRA: %s has YAML front matter that does not parse (%s). PEFT's save_pretrained "
            "(trainer.save_model) raises on such a card and saves nothing, so at the end of training SPLoRA "
            "moves it, unchanged, to %s and writes a new card. Fix or remove it now to keep it in place.",
            Path(output_dir) / CARD, problem, UNPARSED_CARD)


def check_not_pruning_everything(config: Any, layers: int) -> None:
    """Refuse a config that would prune every LoRA layer (``k >= layers``, ``fraction`` near 1).

    Raises:
        NothingLeftError: before step 1, naming the option to change.
    """
    acts = config.prune_at_end or config.prune_at_checkpoints
    if config.action != "prune" or not acts or getattr(config, "granularity", "layer") != "layer":
        return
    if config.rule.selects_every_layer(layers):
        options = ", ".join(f"{key}={value}" for key, value in config.rule.parameters().items() if value is not None)
        raise NothingLeftError(
            f"SPLoRAConfig.{options} selects all {layers} LoRA layers: pruning them would leave nothing of the "
            "fine-tune, and PEFT cannot load an adapter without a LoRA module. Select fewer layers, or use "
            "the aligned model itself."
        )


def resume_without_state(state: Any, callback: Any, restored: bool) -> None:
    """Give a checkpoint saved without this callback an entry for it, so that the next save works.

    ``Trainer._save_checkpoint`` updates ``state.stateful_callbacks[name]`` of every stateful
    callback and raises ``KeyError`` when the checkpoint it resumed from had none (leaving that new
    checkpoint without ``trainer_state.json``). The score history then starts fresh (warned once).
    """
    name = type(callback).__name__
    if state.global_step == 0 or name in state.stateful_callbacks:
        return
    state.stateful_callbacks[name] = callback.state()
    if restored:  # without restore_callback_states_from_checkpoint the callback says so already
        logger.warning(
            "SPLoRA: resuming at step %d from a checkpoint saved without %s: its score history starts "
            "fresh at this step.", state.global_step, name,
        )


def refusal_to_prune_everything(config: Any, selected: Any, scores: Any) -> dict[str, Any] | None:
    """The action report of a refused prune when ``selected`` is every LoRA layer, else None.

    A threshold can only be judged at the end: then the live model stays as trained (its saved
    adapter loads), the error is logged and the report records why nothing was pruned.

    Args:
        scores: the :class:`~splora_callback.scoring.LayerScores` of the selection (or its dict).
    """
    if config.action != "prune" or not isinstance(selected, (list, tuple)):
        return None
    names = [item["name"] for item in scores["layers"]] if isinstance(scores, dict) else [s.name for s in scores]
    try:
        check_not_everything(list(selected), names)
    except NothingLeftError as error:
        logger.error("SPLoRA: %s Nothing was pruned; the model is left as trained.", error)
        return {"action": "none", "layers": [], "refused": str(error), "selected": list(selected)}
    return None
