"""A saved LoRA adapter on disk: its file names, its config, its factors read without a model.

``lora_updates_from_adapter(folder)`` gives the same :class:`~splora_callback.layers.LoraUpdate`
list as ``lora_updates_from_model`` on the loaded adapter, checked for what the scores support.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key

from .layers import PEFT_PREFIX, LoraUpdate, NoLoraLayersError, UnsupportedAdapterError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class InvalidAdapterError(ValueError):
    """A saved adapter's files are unreadable or malformed (corrupt weights, bad JSON, missing fields)."""


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
        rank = configured_rank(config, name)
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


def configured_rank(config: dict, name: str) -> int:
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


def saved_layer_names(state_dict: Mapping[str, object]) -> list[str]:
    """Module names of the LoRA layers in a saved adapter's state dict."""
    suffix = ".lora_A.weight"
    return [key[: -len(suffix)].removeprefix(PEFT_PREFIX) for key in state_dict if key.endswith(suffix)]


def with_pattern(rank_pattern: dict | None, alpha_pattern: dict | None, name: str, rank: int, alpha: float) -> tuple[dict, dict]:
    """``rank_pattern`` / ``alpha_pattern`` with an exact-name entry for module ``name``, first.

    PEFT matches pattern keys as regular expressions and takes the first match. Older PEFT writes
    ``adapter_config.json`` with sorted keys, PEFT >= 0.22 keeps the patterns' order: the entry
    ``(?:<escaped name>)`` goes first and sorts before names and the usual patterns. Checked in
    both orders: if another key would still win, refuse.

    Raises:
        ValueError: a pattern of the adapter's config would shadow the entry when PEFT reloads it.
    """
    key = f"(?:{re.escape(name)})"
    ranks = {key: rank, **{k: v for k, v in (rank_pattern or {}).items() if k != key}}
    alphas = {key: alpha, **{k: v for k, v in (alpha_pattern or {}).items() if k != key}}
    for pattern, label in ((ranks, "rank_pattern"), (alphas, "alpha_pattern")):
        winner = get_pattern_key(sorted(pattern), name)
        if winner != key:
            raise ValueError(
                f"{name}: the adapter config's {label} key {winner!r} would override the pruned module's "
                f"rank on reload (PEFT versions that sort the patterns take the first matching key in "
                "sorted order); rename that pattern so it sorts after '(?:' or prune whole layers instead."
            )
    return ranks, alphas


def check_adapter_patterns(peft_config: Any, names: Sequence[str], components: bool) -> None:
    """What an action on ``names`` will need of the adapter config, checked before any work: its
    regular expressions (``exclude_modules`` as a string, ``rank_pattern`` / ``alpha_pattern``
    keys) compile, and, when rank-one ``components`` are pruned, no pattern key would shadow the
    exact-name entry a pruned module gets (:func:`with_pattern`).

    Raises:
        ValueError: names the field, the key or regex, and the fix.
    """
    get = peft_config.get if isinstance(peft_config, Mapping) else lambda key: getattr(peft_config, key, None)
    exclude = get("exclude_modules")
    patterns = [("exclude_modules", exclude)] if isinstance(exclude, str) else []
    patterns += [(field_name, key) for field_name in ("rank_pattern", "alpha_pattern") for key in get(field_name) or {}]
    for field_name, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"adapter config {field_name} {pattern!r} is not a valid regular expression ({error}); "
                             "PEFT could not load an adapter written with it. Fix the pattern in the LoraConfig.") from error
    if components:
        for name in names:
            with_pattern(get("rank_pattern"), get("alpha_pattern"), name, 1, 1.0)
