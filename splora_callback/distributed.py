"""Multi-process SPLoRA: split the layers over ranks, gather what each needs, agree everywhere.

In one process every function here is its single-process counterpart (``score_layers``,
``AlignmentSubspace.from_pretrained``, ``apply_action``). Under ``torch.distributed`` (DDP, FSDP,
DeepSpeed, launched by ``torchrun`` or ``accelerate launch``):

- each rank owns a deterministic slice of the LoRA layers (:func:`layer_slice`), builds the
  alignment subspace for that slice only and scores it; per-layer scalars are gathered
  (``all_gather_object``) and E-DIEM's shape peers computed from all of them, so every rank holds
  identical :class:`LayerScores` and makes the same selection;
- sharded parameters (FSDP v1 flat params, FSDP v2 DTensors, DeepSpeed ZeRO-3) are gathered one
  module at a time (``sharding.gathered``, ``sharding.lora_updates_gathered``) and never left gathered;
- only the main process writes (:func:`on_main`); rank, world and the object collectives are
  Accelerate's (``processes.py``); sharded models are never pruned in place
  (``sharding.warn_if_sharded``): the acted adapter is written instead (:func:`save_acted_adapter_distributed`).

Every function that gathers is collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ._io import check_output_path
from .alignment import CACHE_FORMAT, AlignmentSubspace, alignment_direction, cache_matches_checkpoints
from .checkpoint import SafetensorsCheckpoint, resolve_checkpoint
from .layer_names import model_input_paths
from .layers import PEFT_PREFIX, resolve_adapter_name
from .metrics import ediem_shape_peers, frobenius_norm, safe_lora_projection, spectral_norm
from .probe import SafetyProbe, UtilityProbe
from .processes import all_gather_object, broadcast_object, is_main_process, rank, world_size
from .pruning import (
    ActionReport,
    PreparedAction,
    acted_adapter,
    prepare_action,
    save_acted_adapter,
    write_adapter,
)
from .scoring import (
    SUSPICION,
    LayerScore,
    LayerScores,
    Metric,
    Null,
    add_component_ediem,
    attach_components,
    attach_probes,
    check_scoring_options,
    score_layers,
    score_updates,
)
from .sharding import (
    Engine,
    clean_name,
    fsdp_owner_map,
    gathered,
    gathered_weights,
    lazy_init_fsdp_root,
    lora_layers,
    lora_updates_gathered,
    peft_inner,
    sharding_engine,
    unwrap_parallel,
    warn_if_sharded,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# --- the split over ranks -------------------------------------------------------------------------


def rank_slice(
    names: Sequence[str], rank_: int | None = None, world: int | None = None, *, sizes: dict[str, int] | None = None
) -> list[str]:
    """The layers rank ``rank_`` owns: round-robin over the names sorted by size (largest first), then name.

    Dealing each size class out in turn keeps the ranks' work (and V's memory) within one module of
    each shape of each other, whatever the mix of module kinds (GQA k/v are 4x smaller than q/o);
    Accelerate's ``split_between_processes`` deals contiguous blocks, which would give one rank all
    the large modules.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    sizes = sizes or {}
    return sorted(names, key=lambda name: (-sizes.get(name, 0), name))[rank_::world]


def single_replica(model: nn.Module) -> bool:
    """One process and an unsharded model: the entry points below are then their single-process
    functions, called as they are (module order, the cache file as named, the whole-model scores),
    so a one-process run gives exactly the library's numbers; the collectives need no branch
    (``processes.py``)."""
    return world_size() == 1 and sharding_engine(model) == "none"


def layer_slice(layers: Sequence[tuple[str, LoraLayer]]) -> list[str]:
    """This rank's share of ``lora_layers(model)[1]`` (sized by ``out_features * in_features``)."""
    sizes = {name: int(layer.out_features) * int(layer.in_features) for name, layer in layers}
    return rank_slice([name for name, _ in layers], sizes=sizes)


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective: re-raise a rank's error on that rank and a RuntimeError on the others.

    Catching per rank and raising together avoids the hang where one rank stops while the others
    wait in the next collective.
    """
    messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(index, message) for index, message in enumerate(messages) if message is not None]
    if failed:
        raise RuntimeError(f"SPLoRA failed on rank {failed[0][0]}: {failed[0][1]}")


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on the main process only (writes, downloads); every rank gets its result.

    Collective. If ``fn`` raises on the main process, every rank raises (none is left waiting).
    """
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            error = exc
    raise_if_any_failed(error)
    return broadcast_object(result)


