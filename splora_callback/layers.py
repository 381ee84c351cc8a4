"""Find the LoRA layers of a model (or of a saved adapter) and read their factors.

Everything downstream works on :class:`LoraUpdate`: the factors of one adapted linear module in
*weight orientation*, so that the update is ``dW = scaling * lora_B @ lora_A`` with shape
``(out_features, in_features)`` whatever the module type (GPT-2 ``Conv1D`` included).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from torch import nn

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class UnsupportedAdapterError(ValueError):
    """The adapter is not a plain LoRA on linear modules (DoRA, LoRA bias, embeddings, merged, ...)."""


class NoLoraLayersError(ValueError):
    """The model or adapter has no LoRA layer for the requested adapter."""


class UnknownLayerError(KeyError, ValueError):
    """A layer name that is not a LoRA layer of the adapter (a typo, or already pruned)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class InvalidAdapterError(ValueError):
    """A saved adapter's files are unreadable or malformed (corrupt weights, bad JSON, missing fields)."""


class NothingLeftError(ValueError):
    """Pruning would remove every LoRA layer: nothing of the fine-tune left, and PEFT cannot load it."""


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
        layer = next((module for module in model.modules() if isinstance(module, LoraLayer)), None)
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
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for attribute in module.adapter_layer_names:
                names.update(getattr(module, attribute, {}).keys())
    return names


def iter_lora_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(name, layer)`` for every ``LoraLayer`` that holds ``adapter_name``, in module order."""
    for name, module in unwrap_peft(model).named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


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
    for name, module in unwrap_peft(model).named_modules():
        if isinstance(module, LoraLayer) and adapter_name not in module.lora_A and any(
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


def adapter_scaling(config: dict, name: str) -> float:
    """PEFT's scaling for module ``name`` from a saved ``adapter_config.json`` (rank/alpha patterns)."""
    rank = config["r"]
    alpha = config["lora_alpha"]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), rank)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """``adapter_config.json`` of a saved LoRA adapter, checked for what the scores support.

    Raises:
        FileNotFoundError: the directory holds no adapter.
        InvalidAdapterError: the file cannot be read, is not a JSON object, or lacks ``r`` /
            ``lora_alpha`` (or holds values PEFT would not accept: a regex in ``exclude_modules``,
            ``rank_pattern`` or ``alpha_pattern`` that does not compile).
        UnsupportedAdapterError: not a LoRA adapter (VeRA, LoHa, ...), or DoRA / LoRA bias.
    """
    from .checkpoint import check_readable

    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        check_readable(path, "Adapter config", InvalidAdapterError)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: ADAPTER_DIR must be a directory written by PeftModel.save_pretrained."
            + _interrupted_hint(Path(adapter_dir))
        ) from None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidAdapterError(f"{path} is not valid JSON ({error}); save the adapter again.") from error
    if not isinstance(config, dict):
        raise InvalidAdapterError(
            f"{path} holds a JSON {type(config).__name__}, not an object: it is not a PEFT adapter config."
        )
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(
            f"{path}: peft_type {config.get('peft_type')!r} is not LORA: SPLoRA scores and prunes LoRA adapters "
            "(dW = s * B @ A) only, not VeRA, LoHa, LoKr, IA3 or prompt tuning; train the adapter with "
            "peft.LoraConfig to use it."
        )
    if config.get("use_dora"):
        raise UnsupportedAdapterError(f"{adapter_dir}: DoRA adapters are not supported.")
    if config.get("lora_bias"):
        raise UnsupportedAdapterError(f"{adapter_dir}: lora_bias=True is not supported.")
    for key, positive in (("r", True), ("lora_alpha", False)):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
            raise InvalidAdapterError(
                f"{path}: field {key!r} is {'missing' if key not in config else repr(value)}; a LoRA adapter "
                f"config needs {key!r} as a {'positive integer' if positive else 'number'}. Save the adapter "
                "again with PeftModel.save_pretrained."
            )
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise InvalidAdapterError(f"{path}: field {key!r} must be an object (pattern -> number), got {config[key]!r}.")
    from .pruning import check_adapter_patterns  # pruning imports this module

    try:  # a regex PEFT cannot compile: the adapter cannot be loaded, nor a pruned copy of it
        check_adapter_patterns(config, [], components=False)
    except ValueError as error:
        raise InvalidAdapterError(f"{path}: {error}") from error
    return config


def _interrupted_hint(directory: Path) -> str:
    """A note when a killed ``--overwrite`` left the only copy of ``directory`` in a hidden folder."""
    kept = sorted(directory.parent.glob(f".{directory.name}.*.old/{directory.name}")) if directory.name else []
    if not kept:
        return ""
    return (f" A run killed while replacing it left the previous copy in {kept[-1]}: move it back with "
            f"`mv {kept[-1]} {directory}` (the next write to {directory.parent} does it too).")


