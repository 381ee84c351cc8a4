"""The alignment subspace: per module, ``V = W_aligned - W_base`` and the norms the scores need.

Built by streaming: for each LoRA-adapted module, ``W_aligned`` comes from the live model's frozen
base layer (or is streamed from the aligned checkpoint), ``W_base`` is streamed from the base
checkpoint, and only ``V`` is kept. Peak memory: about one module's three tensors on top of what is
kept. A safetensors cache file makes later builds free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ._io import atomic_path, check_output_path, check_writable
from .checkpoint import CheckpointError, SafetensorsCheckpoint
from .layers import (
    base_weight,
    check_no_unscored_layers,
    check_not_quantized,
    check_supported,
    iter_lora_layers,
    resolve_adapter_name,
)
from .metrics import frobenius_norm, spectral_norm

logger = logging.getLogger(__name__)

CACHE_FORMAT = "splora-alignment-v1"
# Rows of each V hashed into the cache key: reading them costs a few KB per module, and any change
# of either weight there (another aligned model, new weights at the same path) changes the key.
KEY_ROWS = 4
# ||V||_F / ||W_base||_F above this in a module: base and aligned look unrelated there. Alignment
# fine-tunes move a weight by a few percent; two independent weights of equal norm differ by ~1.4x.
UNRELATED_RATIO = 0.5


class AlignmentMismatchError(ValueError):
    """Base and aligned weights do not belong together (shape mismatch, missing tensor, NaN/inf)."""


class AlignmentCacheError(ValueError):
    """The alignment cache path cannot be used (a folder, another file, inside an input, unwritable)."""


@dataclass(frozen=True)
class ModuleSpec:
    """Which weight to read: module name and whether its checkpoint stores (n, m) (Conv1D)."""

    name: str
    fan_in_fan_out: bool = False


@dataclass
class AlignmentSubspace:
    """Alignment directions of the LoRA-adapted modules.

    Attributes:
        directions: module name -> ``V`` (m, n), stored in ``dtype`` on ``device``.
        frobenius_norms: module name -> ``||V||_F`` (0 when base and aligned are identical there).
        spectral_norms: module name -> ``||V||_2``.
        source: where it came from (base, aligned), for reports.
        weight_ratios: module name -> ``||V||_F / ||W_base||_F`` (the plausibility check; empty
            when built without it).
        cache_file: the cache file it was read from or written to, if any.
    """

    directions: dict[str, torch.Tensor]
    frobenius_norms: dict[str, float]
    spectral_norms: dict[str, float]
    source: dict[str, str] = field(default_factory=dict)
    weight_ratios: dict[str, float] = field(default_factory=dict)
    cache_file: str | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.directions

    def __len__(self) -> int:
        return len(self.directions)

    @property
    def names(self) -> list[str]:
        return list(self.directions)

    def has_signal(self, name: str) -> bool:
        """False when ``V = 0`` there: the module cannot be judged (spec 4)."""
        return self.frobenius_norms[name] > 0

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        *,
        model: nn.Module | None = None,
        aligned: str | os.PathLike | None = None,
        target_modules: Sequence[str] | None = None,
        fan_in_fan_out: bool = False,
        adapter_name: str | None = None,
        modules: Sequence[str] | None = None,
        cache_file: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        progress: bool = True,
    ) -> AlignmentSubspace:
        """Build (or load from ``cache_file``) the alignment subspace.

        Args:
            base: the unaligned base model: local directory with safetensors, or Hub id.
            model: the live LoRA model; its frozen base weights are ``W_aligned`` and its LoRA
                layers say which modules to read. Either ``model`` or ``aligned`` is needed.
            aligned: the aligned checkpoint (directory or Hub id), streamed like ``base``; takes
                precedence over the model's weights for ``W_aligned`` (use it with quantized bases:
                dequantized NF4 differs from the original by about an alignment update).
            target_modules: without ``model``: exact module names, or module kinds (``"q_proj"``)
                matched against the aligned checkpoint's keys.
            fan_in_fan_out: without ``model``: weights are stored (n, m) (GPT-2 Conv1D).
            modules: build only these module names (a rank's slice in multi-process scoring).
            cache_file: a ``.safetensors`` file; reused only when it was built from the same
                content (modules, the base and aligned files' names, sizes and mtimes, a hash of
                each V's first rows, dtype), rebuilt (atomically) when stale, unreadable or cut short.
            dtype: storage dtype of V (float32: exact; bfloat16 halves memory, ~3 significant digits).

        A module whose V is more than half its base weight's norm is reported (a warning): base and
        aligned then look unrelated (:data:`UNRELATED_RATIO`).

        Raises:
            ValueError: neither ``model`` nor ``aligned``/``target_modules`` given; an unknown
                ``adapter_name``.
            QuantizedBaseError: ``W_aligned`` would come from quantized base layers (QLoRA) and no
                ``aligned`` checkpoint was given.
            UnsupportedAdapterError: LoRA layers the scores do not cover (embeddings, DoRA, ...).
            AlignmentCacheError: ``cache_file`` is a folder, another safetensors file, inside a
                checkpoint or not writable (checked before the build).
            CheckpointError: a checkpoint cannot be resolved or read, or lacks a module's weight.
            AlignmentMismatchError: shapes differ (wrong base model) or weights hold NaN/inf.
        """
        if model is None and (aligned is None or not target_modules):
            raise ValueError(
                "AlignmentSubspace.from_pretrained needs model= (the live LoRA model) or aligned= with "
                "target_modules= (post hoc)."
            )
        source = {"base": str(base), "aligned": str(aligned) if aligned is not None else "live model"}
        layers = {}
        if model is not None:
            adapter = resolve_adapter_name(model, adapter_name)
            check_no_unscored_layers(model, adapter)
            layers = dict(iter_lora_layers(model, adapter))
            for name, layer in layers.items():
                check_supported(name, layer, adapter)
            if aligned is None:  # W_aligned from the live model: refuse quantized base layers (QLoRA)
                check_not_quantized(model, layers)
        if cache_file is not None:
            _check_cache_path(Path(cache_file), {"base model": base, "aligned model": aligned})
        aligned_checkpoint = SafetensorsCheckpoint.open(aligned, revision) if aligned is not None else None
        base_checkpoint = SafetensorsCheckpoint.open(base, revision)
        if model is not None:
            specs = [ModuleSpec(name, bool(getattr(layer, "fan_in_fan_out", False))) for name, layer in layers.items()]
        else:
            specs = _specs_from_targets(aligned_checkpoint, target_modules, fan_in_fan_out)
        if modules is not None:
            wanted = set(modules)
            specs = [spec for spec in specs if spec.name in wanted]
        if not specs and modules is None:
            raise ValueError("The model has no LoRA layer: nothing to build an alignment subspace for.")

        key = None
        if cache_file is not None:
            key = _cache_key(specs, base_checkpoint, aligned_checkpoint, layers, dtype)
            cached = _load_if_current(Path(cache_file), key, device)
            if cached is not None:
                cached.source = source
                _warn_if_unrelated(cached, base, aligned)
                return cached

        directions, frobenius, spectral, ratios, rows = {}, {}, {}, {}, {}
        for spec in tqdm(specs, desc="SPLoRA alignment subspace", unit="module", disable=not progress):
            if aligned_checkpoint is not None:
                aligned_weight = aligned_checkpoint.module_weight(spec.name, spec.fan_in_fan_out)
            else:
                aligned_weight = base_weight(layers[spec.name])
            base_weight_tensor = base_checkpoint.module_weight(spec.name, spec.fan_in_fan_out)
            direction = alignment_direction(spec.name, aligned_weight, base_weight_tensor, base)
            frobenius[spec.name] = frobenius_norm(direction)
            spectral[spec.name] = spectral_norm(direction) if frobenius[spec.name] > 0 else 0.0
            ratios[spec.name] = _ratio(frobenius[spec.name], frobenius_norm(base_weight_tensor))
            rows[spec.name] = _digest(direction[:KEY_ROWS])
            directions[spec.name] = direction.to(device=device, dtype=dtype)
            del aligned_weight, base_weight_tensor, direction

        subspace = cls(directions, frobenius, spectral, source, ratios)
        without_signal = [name for name in subspace.names if not subspace.has_signal(name)]
        if without_signal:
            logger.warning(
                "%d module(s) are identical in base and aligned weights (V = 0) and cannot be judged: %s",
                len(without_signal),
                without_signal[:5],
            )
        _warn_if_unrelated(subspace, base, aligned)
        if cache_file is not None:
            if key is not None and key["rows"] != rows:  # the weights changed while we read them
                logger.warning("Weights changed during the alignment build; the cache %s is not written.", cache_file)
            else:
                subspace.save(cache_file, key)
        return subspace

    def save(self, path: str | os.PathLike, key: dict | None = None) -> None:
        """Write V and the norms to one safetensors file (atomically).

        Args:
            key: what the cache was built from (:func:`_cache_key`); a later build reuses the file
                only when its own key is the same. A file saved without a key is never reused.
        """
        metadata = {
            "format": CACHE_FORMAT,
            "source": json.dumps(self.source),
            "frobenius_norms": json.dumps(self.frobenius_norms),
            "spectral_norms": json.dumps(self.spectral_norms),
            "weight_ratios": json.dumps(self.weight_ratios),
        }
        if key is not None:
            metadata["key"] = json.dumps(key, sort_keys=True)
        tensors = {name: direction.contiguous().cpu() for name, direction in self.directions.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        self.cache_file = str(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> AlignmentSubspace:
        """Read a file written by :meth:`save`.

        Raises:
            AlignmentCacheError: the file is not an alignment cache, or is truncated or corrupt.
        """
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != CACHE_FORMAT:
                    raise AlignmentCacheError(
                        f"{path} is not an alignment cache written by splora_callback ({CACHE_FORMAT})."
                    )
                directions = {name: handle.get_tensor(name) for name in handle.keys()}
        except SafetensorError as error:
            raise AlignmentCacheError(f"{path} is truncated or corrupt ({error}).") from error
        return cls(
            directions,
            json.loads(metadata["frobenius_norms"]),
            json.loads(metadata["spectral_norms"]),
            json.loads(metadata["source"]),
            json.loads(metadata.get("weight_ratios", "{}")),
            str(path),
        )


# --- the cache: reused only while what it was built from is unchanged ---------------------------


def _digest(rows: torch.Tensor) -> str:
    """A short hash of float32 rows (the same bytes give the same hash on every machine)."""
    data = rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _cache_key(specs: list[ModuleSpec], base: SafetensorsCheckpoint, aligned: SafetensorsCheckpoint | None,
               layers: dict[str, nn.Module], dtype: torch.dtype) -> dict | None:
    """What a cache must have been built from to be reused: the modules, the base and aligned files
    (name, size, mtime) and a hash of each V's first rows (:data:`KEY_ROWS`: catches a live model
    with other weights, and files rewritten with the same size and time). None when the rows cannot
    even be read (a wrong base): the build then raises the full error."""
    rows = {}
    try:
        for spec in specs:
            base_rows = base.module_rows(spec.name, KEY_ROWS, spec.fan_in_fan_out)
            if aligned is not None:
                aligned_rows = aligned.module_rows(spec.name, KEY_ROWS, spec.fan_in_fan_out)
            else:
                aligned_rows = base_weight(layers[spec.name])[:KEY_ROWS]
            if aligned_rows.shape != base_rows.shape:
                return None
            rows[spec.name] = _digest(alignment_direction(spec.name, aligned_rows, base_rows, base.path))
    except (CheckpointError, AlignmentMismatchError):
        return None
    return {
        "format": CACHE_FORMAT,
        "base_files": base.fingerprint(),
        "aligned_files": aligned.fingerprint() if aligned is not None else "live model",
        "dtype": str(dtype),
        "rows": rows,
    }


def cache_matches_checkpoints(metadata: dict, source: dict, revision: str | None = None) -> bool:
    """For readers of a slice of a cache file (multi-process runs): the cache records a key and the
    base / aligned checkpoint files are those it was built from. The rows' hashes are not checked
    here (that needs every module's weights): a live model with other weights is not detected."""
    try:
        key = json.loads(metadata.get("key", "null"))
        if not isinstance(key, dict):
            return False
        if key["base_files"] != SafetensorsCheckpoint.open(source["base"], revision).fingerprint():
            return False
        aligned = source.get("aligned", "live model")
        stored = key["aligned_files"]
        return stored == "live model" if aligned == "live model" else (
            stored == SafetensorsCheckpoint.open(aligned, revision).fingerprint())
    except (CheckpointError, KeyError, OSError, json.JSONDecodeError):
        return False


def _check_cache_path(path: Path, inputs: dict) -> None:
    """Before any build: the cache path must be a file we may write, outside the checkpoints, and
    not someone else's safetensors file (it would be overwritten)."""
    check_output_path(path, inputs, what="Alignment cache")
    if path.is_dir():
        raise AlignmentCacheError(
            f"Alignment cache {path} is a directory; give a file path such as {path / 'alignment.safetensors'}."
        )
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                foreign = (handle.metadata() or {}).get("format") != CACHE_FORMAT
        except SafetensorError:
            foreign = False  # unreadable: a cache cut short by a crash, rebuilt below
        if foreign:
            raise AlignmentCacheError(
                f"{path} is a safetensors file but not an alignment cache; it would be overwritten. "
                "Choose another cache path."
            )
    try:
        check_writable(path, "Alignment cache")
    except ValueError as error:
        raise AlignmentCacheError(str(error)) from error


def _load_if_current(path: Path, key: dict | None, device: str | torch.device) -> AlignmentSubspace | None:
    """The cache at ``path`` if it was built from exactly ``key``; else None (and why, logged)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = json.loads((handle.metadata() or {}).get("key", "null"))
        cached = AlignmentSubspace.load(path, device=device) if key is not None and stored == key else None
    except (SafetensorError, AlignmentCacheError, json.JSONDecodeError) as error:
        logger.warning("Alignment cache %s is unreadable (%s): rebuilding it.", path, error)
        return None
    if cached is None:
        why = _key_difference(stored, key)
        logger.warning("Alignment cache %s was built from other inputs (%s): rebuilding it.", path, why)
        return None
    logger.info("Alignment subspace loaded from cache %s", path)
    return cached


def _key_difference(stored: dict | None, key: dict | None) -> str:
    if not isinstance(stored, dict):
        return "it records none (written by an older version)"
    if key is None:
        return "the checkpoints' weights cannot be compared"
    if set(stored.get("rows", {})) != set(key["rows"]):
        return "other modules"
    for field_name, what in (("base_files", "base checkpoint files"), ("aligned_files", "aligned model"),
                             ("dtype", "dtype"), ("rows", "weights")):
        if stored.get(field_name) != key[field_name]:
            return f"{what} changed"
    return "format"


def _ratio(direction_norm: float, weight_norm: float) -> float:
    if weight_norm > 0:
        return direction_norm / weight_norm
    return math.inf if direction_norm > 0 else 0.0


def _warn_if_unrelated(subspace: AlignmentSubspace, base: object, aligned: object) -> None:
    """Warn when V is as large as the weights themselves: base and aligned look unrelated."""
    far = {name: ratio for name, ratio in subspace.weight_ratios.items() if ratio > UNRELATED_RATIO}
    if not far:
        return
    worst = sorted(far, key=far.get, reverse=True)
    logger.warning(
        "Base %s and aligned %s look unrelated in %d of %d modules: ||W_aligned - W_base|| is up to %.2fx "
        "the base weight's norm (e.g. %s), where an alignment fine-tune moves weights by a few percent. "
        "Is the base the model the aligned model was trained from? Scores against an unrelated base mean "
        "nothing.", base, "the live model" if aligned is None else aligned, len(far),
        len(subspace.weight_ratios), far[worst[0]], worst[:3],
    )


def _specs_from_targets(
    checkpoint: SafetensorsCheckpoint, target_modules: Sequence[str], fan_in_fan_out: bool
) -> list[ModuleSpec]:
    """Exact module names are kept; kinds (no dot) expand to the checkpoint's modules of that kind."""
    kinds = [target for target in target_modules if "." not in target]
    names = [target for target in target_modules if "." in target] + checkpoint.module_names(kinds)
    if not names:
        raise CheckpointError(f"No module of {list(target_modules)} in the checkpoint at {checkpoint.path}.")
    return [ModuleSpec(name, fan_in_fan_out) for name in names]


def alignment_direction(
    name: str, aligned_weight: torch.Tensor, base_weight_tensor: torch.Tensor, base: object
) -> torch.Tensor:
    """``V = W_aligned - W_base`` in float32 (bf16 differences would round away small updates)."""
    if aligned_weight.shape != base_weight_tensor.shape:
        raise AlignmentMismatchError(
            f"{name}: aligned weight has shape {tuple(aligned_weight.shape)} but the base checkpoint "
            f"{base!s} has {tuple(base_weight_tensor.shape)}. The base must be the model the aligned "
            "model was trained from (same architecture and size)."
        )
    # One float32 (m, n) buffer, subtracted in place: no float32 temporary of either weight.
    direction = torch.empty(aligned_weight.shape, dtype=torch.float32).copy_(aligned_weight)
    direction.sub_(base_weight_tensor)
    if not torch.isfinite(direction).all():
        raise AlignmentMismatchError(
            f"{name}: the aligned or base weight holds NaN/inf values; check the checkpoints (a failed "
            "training run or a broken download)."
        )
    return direction