# --- alignment and scores -------------------------------------------------------------------------


def _download(base: str | os.PathLike, aligned: str | os.PathLike | None, revision: str | None) -> None:
    for path in (base, aligned):
        if path is not None:
            resolve_checkpoint(path, revision)


def _rank_cache(cache_file: str | os.PathLike | None) -> Path | None:
    if cache_file is None or world_size() == 1:
        return None if cache_file is None else Path(cache_file)
    path = Path(cache_file)
    return path.with_name(f"{path.stem}.rank{rank()}-of-{world_size()}{path.suffix}")


def _load_slice(path: Path, names: Sequence[str], source: dict, device: str | torch.device) -> AlignmentSubspace | None:
    """The ``names`` of a full alignment cache (one written by a single process), read lazily."""
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != CACHE_FORMAT or json.loads(metadata.get("source", "{}")) != source:
            return None
        if not cache_matches_checkpoints(metadata, source):  # same paths, other contents: rebuild
            return None
        if not set(names) <= set(handle.keys()):
            return None
        directions = {name: handle.get_tensor(name) for name in names}
    frobenius, spectral = json.loads(metadata["frobenius_norms"]), json.loads(metadata["spectral_norms"])
    return AlignmentSubspace(directions, {n: frobenius[n] for n in names}, {n: spectral[n] for n in names}, source)


def alignment_for_rank(
    base: str | os.PathLike,
    model: nn.Module,
    *,
    aligned: str | os.PathLike | None = None,
    adapter_name: str | None = None,
    cache_file: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    progress: bool = True,
) -> AlignmentSubspace:
    """The alignment subspace of this rank's :func:`layer_slice` only (all modules in one process).

    Each rank streams ``W_base`` for its own modules (1/world of the disk reads and of V's memory).
    A sharded live model is gathered one base weight at a time by all ranks (the owner keeps V);
    pass ``aligned=`` to stream ``W_aligned`` from disk instead and gather nothing. With
    ``cache_file``, each rank caches its slice in ``<stem>.rank{r}-of-{w}.safetensors``; a full
    cache written by a single process is read lazily (only this rank's tensors). Collective.

    Args: as :meth:`AlignmentSubspace.from_pretrained` (``W_aligned`` from the live ``model``
        unless ``aligned`` is given).
    """
    engine = sharding_engine(model)
    if single_replica(model):
        return AlignmentSubspace.from_pretrained(
            base, model=model, aligned=aligned, adapter_name=adapter_name, cache_file=cache_file,
            dtype=dtype, device=device, revision=revision, progress=progress,
        )
    adapter, layers = lora_layers(model, adapter_name)
    owned = layer_slice(layers)
    on_main(_download, base, aligned, revision)  # Hub downloads once, before the other ranks read
    source = {"base": str(base), "aligned": str(aligned) if aligned is not None else "live model"}
    if cache_file is not None and Path(cache_file).is_file() and world_size() > 1:
        cached = _load_slice(Path(cache_file), owned, source, device)
        if cached is not None:
            logger.info("Alignment slice (%d modules) read from the full cache %s", len(owned), cache_file)
            return cached
    progress = progress and is_main_process()
    common = {"cache_file": _rank_cache(cache_file), "dtype": dtype, "device": device,
              "revision": revision, "progress": progress}
    if engine == "none":
        return AlignmentSubspace.from_pretrained(
            base, model=unwrap_parallel(model), aligned=aligned, adapter_name=adapter, modules=owned, **common
        )
    if aligned is not None:
        if not owned:
            return AlignmentSubspace({}, {}, {}, source)
        fan_in_fan_out = bool(getattr(layers[0][1], "fan_in_fan_out", False))
        return AlignmentSubspace.from_pretrained(
            base, aligned=aligned, target_modules=owned, fan_in_fan_out=fan_in_fan_out, modules=owned, **common
        )
    return _alignment_from_sharded(base, model, engine, layers, set(owned), source, **common)


@torch.no_grad()
def _alignment_from_sharded(
    base: str | os.PathLike, model: nn.Module, engine: Engine, layers: list[tuple[str, LoraLayer]],
    owned: set[str], source: dict, *, cache_file: Path | None, dtype: torch.dtype,
    device: str | torch.device, revision: str | None, progress: bool,
) -> AlignmentSubspace:
    """Every rank joins the gather of each frozen base weight (``W_aligned``); its owner keeps V."""
    if cache_file is not None and cache_file.is_file():
        cached = _load_slice(cache_file, sorted(owned), source, device)
        if cached is not None and set(cached.names) == owned:
            return cached
    root = unwrap_parallel(model)
    owners = fsdp_owner_map(root) if engine == "fsdp" else None
    if engine == "fsdp":
        lazy_init_fsdp_root(root)
    directions, frobenius, spectral, error = {}, {}, {}, None
    with SafetensorsCheckpoint.open(base, revision) as checkpoint:
        for name, layer in tqdm(layers, desc="SPLoRA alignment subspace", unit="module", disable=not progress):
            with gathered_weights(root, engine, [layer.get_base_layer()], owners) as (weight,):
                if name not in owned or error is not None:
                    continue
                try:  # keep joining the gathers after a failure; raise on every rank below
                    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
                    aligned_weight = weight.T if fan_in_fan_out else weight
                    base_weight = checkpoint.module_weight(name, fan_in_fan_out)
                    direction = alignment_direction(name, aligned_weight, base_weight, base)
                except Exception as exc:
                    error = exc
                    continue
            frobenius[name] = frobenius_norm(direction)
            spectral[name] = spectral_norm(direction) if frobenius[name] > 0 else 0.0
            directions[name] = direction.to(device=device, dtype=dtype)
    raise_if_any_failed(error)
    subspace = AlignmentSubspace(directions, frobenius, spectral, source)
    if cache_file is not None:
        subspace.save(cache_file)
    return subspace


def alignment_info(alignment: AlignmentSubspace) -> dict[str, Any]:
    """Source and totals over all ranks' slices (``modules``, ``judgeable``). Collective."""
    counts = all_gather_object((len(alignment), sum(map(alignment.has_signal, alignment.names))))
    return {**alignment.source, "modules": sum(c[0] for c in counts), "judgeable": sum(c[1] for c in counts)}


def score_layers_distributed(
    model: nn.Module,
    alignment: AlignmentSubspace | None,
    metric: Metric = "ediem",
    *,
    null: Null = "layers",
    permutations: int = 16,
    seed: int = 0,
    adapter_name: str | None = None,
    probe: SafetyProbe | None = None,
    utility: UtilityProbe | None = None,
    granularity: str = "layer",
) -> LayerScores:
    """:func:`~splora_callback.scoring.score_layers`, with the layers split over the ranks.

    Each rank scores its :func:`layer_slice` against ``alignment`` (which must hold at least that
    slice: :func:`alignment_for_rank`); the per-layer scores are gathered, and E-DIEM with
    ``null="layers"`` is recomputed from all layers' distances (the permutation null is per layer
    and seeded by name, so it does not depend on the split). Every rank returns identical scores.
    Collective. In one process without sharding: exactly ``score_layers``.
    """
    if single_replica(model):
        return score_layers(model, alignment, metric, null=null, permutations=permutations, seed=seed,
                            adapter_name=adapter_name, probe=probe, utility=utility, granularity=granularity)
    if metric not in SUSPICION:
        raise ValueError(f"metric={metric!r}; expected one of {sorted(SUSPICION)}.")
    check_scoring_options(metric, alignment, probe, granularity)
    adapter, layers = lora_layers(model, adapter_name)
    names = [name for name, _ in layers]
    partials, kept, error = {}, [], None
    with torch.no_grad():  # not around the probes: they take their own gradients
        for update in lora_updates_gathered(model, adapter, keep=set(layer_slice(layers))):
            if error is not None:
                continue
            try:  # one layer at a time: the factors are only valid inside this iteration
                partials[update.name] = score_updates([update], alignment, metric, null=null,
                                                      permutations=permutations, seed=seed)
                if granularity == "component":  # r (m + n) numbers: kept for the probes' r x r work below
                    kept.append(dataclasses.replace(update, lora_A=update.lora_A.clone(), lora_B=update.lora_B.clone()))
            except Exception as exc:  # keep joining the gathers; raise on every rank below
                error = exc
    raise_if_any_failed(error)
    # collective, after the gathers (ZeRO-3 keeps some lora_A gathered after a probe pass): each rank
    # runs its rows of each probe; the sums and r x r interactions are all-reduced
    safety = None if probe is None else probe.run(unwrap_parallel(model), adapter_name=adapter)
    task = None if utility is None else utility.run(unwrap_parallel(model), adapter_name=adapter)
    local = {}
    try:
        for update in kept:
            attach_components(partials[update.name], [update], alignment, safety, task)
        local = {name: asdict(partial[name]) for name, partial in partials.items()}
    except Exception as exc:  # raise on every rank below
        error = exc
    raise_if_any_failed(error)
    merged: dict[str, dict] = {}
    for part in all_gather_object(local):
        merged.update(part)
    scores = LayerScores(metric, null, granularity=granularity)
    for name in names:
        scores.layers[name] = LayerScore(**{**merged[name], "shape": tuple(merged[name]["shape"])})
    if null == "layers":  # shape peers need every layer's distance
        distances = {s.name: s.relative_distance for s in scores if s.status == "active" and s.relative_distance is not None}
        for name, robust in ediem_shape_peers(distances, {name: scores[name].shape for name in distances}).items():
            scores.layers[name].ediem, scores.layers[name].ediem_scaled = robust.value, robust.scaled
    attach_probes(scores, safety, task)
    if granularity == "component" and alignment is not None:
        add_component_ediem(scores)
    return scores


