"""The live model's LoRA layers: find them (:func:`iter_lora_layers`, the one walk over a model's
modules that every module uses), check what the scores support, and read their factors.

A saved adapter's files are read in ``adapter_files.py``; layer names and write guards are in
``layer_names.py``. Everything downstream works on :class:`LoraUpdate`: the factors of one adapted linear module in
*weight orientation*, so that the update is ``dW = scaling * lora_B @ lora_A`` with shape
``(out_features, in_features)`` whatever the module type (GPT-2 ``Conv1D`` included).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


class UnsupportedAdapterError(ValueError):
    """The adapter is not a plain LoRA on linear modules (DoRA, LoRA bias, embeddings, merged, ...)."""


class NoLoraLayersError(ValueError):
    """The model or adapter has no LoRA layer for the requested adapter."""


class QuantizedBaseError(ValueError):
    """``W_aligned`` would be read from quantized base layers (QLoRA): pass the full-precision aligned model."""


# PEFT's LoRA layers over quantized base layers live in these modules of peft.tuners.lora (bnb:
# Linear8bitLt, Linear4bit; gptq: GPTQLoraLinear; awq, aqlm, eetq, hqq, torchao, inc: *LoraLinear).
QUANTIZED_LORA_MODULES = ("bnb", "gptq", "awq", "aqlm", "eetq", "hqq", "torchao", "inc")
# Quantized weight classes PEFT's dequantize_module_weight recognises by name (bitsandbytes).
QUANTIZED_WEIGHT_CLASSES = ("Params4bit", "Int8Params")
# Libraries whose layers hold packed, quantized weights.
QUANTIZED_LIBRARIES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "aqlm", "eetq", "hqq", "torchao",
                       "optimum.quanto", "neural_compressor")


@dataclass(frozen=True)
class LoraUpdate:
    """The LoRA update of one linear module: ``dW = scaling * lora_B @ lora_A``, shape (m, n).

    Attributes:
        name: module path inside the transformers model, e.g. ``model.layers.0.self_attn.q_proj``
            (the key PEFT's ``exclude_modules`` matches and the checkpoint key without ``.weight``).
        lora_A: (r, n) down-projection, n = in_features.
        lora_B: (m, r) up-projection, m = out_features.
        scaling: PEFT's ``scaling[adapter]`` (alpha / r, or alpha / sqrt(r) with rsLoRA).
        fan_in_fan_out: the base weight is stored as (n, m) (GPT-2 ``Conv1D``); the factors above
            are already in (m, n) orientation, this only says how to read the base checkpoint.
    """

    name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def kind(self) -> str:
        """Module kind, the last component of the name (``q_proj``, ``c_attn``, ...)."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) = (out_features, in_features) of the update."""
        return (self.lora_B.shape[0], self.lora_A.shape[1])

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """The dense (m, n) update; for tests and small models only."""
        return self.scaling * self.lora_B @ self.lora_A


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (module names then match checkpoint keys)."""
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def resolve_adapter_name(model: nn.Module, adapter_name: str | None = None) -> str:
    """The adapter to analyse: ``adapter_name`` if given, else the model's single active adapter.

    Raises:
        TypeError: ``adapter_name`` is not a string.
        NoLoraLayersError: ``adapter_name`` is not one of the model's adapters (they are listed),
            or the model has no LoRA layer.
        ValueError: several adapters are active and none was named.
    """
    if adapter_name is not None:
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name={adapter_name!r}: expected the adapter's name, a string such as 'default'.")
        known = adapter_names(model)
        if not known:
            raise NoLoraLayersError(
                f"No LoRA layer holds adapter {adapter_name!r}: the model has no LoRA layer. Wrap it with "
                "peft.get_peft_model(model, LoraConfig(target_modules=[...])) before scoring it."
            )
        if adapter_name not in known:
            raise NoLoraLayersError(
                f"No LoRA layer holds adapter {adapter_name!r}: adapter_name={adapter_name!r} is not an adapter "
                f"of this model; its adapters are {sorted(known)}. Pass one of them, or adapter_name=None for "
                "the active adapter."
            )
        return adapter_name
    if isinstance(model, PeftModel):
        active = model.active_adapters
    else:  # LoRA added through transformers' integration: ask the layers themselves
        layer = next((module for _, module in iter_lora_layers(model)), None)
        if layer is None:
            raise NoLoraLayersError(
                "The model has no LoRA layer: wrap it with peft.get_peft_model(model, "
                "LoraConfig(target_modules=[...])) before scoring it."
            )
        active = layer.active_adapters
    if len(active) != 1:
        raise ValueError(
            f"The model has {len(active)} active adapters {list(active)}; pass adapter_name= to choose "
            "the one to score."
        )
    return active[0]


def adapter_names(model: nn.Module) -> set[str]:
    """Names of the adapters the model holds (its ``peft_config``, or its LoRA layers' adapters)."""
    names = set(getattr(model, "peft_config", None) or {})
    for _, module in iter_lora_layers(model):
        for attribute in module.adapter_layer_names:
            names.update(getattr(module, attribute, {}).keys())
    return names


def iter_lora_layers(model: nn.Module, adapter_name: str | None = None, *,
                     unwrap: bool = True) -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(name, layer)`` for every ``LoraLayer`` (that holds ``adapter_name`` in ``lora_A``,
    when given), in module order: found by type, never by name or shape.

    Names are those inside a ``PeftModel`` (the checkpoint's, without ``base_model.model.``);
    ``unwrap=False`` walks ``model`` itself (an FSDP v1 root: ``sharding.lora_layers`` cleans them).
    """
    for name, module in (unwrap_peft(model) if unwrap else model).named_modules():
        if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.lora_A):
            yield name, module


def get_lora_layer(model: nn.Module, name: str, adapter_name: str) -> LoraLayer:
    """The LoRA layer called ``name`` (a checkpoint name, as :func:`iter_lora_layers` gives it).

    Raises:
        KeyError: ``name`` is not a LoRA layer holding ``adapter_name`` (already pruned?).
    """
    module = unwrap_peft(model).get_submodule(name)
    if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
        raise KeyError(f"{name} is not a LoRA layer of adapter {adapter_name!r} (already pruned?).")
    return module


def check_supported(name: str, layer: LoraLayer, adapter_name: str) -> None:
    """Refuse what the scores do not cover, rather than score it wrongly.

    Raises:
        UnsupportedAdapterError: DoRA or another LoRA variant, LoRA bias, a non-linear LoRA
            (embedding, convolution), or an adapter merged into the base weight.
    """
    fix = "SPLoRA scores plain LoRA updates dW = s * B @ A on linear layers only."
    kind = type(layer).__name__
    if kind in UNSCORED_LAYER_TYPES:
        raise UnsupportedAdapterError(
            f"{name}: LoRA on {type(layer.get_base_layer()).__name__} (PEFT's {kind}) is not supported. {fix} "
            "Remove this module from LoraConfig.target_modules / target_parameters."
        )
    if layer.use_dora.get(adapter_name, False) or adapter_name in layer.lora_magnitude_vector:
        raise UnsupportedAdapterError(f"{name}: DoRA adapters are not supported. {fix}")
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    if variant is not None:
        raise UnsupportedAdapterError(
            f"{name}: LoRA variant {type(variant).__name__} is not supported. {fix}"
        )
    if layer.lora_bias.get(adapter_name, False):
        raise UnsupportedAdapterError(f"{name}: lora_bias=True is not supported. {fix}")
    if not isinstance(layer.lora_A[adapter_name], nn.Linear):
        raise UnsupportedAdapterError(
            f"{name}: LoRA on {type(layer.get_base_layer()).__name__} is not supported. {fix}"
        )
    if adapter_name in layer.merged_adapters:
        raise UnsupportedAdapterError(
            f"{name}: adapter {adapter_name!r} is merged into the base weight; call "
            "model.unmerge_adapter() first (the base weight must be the aligned weight)."
        )


# PEFT LoRA layer types whose update is not a linear dW = s * B @ A on an (m, n) weight.
UNSCORED_LAYER_TYPES = ("Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "ParamWrapper")


def check_no_unscored_layers(model: nn.Module, adapter_name: str) -> None:
    """Refuse LoRA layers that hold the adapter outside ``lora_A`` (embeddings: ``lora_embedding_A``).

    :func:`iter_lora_layers` finds layers by ``lora_A``; without this check a LoRA on ``embed_tokens``
    would be skipped silently, neither scored nor reported.

    Raises:
        UnsupportedAdapterError: names the first such module and how to leave it out.
    """
    for name, module in iter_lora_layers(model):
        if adapter_name not in module.lora_A and any(
            adapter_name in getattr(module, attribute, {}) for attribute in module.adapter_layer_names
        ):
            raise UnsupportedAdapterError(
                f"{name}: LoRA on {type(module.get_base_layer()).__name__} (PEFT's {type(module).__name__}) "
                "is not supported: SPLoRA scores plain LoRA updates dW = s * B @ A on linear layers only. "
                f"Remove {name.rsplit('.', 1)[-1]!r} from LoraConfig.target_modules (train it with "
                "modules_to_save if it must change)."
            )


def lora_updates_from_model(model: nn.Module, adapter_name: str | None = None) -> list[LoraUpdate]:
    """The LoRA updates of a live model, sharing storage with its parameters (no copy).

    Raises:
        NoLoraLayersError: no LoRA layer holds the adapter.
        UnsupportedAdapterError: see :func:`check_supported`.
    """
    adapter = resolve_adapter_name(model, adapter_name)
    check_no_unscored_layers(model, adapter)
    updates = []
    for name, layer in iter_lora_layers(model, adapter):
        check_supported(name, layer, adapter)
        updates.append(
            LoraUpdate(
                name=name,
                lora_A=layer.lora_A[adapter].weight.detach(),
                lora_B=layer.lora_B[adapter].weight.detach(),
                scaling=float(layer.scaling[adapter]),
                fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
            )
        )
    if not updates:
        raise NoLoraLayersError(
            f"No LoRA layer holds adapter {adapter!r}: wrap the model with peft.get_peft_model(model, "
            "LoraConfig(target_modules=[...])) before scoring it."
        )
    return updates


def quantization_of(layer: nn.Module) -> str | None:
    """What quantizes the base weight of a LoRA layer (``"bnb Linear4bit"``, ...), or None.

    Recognised: PEFT's quantized LoRA layer types (:data:`QUANTIZED_LORA_MODULES`), bitsandbytes
    weight classes (:data:`QUANTIZED_WEIGHT_CLASSES`, by name, as PEFT does), base layers from a
    quantization library, and packed integer weights (``qweight``, HQQ's ``W_q``, non-float dtypes).
    """
    for cls in type(layer).__mro__:
        module = cls.__module__
        if module.startswith("peft.tuners.lora.") and module.rsplit(".", 1)[-1] in QUANTIZED_LORA_MODULES:
            return f"{module.rsplit('.', 1)[-1]} {cls.__name__}"
    base = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
    weight = getattr(base, "weight", None)
    if type(weight).__name__ in QUANTIZED_WEIGHT_CLASSES:
        return f"bitsandbytes {type(weight).__name__}"
    for cls in (type(base), type(weight)):
        if cls.__module__.startswith(QUANTIZED_LIBRARIES):
            return f"{cls.__module__.split('.')[0]} {cls.__name__}"
    if hasattr(base, "qweight") or hasattr(base, "W_q"):
        return f"packed {type(base).__name__}"
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        return f"{weight.dtype} weight"
    return None


def check_not_quantized(model: nn.Module | None, layers: Mapping[str, nn.Module]) -> None:
    """Refuse to read ``W_aligned`` from quantized base layers (QLoRA).

    Dequantized NF4 weights differ from the original by about as much as an alignment update, so
    ``V = W_aligned - W_base`` built from them is mostly quantization error (measured on a tiny model:
    cosine 0.1 with the true V, 9x its norm).

    Raises:
        QuantizedBaseError: names the first quantized module and the fix (``aligned=`` /
            ``SPLoRAConfig.aligned_model``: the full-precision checkpoint, streamed from disk).
    """
    config = getattr(unwrap_peft(model), "config", None) if model is not None else None
    found = next(((name, kind) for name, layer in layers.items() if (kind := quantization_of(layer))), None)
    if found is None and getattr(config, "quantization_config", None) is not None:
        found = ("the model", f"quantization_config {type(config.quantization_config).__name__}")
    if found is not None:
        name, kind = found
        raise QuantizedBaseError(
            f"{name}: the base layer is quantized ({kind}), so its dequantized weight is not the aligned "
            "weight (quantization error is as large as an alignment update). Pass the full-precision "
            "aligned checkpoint: SPLoRAConfig(aligned_model=...) for the callback, "
            "AlignmentSubspace.from_pretrained(..., aligned=...) in Python, --aligned on the command line."
        )


def base_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen base weight of a LoRA layer as a dense (m, n) tensor (Conv1D weights transposed).

    Raises:
        QuantizedBaseError: the base layer is quantized (see :func:`check_not_quantized`).
    """
    from peft.utils.integrations import dequantize_module_weight

    check_not_quantized(None, {"a LoRA layer": layer})
    weight = dequantize_module_weight(layer.get_base_layer())
    weight = weight.detach()
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight
