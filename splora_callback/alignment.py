"""The alignment subspace: per module, ``V = W_aligned - W_base`` and the norms the scores need.

Built by streaming: for each LoRA-adapted module, ``W_aligned`` comes from the live model's frozen
base layer (or is streamed from the aligned checkpoint), ``W_base`` is streamed from the base
checkpoint, and only ``V`` is kept. Peak memory: about one module's three tensors on top of what is
kept. A safetensors cache file makes later builds free.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ._io import atomic_path
from .checkpoint import CheckpointError, SafetensorsCheckpoint
from .layers import base_weight, iter_lora_layers, resolve_adapter_name
from .metrics import frobenius_norm, spectral_norm

logger = logging.getLogger(__name__)

CACHE_FORMAT = "splora-alignment-v1"


class AlignmentMismatchError(ValueError):
    """Base and aligned weights do not belong together (shape mismatch, missing tensor, NaN/inf)."""


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
        source: where it came from (base, aligned), for reports and the cache check.
    """

    directions: dict[str, torch.Tensor]
    frobenius_norms: dict[str, float]
    spectral_norms: dict[str, float]
    source: dict[str, str] = field(default_factory=dict)

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
            cache_file: a ``.safetensors`` file; reused when it matches base, aligned and the
                modules, written (atomically) otherwise.
            dtype: storage dtype of V (float32: exact; bfloat16 halves memory, ~3 significant digits).

        Raises:
            ValueError: neither ``model`` nor ``aligned``/``target_modules`` given.
            CheckpointError: a checkpoint cannot be resolved or lacks a module's weight.
            AlignmentMismatchError: shapes differ (wrong base model) or weights hold NaN/inf.
        """
        if model is None and (aligned is None or not target_modules):
            raise ValueError(
                "AlignmentSubspace.from_pretrained needs model= (the live LoRA model) or aligned= with "
                "target_modules= (post hoc)."
            )
        source = {"base": str(base), "aligned": str(aligned) if aligned is not None else "live model"}
        layers = dict(iter_lora_layers(model, resolve_adapter_name(model, adapter_name))) if model is not None else {}
        aligned_checkpoint = SafetensorsCheckpoint.open(aligned, revision) if aligned is not None else None
        try:
            if model is not None:
                specs = [ModuleSpec(name, bool(getattr(layer, "fan_in_fan_out", False))) for name, layer in layers.items()]
            else:
                specs = _specs_from_targets(aligned_checkpoint, target_modules, fan_in_fan_out)
            if modules is not None:
                wanted = set(modules)
                specs = [spec for spec in specs if spec.name in wanted]
            if not specs and modules is None:
                raise ValueError("The model has no LoRA layer: nothing to build an alignment subspace for.")
            if cache_file is not None and Path(cache_file).is_file():
                cached = cls.load(cache_file, device=device)
                if cached.source == source and set(cached.names) == {spec.name for spec in specs}:
                    logger.info("Alignment subspace loaded from cache %s", cache_file)
                    return cached
                logger.warning("Alignment cache %s is for other checkpoints or modules: rebuilding it.", cache_file)

            directions, frobenius, spectral = {}, {}, {}
            with SafetensorsCheckpoint.open(base, revision) as base_checkpoint:
                for spec in tqdm(specs, desc="SPLoRA alignment subspace", unit="module", disable=not progress):
                    if aligned_checkpoint is not None:
                        aligned_weight = aligned_checkpoint.module_weight(spec.name, spec.fan_in_fan_out)
                    else:
                        aligned_weight = base_weight(layers[spec.name])
                    base_weight_tensor = base_checkpoint.module_weight(spec.name, spec.fan_in_fan_out)
                    direction = _alignment_direction(spec.name, aligned_weight, base_weight_tensor, base)
                    frobenius[spec.name] = frobenius_norm(direction)
                    spectral[spec.name] = spectral_norm(direction) if frobenius[spec.name] > 0 else 0.0
                    directions[spec.name] = direction.to(device=device, dtype=dtype)
        finally:
            if aligned_checkpoint is not None:
                aligned_checkpoint.close()

        subspace = cls(directions, frobenius, spectral, source)
        without_signal = [name for name in subspace.names if not subspace.has_signal(name)]
        if without_signal:
            logger.warning(
                "%d module(s) are identical in base and aligned weights (V = 0) and cannot be judged: %s",
                len(without_signal),
                without_signal[:5],
            )
        if cache_file is not None:
            subspace.save(cache_file)
        return subspace

    def save(self, path: str | os.PathLike) -> None:
        """Write V and the norms to one safetensors file (atomically)."""
        metadata = {
            "format": CACHE_FORMAT,
            "source": json.dumps(self.source),
            "frobenius_norms": json.dumps(self.frobenius_norms),
            "spectral_norms": json.dumps(self.spectral_norms),
        }
        tensors = {name: direction.contiguous().cpu() for name, direction in self.directions.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> AlignmentSubspace:
        """Read a file written by :meth:`save`."""
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CACHE_FORMAT:
                raise ValueError(f"{path} is not an alignment cache written by splora_callback ({CACHE_FORMAT}).")
            directions = {name: handle.get_tensor(name) for name in handle.keys()}
        return cls(
            directions,
            json.loads(metadata["frobenius_norms"]),
            json.loads(metadata["spectral_norms"]),
            json.loads(metadata["source"]),
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


def _alignment_direction(
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
