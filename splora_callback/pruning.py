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
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from ._io import atomic_directory, check_output_path
from .adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_scaling, saved_layer_names, with_pattern
from .alignment import AlignmentSubspace
from .components import ComponentBasis, component_basis, kept_alpha, kept_factors
from .layer_names import check_layer_names, check_not_everything, checked_layer_names, model_input_paths
from .layers import PEFT_PREFIX, get_lora_layer, resolve_adapter_name, unwrap_peft
from .metrics import safe_lora_projection
from .transaction import Edit, LiveEdits, delete_item, set_attribute, set_item

logger = logging.getLogger(__name__)

Action = Literal["prune", "project", "none"]


@dataclass
class ActionReport:
    """What an action did.

    Attributes:
        action: ``"prune"``, ``"project"``, ``"patch"`` or ``"none"``.
        layers: module names acted on, in selection order.
        parameters_removed: LoRA parameters removed (prune) or 0.
        components: component pruning only: module name -> the rank-one components removed
            (indices in the update's SVD order).
        kept_rank: component pruning only: module name -> rank left (0: the layer was pruned).
        patch: ``action="patch"`` only: the safety patch's record (``splora_callback.patch``).
    """

    action: str
    layers: list[str] = field(default_factory=list)
    adapter_name: str = "default"
    parameters_removed: int = 0
    components: dict[str, list[int]] = field(default_factory=dict)
    kept_rank: dict[str, int] = field(default_factory=dict)
    patch: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        """Plain data; ``patch`` only for a patch."""
        data = asdict(self)
        if data["patch"] is None:
            del data["patch"]
        return data


def excluded(exclude_modules: str | Iterable[str] | None, names: Sequence[str]) -> str | set[str]:
    """``exclude_modules`` extended by ``names`` (exact module names), keeping PEFT's format."""
    if not exclude_modules:
        return set(names)
    if isinstance(exclude_modules, str):  # PEFT full-matches a string as one regex
        return "|".join([f"(?:{exclude_modules})", *(re.escape(name) for name in names)])
    return set(exclude_modules) | set(names)


@dataclass
class PreparedAction:
    """An action built aside: what it will do (``report``) and the live-model changes that do it.

    Nothing of the model changes until :meth:`commit`, which applies every change or none
    (:class:`~splora_callback.transaction.LiveEdits`); :meth:`rollback` undoes a commit.
    """

    report: ActionReport
    edits: LiveEdits = field(default_factory=LiveEdits)

    def commit(self) -> ActionReport:
        self.edits.commit()
        return self.report

    def rollback(self) -> None:
        self.edits.rollback()


def _layer_removal(model: nn.Module, name: str, adapter: str) -> list[Edit]:
    """The edits that remove ``adapter``'s update from module ``name``.

    A module holding only this adapter goes back to its base layer. With other adapters on it, only
    this adapter's entries are removed, and which adapters are active stays as it was (PEFT's
    ``delete_adapter`` would switch another adapter on in this module).
    """
    layer = get_lora_layer(model, name, adapter)
    if len(layer.lora_A) == 1:
        root = unwrap_peft(model)
        parent_name, _, child = name.rpartition(".")
        return [set_attribute(root.get_submodule(parent_name) if parent_name else root, child, layer.get_base_layer())]
    holders = (*layer.adapter_layer_names, *layer.other_param_names, "lora_variant", "frozen_peft_weight_names")
    return [delete_item(getattr(layer, attr), adapter) for attr in holders
            if isinstance(getattr(layer, attr, None), (dict, nn.ModuleDict, nn.ParameterDict))
            and adapter in getattr(layer, attr)]


def prepare_prune_layers(model: nn.Module, names: Sequence[str], adapter_name: str | None = None) -> PreparedAction:
    """:func:`prune_layers`, built aside (:class:`PreparedAction`); the model is not changed."""
    adapter = resolve_adapter_name(model, adapter_name)
    names = checked_layer_names(model, names, adapter, prune=True)  # typos, one string, every layer
    prepared = PreparedAction(ActionReport("prune", list(names), adapter))
    for name in names:
        layer = get_lora_layer(model, name, adapter)
        prepared.report.parameters_removed += layer.lora_A[adapter].weight.numel() + layer.lora_B[adapter].weight.numel()
        prepared.edits.add(*_layer_removal(model, name, adapter))
    config = model.peft_config[adapter]
    prepared.edits.add(set_attribute(config, "exclude_modules", excluded(config.exclude_modules, list(names))))
    return prepared


