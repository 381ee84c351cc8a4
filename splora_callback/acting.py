"""What the callback does to the live model and the adapters it writes, apart from when.

:func:`end_action` builds the action at the end of training aside (or says why nothing is
swapped in), :func:`write_acted_copy` writes ``checkpoint-N/splora/`` while training goes on,
and :func:`repair_command` is the ``splora prune`` line that repairs a saved adapter after the
fact, which the error of a failed action gives.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from torch import nn

from . import preflight
from .distributed import prepare_action_distributed, prepare_patch_distributed, save_acted_adapter_distributed
from .layers import resolve_adapter_name
from .pruning import PreparedAction
from .resume import CHECKPOINT_SUBDIR
from .selection import removed_ranks
from .sharding import warn_if_sharded


def end_action(config: Any, model: nn.Module, alignment: Any, selected: Any, entry: dict[str, Any],
               output_dir: str, *, tokenizer: Any = None, aligned_refusal_loss: float | None = None,
               progress: bool = False) -> tuple[PreparedAction | None, dict[str, Any] | None]:
    """The action on ``selected`` (the final history ``entry``'s selection), built aside: nothing
    of the live model changes here. ``action="patch"`` ignores the selection: the safety patch
    (``patch.prepare_patch``, collective) with the config's ``patch_*`` settings, its anchors
    ``benign_prompts`` answered by the trained LoRA, ``tokenizer`` for them and for the rate stop,
    ``aligned_refusal_loss`` for the loss stop, ``progress`` for the patch's step bar.

    Returns:
        ``(prepared, None)``: commit ``prepared`` to act. ``(None, action report)``: nothing to
        swap in: non-finite scores, a selection of every layer (refused: PEFT cannot load an
        adapter without a LoRA module), or FSDP / ZeRO-3, whose acted adapter is written aside
        to ``output_dir/splora`` (collective).
    """
    if entry.get("non_finite"):  # named when scored; a selection by NaN is no selection
        return None, {"action": "none", "layers": [], "skipped": (
            f"non-finite scores ({', '.join(entry['non_finite'][:3])}): nothing acted on")}
    if config.action == "patch":
        return prepare_patch_distributed(
            model, config.probe, tokenizer=tokenizer, benign_prompts=config.benign_prompts,
            anchors=config.patch_anchors, adapter_name=config.adapter_name, lr=config.patch_lr,
            max_steps=config.patch_max_steps, stop=config.patch_stop, restore=config.patch_restore,
            factors=config.patch_factors, target_loss=aligned_refusal_loss, progress=progress), None
    refused = preflight.refusal_to_prune_everything(config, selected, entry["scores"])
    if refused:  # the model stays as trained, the report says why
        return None, refused
    if warn_if_sharded(model, config.action):  # the live flat parameters are not edited
        target = Path(output_dir) / CHECKPOINT_SUBDIR
        save_acted_adapter_distributed(model, target, selected, config.action, alignment, config.adapter_name,
                                       overwrite=True)
        return None, {"action": config.action, "layers": list(selected), "applied_to": str(target),
                      "live_model": "unchanged (sharded)"}
    return prepare_action_distributed(model, alignment, selected, config.action, config.adapter_name), None


def write_acted_copy(config: Any, model: nn.Module, alignment: Any, chosen: Any, scores: Any, target: Path,
                     is_main: bool) -> dict[str, Any] | None:
    """Write the adapter as the action would leave it to ``target`` (collective: the adapter
    tensors are gathered to the main process, which writes), the live model untouched.

    Returns:
        The action record on the main process (``parameters_removed``: (m + n) LoRA parameters
        per removed rank-one component or rank), None elsewhere or when nothing can be written
        (non-finite scores: ``chosen`` None; every layer selected).
    """
    if chosen is None or preflight.refusal_to_prune_everything(config, chosen, scores) is not None:
        return None
    if config.action != "none":
        save_acted_adapter_distributed(model, target, chosen, config.action, alignment, config.adapter_name,
                                       overwrite=True)
    if not is_main:
        return None
    removed = 0
    if config.action == "prune":
        removed = sum(count * sum(scores[name].shape) for name, count in removed_ranks(scores, chosen).items())
    return {"action": config.action, "layers": chosen, "parameters_removed": removed,
            "adapter_name": resolve_adapter_name(model, config.adapter_name), "applied_to": "checkpoint copy"}


def repair_command(config: Any, adapter_dir: str, aligned: str | None) -> str:
    """The ``splora prune`` command line that applies ``config``'s rule to the adapter saved in
    ``adapter_dir`` (placeholders in capitals: files the user provides); for ``action="patch"``,
    the Python lines that patch it (``safety_patch``; the CLI does not train)."""
    if config.action == "patch":  # the callback's settings; BENIGN_PROMPTS: the user's own anchors, if given
        from .patch import ANCHOR_NEW_TOKENS

        benign = "BENIGN_PROMPTS" if config.benign_prompts else "splora_callback.patch.DEFAULT_ANCHOR_REQUESTS"
        return (f"in Python, model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                f"{aligned or 'ALIGNED'!r}), {adapter_dir!r}); splora_callback.safety_patch(model, probe, "
                f"tokenizer=tokenizer, lr={config.patch_lr!r}, max_steps={config.patch_max_steps!r}, "
                f"stop={config.patch_stop!r}, restore={config.patch_restore!r}, factors={config.patch_factors!r}, "
                f"anchors={config.patch_anchors!r}, "
                f"anchor_pairs=splora_callback.patch.anchor_pairs(model, tokenizer, {benign}, "
                f"max_new_tokens={ANCHOR_NEW_TOKENS})); "
                f"model.save_pretrained({adapter_dir.rstrip('/') + '-patched'!r})")
    parts = ["splora", "prune", adapter_dir]
    if config.base_model:
        parts += ["--base", config.base_model]
    if aligned:
        parts += ["--aligned", aligned]
    if config.metric == "probe":
        parts += ["--granularity", config.granularity]
    else:
        parts += ["--metric", config.metric]
    parts += config.rule.cli_arguments() or ["--top-k", "K"]  # a rule without a CLI form: choose a count
    if config.action == "project":
        parts += ["--action", "project"]
    parts += ["--output", f"{adapter_dir.rstrip('/')}-repaired"]
    return shlex.join(parts)