def lora_updates_from_state_dict(state_dict: dict[str, torch.Tensor], config: dict,
                                 source: str = "the adapter weights") -> list[LoraUpdate]:
    """LoRA updates from a saved adapter's state dict (keys ``base_model.model.<name>.lora_A.weight``).

    Raises:
        UnsupportedAdapterError: LoRA tensors the scores do not cover (embeddings, convolutions,
            DoRA magnitudes, biases).
        InvalidAdapterError: a ``lora_A`` without its ``lora_B`` (or the reverse), or factors whose
            shapes do not fit (ranks differ from each other or from the config).
        NoLoraLayersError: no ``lora_A``/``lora_B`` pair at all.
    """
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    fix = "SPLoRA scores plain LoRA updates dW = s * B @ A on linear layers only."
    for key in state_dict:
        if "lora_" in key and not key.endswith((suffix_a, suffix_b)):
            raise UnsupportedAdapterError(f"{source}: tensor {key!r} is not a linear LoRA factor. {fix}")
    names = [key[: -len(suffix_a)] for key in state_dict if key.endswith(suffix_a)]
    orphans = [key for key in state_dict if key.endswith(suffix_b) and key[: -len(suffix_b)] + suffix_a not in state_dict]
    if orphans:
        raise InvalidAdapterError(f"{source}: {orphans[0]!r} has no matching lora_A; the adapter file is incomplete.")
    updates = []
    for key_prefix in names:
        name = key_prefix.removeprefix(PEFT_PREFIX)
        lora_a, lora_b = state_dict[key_prefix + suffix_a], state_dict.get(key_prefix + suffix_b)
        if lora_b is None:
            raise InvalidAdapterError(f"{source}: {name} has lora_A without lora_B; the adapter file is incomplete.")
        if lora_a.ndim != 2 or lora_b.ndim != 2:
            raise UnsupportedAdapterError(
                f"{source}: {name} has {lora_a.ndim}-D LoRA factors (a convolution?). {fix}"
            )
        if lora_a.shape[0] != lora_b.shape[1]:
            raise InvalidAdapterError(
                f"{source}: {name}: lora_A is {tuple(lora_a.shape)} (rank {lora_a.shape[0]}) but lora_B is "
                f"{tuple(lora_b.shape)} (rank {lora_b.shape[1]}); the ranks must match. The adapter file is "
                "corrupt or was edited: save it again."
            )
        rank = _configured_rank(config, name)
        if rank != lora_a.shape[0]:
            raise InvalidAdapterError(
                f"{source}: {name} has rank {lora_a.shape[0]} but adapter_config.json gives r={rank} for it "
                "(r / rank_pattern); the config and the weights belong to different adapters."
            )
        updates.append(
            LoraUpdate(
                name=name,
                lora_A=lora_a,
                lora_B=lora_b,
                scaling=adapter_scaling(config, name),
                fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            )
        )
    if not updates:
        raise NoLoraLayersError(f"{source} hold no lora_A/lora_B pair.")
    return updates


def _configured_rank(config: dict, name: str) -> int:
    rank_pattern = config.get("rank_pattern") or {}
    return rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])


def lora_updates_from_adapter(adapter_dir: str | Path) -> tuple[list[LoraUpdate], dict, dict]:
    """Read a saved adapter without loading any model.

    Returns:
        ``(updates, config, state_dict)``: the updates, the adapter config as a dict, and the raw
        tensors (kept so that a pruned copy can be written from them).

    Raises:
        FileNotFoundError, InvalidAdapterError, UnsupportedAdapterError: see
            :func:`read_adapter_config` and :func:`lora_updates_from_state_dict`; a truncated or
            corrupt ``adapter_model.safetensors`` is an ``InvalidAdapterError`` naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoint import check_readable

    config = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        check_readable(weights, "Adapter weights", InvalidAdapterError)
    except FileNotFoundError:
        raise FileNotFoundError(f"{weights} not found (only safetensors adapters are supported).") from None
    try:
        state_dict = load_file(str(weights))
    except SafetensorError as error:
        raise InvalidAdapterError(
            f"{weights} is not a readable safetensors file ({error}): it is truncated or corrupt. "
            "Save the adapter again (PeftModel.save_pretrained)."
        ) from error
    return lora_updates_from_state_dict(state_dict, config, str(weights)), config, state_dict


# --- what a write must never touch, and what it must contain ------------------------------------


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


def saved_layer_names(state_dict: Mapping[str, object]) -> list[str]:
    """Module names of the LoRA layers in a saved adapter's state dict."""
    suffix = ".lora_A.weight"
    return [key[: -len(suffix)].removeprefix(PEFT_PREFIX) for key in state_dict if key.endswith(suffix)]


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