# --- actions --------------------------------------------------------------------------------------


def _projected_up(model: nn.Module, alignment: AlignmentSubspace | None, chosen: Sequence[str], adapter: str) -> dict[str, torch.Tensor]:
    """Safe LoRA's ``C B`` for each chosen layer, computed by its owner, on every rank (CPU)."""
    local, error = {}, None
    owned = set(layer_slice(lora_layers(model, adapter)[1]))
    for update in lora_updates_gathered(model, adapter, names=set(chosen), keep=owned):
        try:
            if alignment is None or update.name not in alignment or not alignment.has_signal(update.name):
                raise ValueError(f"{update.name}: 'project' needs a non-zero alignment direction for this module.")
            up = safe_lora_projection(alignment.directions[update.name], update.lora_B, alignment.frobenius_norms[update.name])
            local[update.name] = up.cpu()
        except Exception as exc:  # keep joining the gathers; raise on every rank below
            error = error or exc
    raise_if_any_failed(error)
    return {name: up for part in all_gather_object(local) for name, up in part.items()}


@torch.no_grad()
def prepare_action_distributed(
    model: nn.Module, alignment: AlignmentSubspace | None, chosen: Sequence[str],
    action: str | Callable[..., ActionReport] = "prune", adapter_name: str | None = None,
) -> PreparedAction:
    """:func:`~splora_callback.pruning.prepare_action` on every rank's replica, with a sliced
    alignment: the action built aside, applied by ``commit()`` (all or none, on each rank).

    ``prune`` needs no alignment; ``project`` gets each ``C B`` from the layer's owner (collective).
    A callable action runs at ``commit()`` on every rank with that rank's alignment slice.

    Raises:
        ValueError: the model is sharded (see :func:`warn_if_sharded`; write the acted adapter
            with :func:`save_acted_adapter_distributed` instead).
    """
    if single_replica(model):
        return prepare_action(model, alignment, chosen, action, adapter_name)
    if action != "none" and warn_if_sharded(model, action if isinstance(action, str) else "custom"):
        raise ValueError(
            f"action={action!r} cannot modify a sharded model ({sharding_engine(model)}) in place; call "
            "save_acted_adapter_distributed() and load the written adapter into an unsharded model."
        )
    replica = unwrap_parallel(model)
    if action != "project":
        return prepare_action(replica, alignment, chosen, action, adapter_name)
    adapter = resolve_adapter_name(replica, adapter_name)
    return prepare_action(replica, alignment, chosen, action, adapter, projected=_projected_up(model, alignment, chosen, adapter))


def prepare_patch_distributed(model: nn.Module, probe: Any, **options: Any) -> PreparedAction:
    """:func:`~splora_callback.patch.prepare_patch` on every rank's replica (the same steps on the
    same pairs), then rank 0's patched factors broadcast, so that every replica commits the same
    LoRA (collective; one process: ``prepare_patch`` itself). ``options``: ``prepare_patch``'s.

    Raises:
        ValueError: the model is sharded (FSDP / ZeRO-3): the patch trains the live factors; patch
            the saved adapter in one process instead (``splora_callback.safety_patch``).
    """
    from .patch import patch_action, patched_factors

    if sharding_engine(model) != "none":
        raise ValueError(f"action='patch' trains the live LoRA factors, which {sharding_engine(model)} shards; "
                         "load the saved adapter into an unsharded model and run splora_callback.safety_patch.")
    replica = unwrap_parallel(model)
    adapter_name = options.pop("adapter_name", None)
    factors, patched, record, error = [], [], {}, None
    try:
        factors, patched, record = patched_factors(replica, probe, **options)
    except Exception as exc:  # every rank hears of it before the broadcast below
        error = exc
    raise_if_any_failed(error)
    if world_size() > 1:
        for tensor in patched:
            torch.distributed.broadcast(tensor, src=0)
        record = broadcast_object(record)
    return patch_action(replica, factors, patched, record, adapter_name)