@torch.no_grad()
def prune_layers(model: nn.Module, names: Sequence[str], adapter_name: str | None = None) -> ActionReport:
    """Remove the LoRA update of ``names`` from the live model (SPLoRA's pruning), all or none.

    A module holding only this adapter is replaced by its base layer; with other adapters on it,
    only this adapter is removed there (the active adapters stay as they were). The adapter config
    excludes the modules from then on. Prune after training, not in the middle: the optimizer
    still holds the removed parameters.
    """
    return prepare_prune_layers(model, names, adapter_name).commit()


@torch.no_grad()
def prepare_prune_components(
    model: nn.Module, chosen: Mapping[str, Sequence[int]], adapter_name: str | None = None
) -> PreparedAction:
    """:func:`prune_components`, built aside (:class:`PreparedAction`); the model is not changed.

    Raises:
        ValueError: an index is not a component of the module's update, or a key of the adapter
            config's ``rank_pattern`` / ``alpha_pattern`` would shadow a pruned module's rank.
    """
    adapter = resolve_adapter_name(model, adapter_name)
    config = model.peft_config[adapter]
    prepared = PreparedAction(ActionReport("prune", list(chosen), adapter))
    report, ranks, alphas = prepared.report, config.rank_pattern, config.alpha_pattern
    emptied = []
    for name, indices in chosen.items():
        layer = get_lora_layer(model, name, adapter)
        down, up = layer.lora_A[adapter], layer.lora_B[adapter]
        scaling = float(layer.scaling[adapter])
        keep = kept_components(component_basis(down.weight, up.weight, scaling), indices, name)
        report.components[name] = sorted(indices)
        report.kept_rank[name] = len(keep.indices)
        if not keep.indices:
            emptied.append(name)
            continue
        rank, rslora = len(keep.indices), bool(layer.use_rslora.get(adapter, config.use_rslora))
        alpha = kept_alpha(scaling, rank, rslora)
        ranks, alphas = with_pattern(ranks, alphas, name, rank, alpha)  # a shadowing pattern raises here
        new_down, new_up = kept_factors(keep.basis, keep.indices, scaling)
        report.parameters_removed += down.weight.numel() + up.weight.numel() - new_down.numel() - new_up.numel()
        prepared.edits.add(
            set_item(layer.lora_A, adapter, _linear_like(down, new_down)),
            set_item(layer.lora_B, adapter, _linear_like(up, new_up)),
            set_item(layer.r, adapter, rank), set_item(layer.lora_alpha, adapter, alpha),
            set_item(layer.scaling, adapter, alpha / math.sqrt(rank) if rslora else alpha / rank),  # PEFT's formula
        )
    prepared.edits.add(set_attribute(config, "rank_pattern", ranks), set_attribute(config, "alpha_pattern", alphas))
    if emptied:
        layers = prepare_prune_layers(model, emptied, adapter)
        report.parameters_removed += layers.report.parameters_removed
        prepared.edits.add(*layers.edits.edits)
    return prepared


def prune_components(
    model: nn.Module, chosen: Mapping[str, Sequence[int]], adapter_name: str | None = None
) -> ActionReport:
    """Remove the chosen rank-one components of each module's update from the live model (spec 3c).

    Each touched module gets new factors of rank r' holding exactly its kept components (those
    with a non-negligible singular value that were not chosen) at the same scaling; the adapter
    config's ``rank_pattern`` / ``alpha_pattern`` get the module's r' and alpha' (rsLoRA
    included), so ``save_pretrained`` + ``PeftModel.from_pretrained`` rebuild the same weights. A
    module with no component left is pruned as a layer (:func:`prune_layers`). All or none: every
    new factor is built before the first module changes (:class:`PreparedAction`).
    """
    return prepare_prune_components(model, chosen, adapter_name).commit()


class _Kept(NamedTuple):
    basis: ComponentBasis
    indices: list[int]


