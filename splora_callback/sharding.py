"""Sharded models: which engine shards them, and gathering one module's tensors at a time.

FSDP v1 (flat parameters), FSDP v2 (``DTensor`` parameters) and DeepSpeed ZeRO-3 each keep a rank's
shard of every parameter. :func:`gathered` materialises full tensors for a few parameters and
re-shards them on exit; :func:`lora_updates_gathered` yields one LoRA layer's factors at a time, so
at most one module is ever gathered. Without an engine every function here is a no-op wrapper.
Every function that gathers is collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from .layers import (
    PEFT_PREFIX,
    LoraUpdate,
    NoLoraLayersError,
    check_no_unscored_layers,
    check_supported,
    iter_lora_layers,
    resolve_adapter_name,
)
from .processes import is_main_process

logger = logging.getLogger(__name__)

Engine = Literal["none", "fsdp", "fsdp2", "deepspeed"]
_FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_warned: set[str] = set()


def _fsdp_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return None
    return FullyShardedDataParallel


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """Remove DDP / DataParallel / DeepSpeedEngine wrappers; an FSDP v1 root is kept (it gathers)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        type(model).__name__ == "DeepSpeedEngine"
    ):
        model = model.module
    return model


def sharding_engine(model: nn.Module) -> Engine:
    """``"fsdp"`` (v1 flat params), ``"fsdp2"`` (DTensor), ``"deepspeed"`` (ZeRO-3) or ``"none"``."""
    model = unwrap_parallel(model)
    fsdp, dtensor = _fsdp_class(), _dtensor_class()
    if fsdp is not None and any(isinstance(module, fsdp) for module in model.modules()):
        return "fsdp"
    for param in model.parameters():
        if dtensor is not None and isinstance(param, dtensor):
            return "fsdp2"
        if hasattr(param, "ds_id"):
            return "deepspeed"
    return "none"


def warn_if_sharded(model: nn.Module, action: str = "prune") -> bool:
    """True if ``model``'s parameters are sharded; then warn (once, on main) that it is not pruned in place.

    Replacing a LoRA layer by its base layer (``prune``) or rewriting ``lora_B`` (``project``)
    under FSDP v1 breaks the flat parameter views, under FSDP v2 / ZeRO-3 leaves the optimizer and
    the engine's hooks holding removed or resized parameters. The callback should then call
    :func:`save_acted_adapter_distributed` at the end of training and leave the live model as is.
    """
    engine = sharding_engine(model)
    if engine == "none":
        return False
    if action != "none" and engine not in _warned and is_main_process():
        _warned.add(engine)
        logger.warning(
            "SPLoRA: the model is sharded (%s). %r is not applied to the live model (it would corrupt "
            "sharded parameters or optimizer state); the acted adapter is written at the end of training "
            "instead. Load it into an unsharded model: PeftModel.from_pretrained(base_model, path).",
            engine, action,
        )
    return True


def _full(param: torch.Tensor) -> torch.Tensor:
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(param, dtensor):
        return param.full_tensor().detach()  # all-gather of this one parameter (collective)
    return param.detach()


def lazy_init_fsdp_root(root: nn.Module) -> None:
    """FSDP v1: summoning a non-root unit before the first forward would make it a root."""
    try:
        from torch.distributed.fsdp._runtime_utils import _lazy_init
    except ImportError:  # pragma: no cover - private API moved; summoning the root works too
        return
    _lazy_init(root, root)


def _fsdp_units_holding(model: nn.Module, params: Sequence[torch.Tensor]) -> list[nn.Module]:
    """FSDP v1 units whose flat parameter holds one of ``params`` (``use_orig_params=True``)."""
    fsdp = _fsdp_class()
    root = unwrap_parallel(model)
    units = [module for module in root.modules() if isinstance(module, fsdp)]
    if not units:
        return []
    if not all(unit._use_orig_params for unit in units):
        raise ValueError(
            "gathered(): FSDP with use_orig_params=False exposes no per-module parameters; use "
            "lora_updates_gathered() (gathers by module) or use_orig_params=True (fsdp_use_orig_params)."
        )
    lazy_init_fsdp_root(units[0])
    wanted = {id(param) for param in params}
    return [
        unit for unit in units
        if unit._flat_param is not None and any(id(p) in wanted for p in (unit._flat_param._params or []))
    ]


@contextmanager
def gathered(params: Sequence[torch.Tensor], *, model: nn.Module | None = None) -> Iterator[list[torch.Tensor]]:
    """Full copies/views of ``params`` for the duration of the block, then re-sharded.

    Plain tensors are returned as they are; DTensors (FSDP v2) are all-gathered one by one;
    ZeRO-3 parameters are gathered with ``deepspeed.zero.GatheredParameters`` (read-only); FSDP v1
    parameters need ``model`` (the FSDP root) and summon only the units that hold them
    (``recurse=False``, no writeback). Collective under any sharding: every rank must enter it with
    the same parameters. The tensors are valid inside the block only.
    """
    params = list(params)
    with ExitStack() as stack:
        zero3 = [param for param in params if hasattr(param, "ds_id")]
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        fsdp = _fsdp_class()
        for unit in _fsdp_units_holding(model, params) if model is not None else []:
            stack.enter_context(fsdp.summon_full_params(unit, recurse=False, writeback=False))
        yield [_full(param) for param in params]