def apply_action_distributed(
    model: nn.Module, alignment: AlignmentSubspace | None, chosen: Sequence[str],
    action: str | Callable[..., ActionReport] = "prune", adapter_name: str | None = None,
) -> ActionReport:
    """:func:`prepare_action_distributed`, committed: the action applied on every rank's replica."""
    return prepare_action_distributed(model, alignment, chosen, action, adapter_name).commit()


def _gather_adapter_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Collective: the adapter's tensors, full, on the main process (``{}`` elsewhere and unsharded).

    FSDP v1 is read by module (any ``use_orig_params``), already under PEFT's keys; the other
    engines by parameter, under the model's parameter names.

    Raises:
        NotImplementedError: FSDP v1 with adapter parameters besides LoRA factors (``modules_to_save``).
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    root, engine, full = unwrap_parallel(model), sharding_engine(model), {}
    if engine == "none":
        return full
    if engine == "fsdp":
        extra = [name for name, module in root.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)]
        if extra:  # PEFT cannot match their FSDP-wrapped names; the same on every rank
            raise NotImplementedError(
                f"FSDP v1: adapter modules besides LoRA layers ({clean_name(extra[0])}) cannot be saved by SPLoRA; "
                "save with trainer.save_model() and prune the saved adapter with `splora prune`."
            )
        for update in lora_updates_gathered(model, adapter, keep=None if is_main_process() else ()):
            full[f"{PEFT_PREFIX}{update.name}.lora_A.weight"] = update.lora_A.cpu().clone()
            full[f"{PEFT_PREFIX}{update.name}.lora_B.weight"] = update.lora_B.cpu().clone()
        return full
    for raw, param in root.named_parameters():
        if f".{adapter}." not in raw:  # never gather base weights
            continue
        with gathered([param], model=root) as (tensor,):
            if is_main_process():
                full[raw] = tensor.cpu().clone()
    return full


def _peft_state_dict(model: nn.Module, adapter: str, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's adapter state dict (keys without the adapter name), from the live or gathered tensors."""
    from peft import get_peft_model_state_dict

    engine, peft_model = sharding_engine(model), peft_inner(unwrap_parallel(model))
    if engine == "fsdp":
        return dict(full)
    return get_peft_model_state_dict(peft_model, state_dict=full if engine != "none" else None, adapter_name=adapter)


@torch.no_grad()
def save_acted_adapter_distributed(
    model: nn.Module, output_dir: str | os.PathLike, chosen: Sequence[str], action: str = "prune",
    alignment: AlignmentSubspace | None = None, adapter_name: str | None = None, overwrite: bool = False,
) -> None:
    """:func:`~splora_callback.pruning.save_acted_adapter` for any engine: the live model is untouched.

    Collective: adapter tensors are gathered one at a time to the main process, ``project``'s
    ``C B`` come from each layer's owner, and the main process writes the adapter (atomically);
    an error there is raised on every rank.
    """
    if single_replica(model):
        save_acted_adapter(model, output_dir, chosen, action, alignment, adapter_name, overwrite=overwrite)
        return
    adapter = lora_layers(model, adapter_name)[0]
    projected = _projected_up(model, alignment, chosen, adapter) if action == "project" else {}
    full = _gather_adapter_tensors(model, adapter)

    def write() -> None:
        check_output_path(output_dir, model_input_paths(peft_inner(unwrap_parallel(model)), adapter, alignment))
        tensors = _peft_state_dict(model, adapter, full)
        for name, up in projected.items():
            key = f"{PEFT_PREFIX}{name}.lora_B.weight"
            tensors[key] = up.to(tensors[key].dtype)
        config = peft_inner(unwrap_parallel(model)).peft_config[adapter].to_dict()
        # project's C B is already in the tensors: the rest of the action is "none" for them
        write_adapter(output_dir, *acted_adapter(tensors, config, chosen, "prune" if action == "prune" else "none"),
                      overwrite=overwrite)

    on_main(write)
