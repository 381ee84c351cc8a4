"""Resuming a run: the callback the user passed, the config it ran with, the acted copies on disk.

A resumed ``Trainer`` does three things this module undoes or completes:

- with ``restore_callback_states_from_checkpoint=True`` it rebuilds every stateful callback from
  the checkpoint's JSON (``type(callback)(**state["args"])``), dropping the one the user passed:
  its probes (not JSON) and its new settings would be lost. :func:`passed_callback` hands the
  user's callback back instead (``SPLoRACallback.__new__``), and :func:`config_changes` says what
  differs from the saved config (the new config is used);
- it loads every sub-folder of the checkpoint that holds adapter weights as one more adapter,
  ``checkpoint-N/splora`` (SPLoRA's acted copy) included, which then runs wherever the trained
  adapter is pruned and is saved with it: :func:`drop_loaded_copies` removes it;
- the checkpoint it resumes from saved its state before SPLoRA wrote that checkpoint's acted copy,
  and ``save_total_limit`` deletes old checkpoints: :func:`checkpoint_copies` lists what exists.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .report import REPORT_JSON

CHECKPOINT_SUBDIR = "splora"
_passed: weakref.ref | None = None  # the callback last constructed from a config in this process


def remember_passed(callback: Any) -> None:
    """Record ``callback`` (built from a config or keywords, not from a checkpoint's JSON)."""
    global _passed
    _passed = weakref.ref(callback)


def passed_callback(cls: type) -> Any | None:
    """The callback of class ``cls`` last constructed from a config in this process, if alive: the
    one to hand back to a ``Trainer`` that rebuilds callbacks from a checkpoint."""
    callback = _passed() if _passed is not None else None
    return callback if type(callback) is cls else None


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: saved -> current"`` for every field both have whose value differs (a field only one
    version of the library has is no change, nor ``base_model`` "auto" resolved to a path)."""
    changes = []
    for key in sorted(set(saved) & set(current)):
        before, after = saved.get(key), current.get(key)
        if before != after and not (key == "base_model" and "auto" in (before, after)):
            changes.append(f"{key}: {before!r} -> {after!r}")
    return changes


def checkpoint_copies(output_dir: str, known: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The acted checkpoint copies that exist now, by step: the recorded ones (``known``) whose
    folder is still there, and those on disk with a report but not recorded (the checkpoint a run
    resumed from)."""
    root = Path(output_dir)
    found = {entry["path"]: entry for entry in known if (root / entry["path"]).is_dir()}
    for folder in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*/{CHECKPOINT_SUBDIR}"):
        path = str(folder.relative_to(root))
        if path in found or not (folder / REPORT_JSON).is_file():
            continue
        try:
            step = int(folder.parent.name.rsplit("-", 1)[1])
            layers = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8")).get("selected", [])
        except (ValueError, OSError):  # not a checkpoint of this run, or a report being replaced
            continue
        found[path] = {"step": step, "path": path, "layers": layers}
    return sorted(found.values(), key=lambda entry: entry["step"])


def drop_loaded_copies(model: nn.Module, adapter: str) -> list[str]:
    """Delete the adapters a resumed Trainer loaded from ``checkpoint-N/splora`` (named ``splora``);
    the scored adapter and which adapters are active stay as they were. Returns the names deleted."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or CHECKPOINT_SUBDIR not in configs or adapter == CHECKPOINT_SUBDIR:
        return []
    active = list(getattr(model, "active_adapters", [adapter]))
    model.delete_adapter(CHECKPOINT_SUBDIR)
    if CHECKPOINT_SUBDIR in active:
        active.remove(CHECKPOINT_SUBDIR)
    if active and list(model.active_adapters) != active:
        model.set_adapter(active if len(active) > 1 else active[0])
    return [CHECKPOINT_SUBDIR]
