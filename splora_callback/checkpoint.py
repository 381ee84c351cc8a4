"""Stream single weights from a safetensors checkpoint (local directory or Hub id), one at a time.

Reading ``W_base`` dominates the cost of SPLoRA on a 7B model (about 13 GB in bf16), so no model is
ever loaded: a tensor is read from its shard by name when it is needed and dropped after use.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open

from ._io import describe_os_error

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be found or read, or does not hold the weight asked for."""


def check_readable(path: Path, what: str, error: type[Exception] = CheckpointError) -> None:
    """Fail in words when ``path`` is missing or unreadable, before a reader says less.

    ``Path.is_file`` says False, and safetensors' Rust reader "No such file or directory", for a
    file the process may not read; opening it here names the file and the reason.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        error: ``path`` exists but cannot be opened for reading (permissions, a folder, ...).
    """
    try:
        path.stat()
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found.") from None
    except OSError as exc:
        raise error(f"{what} cannot be read: {describe_os_error(exc)}") from exc


def _corrupt(file: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{file} is not a readable safetensors file ({error}): it is truncated or corrupt. Download "
        "or save the checkpoint again (model.save_pretrained(path))."
    )


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding ``*.safetensors`` for ``name_or_path``.

    A local directory is used as it is. Anything else is treated as a Hub id and resolved with
    ``huggingface_hub.snapshot_download`` (the index and the shards it lists only: no ``.bin``, no
    consolidated duplicate, no tokenizer; ``base_models.hub_allow_patterns``). Offline (``HF_HUB_OFFLINE=1``) or without network this fails at once with a message.

    Raises:
        CheckpointError: not a local directory and not resolvable on the Hub.
    """
    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir():
            os.listdir(path)  # a folder we may not list would look empty below
            return path
        if path.suffix == ".safetensors" and path.is_file():
            return path
    except OSError as error:
        raise CheckpointError(f"Checkpoint {str(name_or_path)!r} cannot be read: {describe_os_error(error)}") from error
    text = str(name_or_path)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1:  # a path, not an "org/name" Hub id
        raise CheckpointError(f"Checkpoint directory {str(name_or_path)!r} does not exist.")
    from huggingface_hub import snapshot_download

    from .base_models import hub_allow_patterns

    try:
        return Path(
            snapshot_download(
                str(name_or_path),
                revision=revision,
                allow_patterns=[*hub_allow_patterns(str(name_or_path), revision), "config.json"],
            )
        )
    except Exception as error:  # network, auth, offline mode, missing repo: one actionable message
        raise CheckpointError(
            f"Could not resolve {str(name_or_path)!r}: it is not a local directory and the Hugging Face "
            f"Hub did not provide it ({type(error).__name__}: {error}). Pass a local directory written "
            "by save_pretrained (safetensors), or run where the Hub is reachable and you are logged in."
        ) from error


class SafetensorsCheckpoint:
    """Read weights tensor by tensor from a (possibly sharded) safetensors checkpoint.

    Each :meth:`read` maps its shard for that read only, so nothing needs closing; the context
    manager and :meth:`close` remain for callers that scope a checkpoint.
    """

    def __init__(self, path: Path, weight_map: dict[str, str]) -> None:
        self.path = path
        self.weight_map = weight_map

    @classmethod
    def open(cls, name_or_path: str | os.PathLike, revision: str | None = None) -> SafetensorsCheckpoint:
        """Open the checkpoint's index (or its single file); no tensor is read yet."""
        path = resolve_checkpoint(name_or_path, revision)
        if path.is_file():
            return cls(path.parent, cls._keys_of(path, path.name))
        index = path / INDEX_FILE
        if index.is_file():
            return cls(path, _read_index(index))
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"{path} holds no *.safetensors file. Save the model with "
                "model.save_pretrained(path) (safetensors is the default) and point to that directory."
            )
        weight_map: dict[str, str] = {}
        for shard in shards:
            keys = cls._keys_of(shard, shard.name)
            clash = next((key for key in keys if key in weight_map), None)
            if clash is not None:  # which file would win is an accident of sorting: refuse
                raise CheckpointError(
                    f"{path / weight_map[clash]} and {shard} both hold {clash!r} (and there is no {INDEX_FILE} "
                    "to say which shard is the model's): one is a stray copy that would silently replace the "
                    "other's weights. Move the stray file out of the folder, or add the index that "
                    "save_pretrained writes."
                )
            weight_map.update(keys)
        return cls(path, weight_map)

    @staticmethod
    def _keys_of(file: Path, shard_name: str) -> dict[str, str]:
        check_readable(file, "Checkpoint shard")
        try:
            with safe_open(str(file), framework="pt") as handle:
                return dict.fromkeys(handle.keys(), shard_name)
        except SafetensorError as error:
            raise _corrupt(file, error) from error

    def files(self) -> list[Path]:
        """The shard files the weights are read from (and the index, when there is one)."""
        names = sorted(set(self.weight_map.values()))
        index = self.path / INDEX_FILE
        return [self.path / name for name in names] + ([index] if index.is_file() else [])

    def fingerprint(self) -> list[list]:
        """``[name, size, mtime_ns]`` of each file in :meth:`files`: changes when a file is rewritten."""
        stats = []
        for file in self.files():
            info = file.stat()
            stats.append([file.name, info.st_size, info.st_mtime_ns])
        return stats

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: no shard stays mapped between reads."""

    def weight_key(self, module_name: str) -> str:
        """The checkpoint key of ``module_name``'s weight.

        Exact ``<module_name>.weight`` first; else the one key that differs only by a leading
        model prefix (``transformer.h.0.attn.c_attn`` vs ``h.0.attn.c_attn``).

        Raises:
            CheckpointError: no key, or several, match: the checkpoint is not this model's.
        """
        exact = f"{module_name}.weight"
        if exact in self.weight_map:
            return exact
        candidates = [
            key
            for key in self.weight_map
            if key.endswith(".weight")
            and (
                module_name.endswith("." + key[: -len(".weight")])
                or key[: -len(".weight")].endswith("." + module_name)
            )
        ]
        if len(candidates) == 1:
            return candidates[0]
        raise CheckpointError(
            f"The checkpoint at {self.path} has no tensor for module {module_name!r} (looked for "
            f"{exact!r}). Is it the checkpoint of the same architecture as the LoRA model?"
        )

    def read(self, key: str) -> torch.Tensor:
        """One tensor, as stored (dtype and orientation of the checkpoint).

        No handle is kept: the shard stays mapped only while the returned tensor lives (safetensors
        returns tensors backed by the mapped file), so a caller that copies what it needs and drops
        the tensor keeps pages read earlier out of its RSS (a handle kept open would hold every page
        read so far; measured in benchmarks/RESULTS.md). Opening costs a header parse.
        """
        file = self.path / self.weight_map[key]
        check_readable(file, f"Checkpoint shard of {key!r}")
        try:
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(key)
        except SafetensorError as error:
            raise _corrupt(file, error) from error

    def module_rows(self, module_name: str, rows: int, fan_in_fan_out: bool = False) -> torch.Tensor:
        """The first ``rows`` rows of the (m, n) weight, reading only those bytes of the shard."""
        key = self.weight_key(module_name)
        file = self.path / self.weight_map[key]
        check_readable(file, f"Checkpoint shard of {key!r}")
        try:
            with safe_open(str(file), framework="pt") as handle:
                part = handle.get_slice(key)
                return part[:, :rows].T.clone() if fan_in_fan_out else part[:rows].clone()
        except SafetensorError as error:
            raise _corrupt(file, error) from error

    def module_weight(self, module_name: str, fan_in_fan_out: bool = False) -> torch.Tensor:
        """The (m, n) weight of a linear module (``Conv1D``'s (n, m) storage transposed)."""
        weight = self.read(self.weight_key(module_name))
        return weight.T if fan_in_fan_out else weight

    def module_names(self, kinds: list[str]) -> list[str]:
        """Module names whose last component is one of ``kinds`` (``["q_proj", "v_proj"]``)."""
        names = []
        for key in self.weight_map:
            if key.endswith(".weight"):
                module = key[: -len(".weight")]
                if module.rsplit(".", 1)[-1] in kinds:
                    names.append(module)
        return names


def _read_index(index: Path) -> dict[str, str]:
    """``weight_map`` of a ``model.safetensors.index.json``, checked, naming the file on any problem."""
    check_readable(index, "Shard index")
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{index} is not valid JSON ({error}); save the checkpoint again.") from error
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index} has no 'weight_map' object (tensor name -> shard file): it is not a safetensors "
            "shard index. Save the checkpoint again, or remove the index if the folder holds one shard."
        )
    for key, shard in weight_map.items():
        check_shard_name(index, key, shard)
    return dict(weight_map)


def check_shard_name(index: Path, key: str, shard: str) -> None:
    """A shard named by an index must be a file inside the model folder: a relative path without ``..``.

    Raises:
        CheckpointError: an absolute path or one that leaves the folder (``../x``, ``/etc/passwd``),
            which would make ``--json`` hash (and the reader open) a file outside the checkpoint.
    """
    name = PurePosixPath(shard.replace("\\", "/"))
    if not shard or name.is_absolute() or ".." in name.parts or PureWindowsPath(shard).drive:
        raise CheckpointError(
            f"{index}: weight_map[{key!r}] names the shard {shard!r}, which is not a file inside "
            f"{index.parent}; a shard index may only name files of its own folder. Save the checkpoint "
            "again, or fix the index."
        )