def fsdp_owner_map(root: nn.Module) -> dict[int, nn.Module]:
    """id(module) -> the nearest enclosing FSDP v1 unit (the one whose flat param holds its weights)."""
    fsdp, owners = _fsdp_class(), {}

    def walk(module: nn.Module, unit: nn.Module | None) -> None:
        unit = module if isinstance(module, fsdp) else unit
        owners[id(module)] = unit
        for child in module.children():
            walk(child, unit)

    walk(root, None)
    return owners


@contextmanager
def gathered_weights(
    root: nn.Module, engine: Engine, modules: Sequence[nn.Module], owners: dict[int, nn.Module] | None
) -> Iterator[list[torch.Tensor]]:
    """``module.weight`` of each module, full, inside the block (FSDP v1: read after the summon)."""
    if engine != "fsdp":
        with gathered([module.weight for module in modules]) as full:
            yield full
        return
    fsdp = _fsdp_class()
    units = list(dict.fromkeys(owners[id(module)] for module in modules if owners[id(module)] is not None))
    with ExitStack() as stack:
        for unit in units:
            stack.enter_context(fsdp.summon_full_params(unit, recurse=False, writeback=False))
        yield [module.weight.detach() for module in modules]


def peft_inner(module: nn.Module) -> nn.Module:
    fsdp = _fsdp_class()
    return module.module if fsdp is not None and isinstance(module, fsdp) else module


def _check(name: str, layer: LoraLayer, adapter: str) -> None:
    """``layers.check_supported``, seeing through an FSDP v1 wrapper around ``lora_A``."""
    if peft_inner(layer.lora_A[adapter]) is layer.lora_A[adapter]:
        check_supported(name, layer, adapter)
        return
    view = SimpleNamespace(
        use_dora=layer.use_dora, lora_magnitude_vector=layer.lora_magnitude_vector,
        lora_variant=getattr(layer, "lora_variant", {}), lora_bias=layer.lora_bias,
        lora_A={adapter: peft_inner(layer.lora_A[adapter])}, get_base_layer=layer.get_base_layer,
        merged_adapters=layer.merged_adapters,
    )
    check_supported(name, view, adapter)


def clean_name(name: str) -> str:
    for wrapper in _FSDP_PREFIXES:
        name = name.replace(wrapper, "")
    return name


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> tuple[str, list[tuple[str, LoraLayer]]]:
    """``(adapter, [(name, layer), ...])`` in module order, names as in the checkpoint, any wrapper.

    Names drop DDP/DeepSpeed wrappers, FSDP v1's ``_fsdp_wrapped_module.`` and PEFT's
    ``base_model.model.``; the supported-adapter checks run here (no tensor is read).

    Raises:
        NoLoraLayersError, UnsupportedAdapterError: as :func:`~splora_callback.layers.lora_updates_from_model`.
    """
    root = unwrap_parallel(model)
    inner = peft_inner(root)
    adapter = resolve_adapter_name(inner, adapter_name)
    check_no_unscored_layers(inner, adapter)  # LoRA on embeddings: refused, never skipped silently
    if inner is root:  # no FSDP v1 root: PEFT's own unwrapping gives the checkpoint names
        named, prefix = iter_lora_layers(root, adapter), ""
    else:  # FSDP v1: walk the wrapped tree (the units live there), strip wrapper names and PEFT's prefix
        named, prefix = iter_lora_layers(root, adapter, unwrap=False), PEFT_PREFIX if isinstance(inner, PeftModel) else ""
    layers = []
    for raw, module in named:
        name = clean_name(raw).removeprefix(prefix)
        _check(name, module, adapter)
        layers.append((name, module))
    if not layers:
        raise NoLoraLayersError(
            f"No LoRA layer holds adapter {adapter!r}: wrap the model with peft.get_peft_model(model, "
            "LoraConfig(target_modules=[...])) before scoring it."
        )
    return adapter, layers


def lora_updates_gathered(
    model: nn.Module,
    adapter_name: str | None = None,
    *,
    names: Collection[str] | None = None,
    keep: Collection[str] | None = None,
) -> Iterator[LoraUpdate]:
    """Yield the :class:`LoraUpdate` of each LoRA layer with full factors, one module at a time.

    Args:
        names: the layers to visit (default: all). Under sharding this must be the same on every
            rank, and every rank must exhaust the iterator: each visit gathers (collective).
        keep: of the visited layers, those yielded on this rank (default: all). A replicated model
            reads only these; a sharded one still joins the gathers of the others.

    The yielded tensors are valid until the next iteration (then re-sharded): compute, don't keep.
    """
    adapter, layers = lora_layers(model, adapter_name)
    root, engine = unwrap_parallel(model), sharding_engine(model)
    owners = fsdp_owner_map(root) if engine == "fsdp" else None
    if engine == "fsdp":
        lazy_init_fsdp_root(root)
    for name, layer in layers:
        if names is not None and name not in names:
            continue
        wanted = keep is None or name in keep
        if engine == "none" and not wanted:
            continue
        modules = [peft_inner(layer.lora_A[adapter]), peft_inner(layer.lora_B[adapter])]
        with gathered_weights(root, engine, modules, owners) as (lora_a, lora_b):
            if wanted:
                yield LoraUpdate(name, lora_a, lora_b, float(layer.scaling[adapter]),
                                 bool(getattr(layer, "fan_in_fan_out", False)))
