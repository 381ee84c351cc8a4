"""Layer names checked before a write, and what a write must never touch.

``check_layer_names`` turns a user's choice into known LoRA layer names (close matches suggested),
``check_not_everything`` refuses to prune all of them, ``model_input_paths`` lists the model's own
checkpoints so that no output replaces an input.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .layers import iter_lora_layers, resolve_adapter_name, unwrap_peft


class UnknownLayerError(KeyError, ValueError):
    """A layer name that is not a LoRA layer of the adapter (a typo, or already pruned)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class NothingLeftError(ValueError):
    """Pruning would remove every LoRA layer: nothing of the fine-tune left, and PEFT cannot load it."""


def check_layer_names(chosen: object, known: Sequence[str], what: str = "chosen") -> list[str]:
    """``chosen`` as a list of layer names, each one of ``known``.

    Raises:
        TypeError: ``chosen`` is a single string (``list("q_proj")`` would be its letters) or not
            a sequence of strings.
        ValueError: a name is not a LoRA layer here; close matches are suggested.
    """
    if isinstance(chosen, (str, bytes)):
        raise TypeError(f"{what}={chosen!r} is one string; pass a list of layer names: [{chosen!r}].")
    try:
        names = list(chosen)
    except TypeError:
        raise TypeError(f"{what} must be a list of layer names, got {type(chosen).__name__}.") from None
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"{what} must hold layer names (str), got {[type(n).__name__ for n in names][:3]}.")
    available = set(known)
    unknown = [name for name in names if name not in available]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=3)
        raise UnknownLayerError(
            f"{what}: {unknown[0]!r} is not a LoRA layer of this adapter (already pruned?); it has "
            f"{len(available)}, e.g. {sorted(available)[:2]}" + (f"; did you mean {close}?" if close else ".")
        )
    return names


def checked_layer_names(model: nn.Module, chosen: object, adapter_name: str | None = None,
                        prune: bool = False) -> list[str]:
    """``chosen`` checked against the live model's LoRA layers (:func:`check_layer_names`), and,
    with ``prune``, refused when it is all of them (:func:`check_not_everything`)."""
    known = [name for name, _ in iter_lora_layers(model, resolve_adapter_name(model, adapter_name))]
    names = check_layer_names(chosen, known)
    if prune:
        check_not_everything(names, known)
    return names


def check_not_everything(pruned: Sequence[str], layers: Sequence[str]) -> None:
    """Refuse to prune every LoRA layer of an adapter.

    Raises:
        NothingLeftError: ``pruned`` covers all of ``layers``: nothing of the fine-tune would be
            left, and ``PeftModel.from_pretrained`` refuses such an adapter (``NoMatchingPeftModuleError``).
    """
    if layers and set(layers) <= set(pruned):
        raise NothingLeftError(
            f"Pruning all {len(set(layers))} LoRA layers would leave nothing of the fine-tune, and PEFT "
            "cannot load an adapter without a LoRA module. Use the aligned model itself, or select fewer "
            "layers (a smaller k / fraction, a higher threshold)."
        )


def model_input_paths(model: nn.Module, adapter_name: str, alignment: object | None = None) -> dict[str, str]:
    """Local folders and files a write for ``model`` must never touch: the model's checkpoint, the
    adapter's base model, and the alignment's base / aligned checkpoints and cache file."""
    inputs: dict[str, str] = {}
    peft_config = getattr(model, "peft_config", None)
    config = peft_config.get(adapter_name) if isinstance(peft_config, dict) else None
    candidates = {
        "model checkpoint": getattr(getattr(unwrap_peft(model), "config", None), "_name_or_path", None),
        "adapter's base model": getattr(config, "base_model_name_or_path", None),
    }
    source = getattr(alignment, "source", None) or {}
    candidates.update({"base model": source.get("base"), "aligned model": source.get("aligned"),
                       "alignment cache": getattr(alignment, "cache_file", None)})
    for label, value in candidates.items():
        if isinstance(value, (str, os.PathLike)) and str(value) and Path(value).expanduser().exists():
            inputs[label] = str(value)
    return inputs