def kept_components(basis: ComponentBasis, removed: Sequence[int], name: str) -> _Kept:
    """The components of ``basis`` left after removing ``removed``: those carrying an update.

    Raises:
        ValueError: an index is not a component of this update (out of range, repeated, or a
            component without an update: selections never contain those).
    """
    removed = list(removed)
    carries = basis.carries_update().tolist()
    bad = [index for index in removed if not isinstance(index, int) or not 0 <= index < len(basis) or not carries[index]]
    if bad or len(set(removed)) != len(removed):
        raise ValueError(
            f"{name}: component indices {removed} must be distinct indices of components with an update "
            f"(0..{len(basis) - 1}, SVD order); rescore the adapter if its weights changed since selection."
        )
    return _Kept(basis, [index for index in range(len(basis)) if carries[index] and index not in removed])


def _linear_like(module: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding ``weight`` (out, in) with ``module``'s dtype, device and grad flag."""
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=False, device=module.weight.device, dtype=module.weight.dtype)
    new.weight.copy_(weight)
    new.weight.requires_grad_(module.weight.requires_grad)
    return new


@torch.no_grad()
def prepare_project_layers(
    model: nn.Module, alignment: AlignmentSubspace | None, names: Sequence[str], adapter_name: str | None = None,
    projected: Mapping[str, torch.Tensor] | None = None,
) -> PreparedAction:
    """:func:`project_layers`, built aside; ``projected``: each layer's ``C B`` when computed
    elsewhere (by its owner rank), else computed here from ``alignment``."""
    adapter = resolve_adapter_name(model, adapter_name)
    prepared = PreparedAction(ActionReport("project", list(names), adapter))
    for name in names:
        weight = get_lora_layer(model, name, adapter).lora_B[adapter].weight
        if projected is None:
            _check_projectable(alignment, name)
            new = safe_lora_projection(alignment.directions[name], weight, alignment.frobenius_norms[name])
        else:
            new = projected[name]
        prepared.edits.add(_copy_into(weight, new))
    return prepared


def _copy_into(weight: torch.Tensor, value: torch.Tensor) -> Edit:
    """``weight.copy_(value)`` in place (the parameter the model holds stays the same object), undoable."""
    new = value.detach().to(device=weight.device, dtype=weight.dtype).clone()
    old = weight.detach().clone()

    def copy(source: torch.Tensor) -> None:
        with torch.no_grad():
            weight.copy_(source)

    return Edit(lambda: copy(new), lambda: copy(old))


@torch.no_grad()
def project_layers(
    model: nn.Module, alignment: AlignmentSubspace, names: Sequence[str], adapter_name: str | None = None
) -> ActionReport:
    """Safe LoRA's action on the live model: ``B <- C B`` with ``C = V V^T / ||V||_F``, all or none."""
    return prepare_project_layers(model, alignment, names, adapter_name).commit()


def _check_projectable(alignment: AlignmentSubspace | None, name: str) -> None:
    if alignment is None or name not in alignment or not alignment.has_signal(name):
        raise ValueError(f"{name}: 'project' needs a non-zero alignment direction for this module.")


ACTIONS: dict[str, Callable[..., ActionReport]] = {
    "prune": lambda model, alignment, names, adapter_name=None: prune_layers(model, names, adapter_name),
    "project": project_layers,
    "none": lambda model, alignment, names, adapter_name=None: ActionReport(
        "none", list(names), resolve_adapter_name(model, adapter_name)),
}


def prepare_action(
    model: nn.Module,
    alignment: AlignmentSubspace | None,
    chosen: Sequence[str] | Mapping[str, Sequence[int]],
    action: Action | Callable[..., ActionReport] = "prune",
    adapter_name: str | None = None,
    projected: Mapping[str, torch.Tensor] | None = None,
) -> PreparedAction:
    """``action`` on ``chosen`` (layers, or rank-one components) built aside: every check done and
    every new value computed; the live model changes only at ``commit()``, all or none.

    A callable ``action`` (same signature as :data:`ACTIONS`' values) cannot be built aside: it
    runs at ``commit()``, as one edit without undo.
    """
    adapter = resolve_adapter_name(model, adapter_name)
    if isinstance(chosen, Mapping):  # rank-one components (spec 3c)
        if action == "prune":
            return prepare_prune_components(model, chosen, adapter)
        if action == "none":
            return PreparedAction(ActionReport("none", list(chosen), adapter,
                                               components={name: sorted(indices) for name, indices in chosen.items()}))
        raise ValueError(f"action={action!r} acts on layers; a component selection supports 'prune' and 'none'.")
    if isinstance(action, str) and action not in ACTIONS:
        raise ValueError(f"action={action!r}; expected one of {sorted(ACTIONS)} or a callable.")
    chosen = checked_layer_names(model, chosen, adapter_name)  # one string, unknown names: say so
    if action == "prune":
        return prepare_prune_layers(model, chosen, adapter)
    if action == "project":
        return prepare_project_layers(model, alignment, chosen, adapter, projected)
    if action == "none":
        return PreparedAction(ActionReport("none", list(chosen), adapter))
    prepared = PreparedAction(ActionReport("custom", list(chosen), adapter))

    def run() -> None:
        prepared.report = action(model, alignment, list(chosen), adapter_name=adapter_name)

    prepared.edits.add(Edit(run, lambda: None))
    return prepared


