"""Find the LoRA layers of a model (or of a saved adapter) and read their factors.

Everything downstream works on :class:`LoraUpdate`: the factors of one adapted linear module in
*weight orientation*, so that the update is ``dW = scaling * lora_B @ lora_A`` with shape
``(out_features, in_features)`` whatever the module type (GPT-2 ``Conv1D`` included).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
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
        ValueError: several adapters are active and none was named.
    """
    if adapter_name is not None:
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


def lora_updates_from_model(model: nn.Module, adapter_name: str | None = None) -> list[LoraUpdate]:
    """The LoRA updates of a live model, sharing storage with its parameters (no copy).

    Raises:
        NoLoraLayersError: no LoRA layer holds the adapter.
        UnsupportedAdapterError: see :func:`check_supported`.
    """
    adapter = resolve_adapter_name(model, adapter_name)
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


def base_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen base weight of a LoRA layer as a dense (m, n) tensor.

    bitsandbytes 4/8-bit weights are dequantized (PEFT's helper); Conv1D weights are transposed.
    """
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(layer.get_base_layer())
    weight = weight.detach()
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def _adapter_scaling(config: dict, name: str) -> float:
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
        UnsupportedAdapterError: not a LoRA adapter, or DoRA / LoRA bias.
    """
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: ADAPTER_DIR must be a directory written by PeftModel.save_pretrained."
        )
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA.")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(f"{adapter_dir}: DoRA adapters are not supported.")
    if config.get("lora_bias"):
        raise UnsupportedAdapterError(f"{adapter_dir}: lora_bias=True is not supported.")
    return config


def lora_updates_from_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> list[LoraUpdate]:
    """LoRA updates from a saved adapter's state dict (keys ``base_model.model.<name>.lora_A.weight``)."""
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    names = [key[: -len(suffix_a)] for key in state_dict if key.endswith(suffix_a)]
    updates = []
    for key_prefix in names:
        name = key_prefix.removeprefix(PEFT_PREFIX)
        lora_b = state_dict.get(key_prefix + suffix_b)
        if lora_b is None:
            raise UnsupportedAdapterError(f"{name}: lora_A without lora_B in the adapter weights.")
        updates.append(
            LoraUpdate(
                name=name,
                lora_A=state_dict[key_prefix + suffix_a],
                lora_B=lora_b,
                scaling=_adapter_scaling(config, name),
                fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            )
        )
    if not updates:
        raise NoLoraLayersError("The adapter weights hold no lora_A/lora_B pair.")
    return updates


def lora_updates_from_adapter(adapter_dir: str | Path) -> tuple[list[LoraUpdate], dict, dict]:
    """Read a saved adapter without loading any model.

    Returns:
        ``(updates, config, state_dict)``: the updates, the adapter config as a dict, and the raw
        tensors (kept so that a pruned copy can be written from them).
    """
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (only safetensors adapters are supported).")
    state_dict = load_file(str(weights))
    return lora_updates_from_state_dict(state_dict, config), config, state_dict
