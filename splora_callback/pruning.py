"""Act on the selected layers: ``prune`` (SPLoRA), ``project`` (Safe LoRA) or ``none``.

``prune`` gives the module back its plain base layer (no LoRA matmul left at inference) and adds it
to the adapter config's ``exclude_modules``, so ``PeftModel.from_pretrained`` on the saved adapter
rebuilds exactly the pruned model. Pruned adapters can also be written without touching the live
model (checkpoints during training, the CLI); every write is atomic.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from ._io import atomic_directory
from .alignment import AlignmentSubspace
from .layers import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, resolve_adapter_name, unwrap_peft
from .metrics import safe_lora_projection

logger = logging.getLogger(__name__)

Action = Literal["prune", "project", "none"]


@dataclass
class ActionReport:
    """What an action did.

    Attributes:
        action: ``"prune"``, ``"project"`` or ``"none"``.
        layers: module names acted on, in selection order.
        parameters_removed: LoRA parameters removed (prune) or 0.
    """

    action: str
    layers: list[str] = field(default_factory=list)
    adapter_name: str = "default"
    parameters_removed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _lora_layer(model: nn.Module, name: str, adapter_name: str) -> LoraLayer:
    module = unwrap_peft(model).get_submodule(name)
    if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
        raise KeyError(f"{name} is not a LoRA layer of adapter {adapter_name!r} (already pruned?).")
    return module


def excluded(exclude_modules: str | Iterable[str] | None, names: Sequence[str]) -> str | set[str]:
    """``exclude_modules`` extended by ``names`` (exact module names), keeping PEFT's format."""
    if not exclude_modules:
        return set(names)
    if isinstance(exclude_modules, str):  # PEFT full-matches a string as one regex
        return "|".join([f"(?:{exclude_modules})", *(re.escape(name) for name in names)])
    return set(exclude_modules) | set(names)


@torch.no_grad()
def prune_layers(model: nn.Module, names: Sequence[str], adapter_name: str | None = None) -> ActionReport:
    """Remove the LoRA update of ``names`` from the live model (SPLoRA's pruning).

    A module holding only this adapter is replaced by its base layer; with other adapters on it,
    only this adapter is deleted there. The adapter config excludes the modules from then on.
    Prune after training, not in the middle: the optimizer still holds the removed parameters.
    """
    adapter = resolve_adapter_name(model, adapter_name)
    root = unwrap_peft(model)
    removed = 0
    for name in names:
        layer = _lora_layer(model, name, adapter)
        removed += layer.lora_A[adapter].weight.numel() + layer.lora_B[adapter].weight.numel()
        if len(layer.lora_A) == 1:
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, layer.get_base_layer())
        else:
            layer.delete_adapter(adapter)
    config = model.peft_config[adapter]
    config.exclude_modules = excluded(config.exclude_modules, list(names))
    return ActionReport("prune", list(names), adapter, removed)


@torch.no_grad()
def project_layers(
    model: nn.Module, alignment: AlignmentSubspace, names: Sequence[str], adapter_name: str | None = None
) -> ActionReport:
    """Safe LoRA's action on the live model: ``B <- C B`` with ``C = V V^T / ||V||_F``."""
    adapter = resolve_adapter_name(model, adapter_name)
    for name in names:
        _check_projectable(alignment, name)
        weight = _lora_layer(model, name, adapter).lora_B[adapter].weight
        weight.copy_(safe_lora_projection(alignment.directions[name], weight, alignment.frobenius_norms[name]))
    return ActionReport("project", list(names), adapter)


def _check_projectable(alignment: AlignmentSubspace | None, name: str) -> None:
    if alignment is None or name not in alignment or not alignment.has_signal(name):
        raise ValueError(f"{name}: 'project' needs a non-zero alignment direction for this module.")


def _no_action(model: nn.Module, alignment: AlignmentSubspace | None, names: Sequence[str], adapter_name: str | None = None) -> ActionReport:
    return ActionReport("none", list(names), resolve_adapter_name(model, adapter_name))


ACTIONS: dict[str, Callable[..., ActionReport]] = {
    "prune": lambda model, alignment, names, adapter_name=None: prune_layers(model, names, adapter_name),
    "project": project_layers,
    "none": _no_action,
}


def apply_action(
    model: nn.Module,
    alignment: AlignmentSubspace | None,
    chosen: Sequence[str],
    action: Action | Callable[..., ActionReport] = "prune",
    adapter_name: str | None = None,
) -> ActionReport:
    """Apply ``action`` to the ``chosen`` layers of the live model and report what was done.

    ``action`` is a name in :data:`ACTIONS` or a callable with the same signature.
    """
    function = ACTIONS.get(action) if isinstance(action, str) else action
    if function is None:
        raise ValueError(f"action={action!r}; expected one of {sorted(ACTIONS)} or a callable.")
    report = function(model, alignment, list(chosen), adapter_name=adapter_name)
    logger.info("SPLoRA %s: %d layer(s) %s", report.action, len(report.layers), report.layers[:8])
    return report


def acted_state_dict(
    state_dict: dict[str, torch.Tensor],
    chosen: Sequence[str],
    action: Action,
    alignment: AlignmentSubspace | None = None,
) -> dict[str, torch.Tensor]:
    """A saved adapter's tensors after ``action`` on ``chosen`` (keys ``base_model.model.<name>.…``)."""
    prefixes = {name: f"{PEFT_PREFIX}{name}." for name in chosen}
    present = {name for name, prefix in prefixes.items() if any(key.startswith(prefix) for key in state_dict)}
    missing = set(chosen) - present
    if missing:
        raise KeyError(f"The adapter has no weights for {sorted(missing)[:3]}.")
    result = dict(state_dict)
    for name, prefix in prefixes.items():
        if action == "prune":
            result = {key: value for key, value in result.items() if not key.startswith(prefix)}
        elif action == "project":
            _check_projectable(alignment, name)
            key = f"{prefix}lora_B.weight"
            result[key] = safe_lora_projection(alignment.directions[name], result[key], alignment.frobenius_norms[name])
    return result


def acted_config(config: dict, chosen: Sequence[str], action: Action) -> dict:
    """The adapter config (as a dict) after ``action``: pruned modules are excluded."""
    config = copy.deepcopy(config)
    if action == "prune" and chosen:
        config["exclude_modules"] = excluded(config.get("exclude_modules"), chosen)
    return config


def write_adapter(
    output_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict, overwrite: bool = False
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically (PEFT's layout).

    Raises:
        OutputExistsError: ``output_dir`` exists and ``overwrite`` is False; nothing is written.
    """
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=sorted))


def save_acted_adapter(
    model: nn.Module,
    output_dir: str | os.PathLike,
    chosen: Sequence[str],
    action: Action = "prune",
    alignment: AlignmentSubspace | None = None,
    adapter_name: str | None = None,
    overwrite: bool = False,
) -> None:
    """Save the adapter as it would be after ``action``, leaving the live model untouched.

    What the callback writes into ``checkpoint-N/splora/`` while training goes on unpruned.
    """
    from peft import get_peft_model_state_dict

    adapter = resolve_adapter_name(model, adapter_name)
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter)
    config = model.peft_config[adapter].to_dict()
    write_adapter(
        output_dir,
        acted_state_dict(state_dict, chosen, action, alignment),
        acted_config(config, chosen, action),
        overwrite=overwrite,
    )