def apply_action(
    model: nn.Module,
    alignment: AlignmentSubspace | None,
    chosen: Sequence[str] | Mapping[str, Sequence[int]],
    action: Action | Callable[..., ActionReport] = "prune",
    adapter_name: str | None = None,
) -> ActionReport:
    """Apply ``action`` to the ``chosen`` layers (or components) of the live model, all or none,
    and report what was done. ``action`` is a name in :data:`ACTIONS` or a callable with the same
    signature."""
    report = prepare_action(model, alignment, chosen, action, adapter_name).commit()
    if report.action == "none":  # monitor only: the chosen layers are recorded, nothing is changed
        logger.info("SPLoRA action 'none': nothing changed (%d layer(s) selected, recorded only)", len(chosen))
    elif isinstance(chosen, Mapping):
        logger.info("SPLoRA %s: %d rank-one component(s) removed from %d layer(s)", report.action,
                    sum(map(len, chosen.values())), len(chosen))
    else:
        logger.info("SPLoRA %s: %d layer(s) %s", report.action, len(report.layers), report.layers[:8])
    return report


def acted_adapter(
    state_dict: dict[str, torch.Tensor], config: dict, chosen: Sequence[str] | Mapping[str, Sequence[int]],
    action: Action, alignment: AlignmentSubspace | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """A saved adapter's tensors and config (as a dict) after ``action`` on ``chosen``, layers or
    components (keys ``base_model.model.<name>.…``)."""
    if not isinstance(chosen, Mapping):
        return acted_state_dict(state_dict, chosen, action, alignment), acted_config(config, chosen, action)
    if action == "none":
        return dict(state_dict), copy.deepcopy(config)
    if action != "prune":
        raise ValueError(f"action={action!r} acts on layers; a component selection supports 'prune' and 'none'.")
    tensors, config = dict(state_dict), copy.deepcopy(config)
    emptied = []
    for name, indices in chosen.items():
        key_a, key_b = f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"
        if key_a not in tensors or key_b not in tensors:
            raise KeyError(f"The adapter has no weights for {name}.")
        scaling = adapter_scaling(config, name)
        keep = kept_components(component_basis(tensors[key_a], tensors[key_b], scaling), indices, name)
        if not keep.indices:
            emptied.append(name)
            continue
        new_down, new_up = kept_factors(keep.basis, keep.indices, scaling)
        tensors[key_a], tensors[key_b] = new_down.to(tensors[key_a].dtype), new_up.to(tensors[key_b].dtype)
        rank = len(keep.indices)
        alpha = kept_alpha(scaling, rank, bool(config.get("use_rslora")))
        config["rank_pattern"], config["alpha_pattern"] = with_pattern(
            config.get("rank_pattern"), config.get("alpha_pattern"), name, rank, alpha)
    if emptied:
        tensors = acted_state_dict(tensors, emptied, "prune")
        config = acted_config(config, emptied, "prune")
    return tensors, config


def acted_state_dict(
    state_dict: dict[str, torch.Tensor],
    chosen: Sequence[str],
    action: Action,
    alignment: AlignmentSubspace | None = None,
) -> dict[str, torch.Tensor]:
    """A saved adapter's tensors after ``action`` on ``chosen`` (keys ``base_model.model.<name>.…``)."""
    chosen = check_layer_names(chosen, saved_layer_names(state_dict))
    if action == "prune":  # an adapter without any LoRA module cannot be loaded
        check_not_everything(chosen, saved_layer_names(state_dict))
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
    check_output_path(output_dir, model_input_paths(model, adapter, alignment))  # never onto an input
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter)
    config = model.peft_config[adapter].to_dict()
    write_adapter(output_dir, *acted_adapter(state_dict, config, chosen, action, alignment), overwrite=overwrite)
