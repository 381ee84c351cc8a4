"""What a command-line result was computed from: the adapter, base and aligned model, by path and hash.

``splora score --json`` writes a versioned document (:data:`SCORES_FORMAT`) whose ``provenance``
names the adapter, base and aligned checkpoints as given and as resolved, with the files read and
their SHA-256: the adapter's files always, a checkpoint's files when they are at most
:data:`HASH_LIMIT` bytes or sit in the Hugging Face cache (whose blob names are their SHA-256). A
larger local shard gets its size, mtime and the SHA-256 of its safetensors header (tensor names,
dtypes, shapes, offsets) instead of hashing gigabytes on every call.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shlex
import struct
from pathlib import Path
from typing import Any

SCORES_FORMAT = "splora-scores-v1"
HASH_LIMIT = 256 * 1024**2
_BLOB = re.compile(r"^[0-9a-f]{64}$")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def header_sha256(path: Path) -> str | None:
    """SHA-256 of a safetensors file's header (8-byte length + JSON), or None if it is not one."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return None
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 1024**2:
            return None
        return hashlib.sha256(prefix + handle.read(length)).hexdigest()


def file_entry(path: Path, root: Path) -> dict[str, Any]:
    """``{"name", "bytes", "sha256"}`` of one file (see the module docstring for large shards)."""
    info = path.stat()
    entry: dict[str, Any] = {"name": str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
                             "bytes": info.st_size}
    target = Path(os.path.realpath(path))
    if path.is_symlink() and target.parent.name == "blobs" and _BLOB.match(target.name):
        entry["sha256"] = target.name  # the Hub cache stores LFS files under their SHA-256
    elif info.st_size <= HASH_LIMIT:
        entry["sha256"] = sha256_of(path)
    else:
        entry.update({"sha256": None, "mtime_ns": info.st_mtime_ns, "header_sha256": header_sha256(path),
                      "note": f"over {HASH_LIMIT >> 20} MiB: not hashed here (sha256sum it if you need to)"})
    return entry


def adapter_provenance(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    root = Path(adapter_dir)
    files = [root / name for name in ("adapter_config.json", "adapter_model.safetensors") if (root / name).is_file()]
    return {"path": str(root.resolve()), "files": [file_entry(path, root) for path in files]}


def checkpoint_provenance(name_or_path: str | None, revision: str | None = None) -> dict[str, Any] | None:
    """The checkpoint as given, where it was read from, and its files (index, shards, config.json)."""
    if name_or_path is None:
        return None
    from .checkpoint import SafetensorsCheckpoint

    checkpoint = SafetensorsCheckpoint.open(name_or_path, revision)
    files = list(checkpoint.files())
    if (checkpoint.path / "config.json").is_file():
        files.append(checkpoint.path / "config.json")
    return {"given": str(name_or_path), "path": str(checkpoint.path.resolve()), "revision": revision,
            "files": [file_entry(path, checkpoint.path) for path in files]}


def scores_document(scores: Any, selected: list[str], args: Any, aligned_source: str, version: str) -> dict:
    """The ``splora score --json`` document: format, provenance, then the scores and selection."""
    return {
        "format": SCORES_FORMAT,
        "provenance": {
            "splora_callback": version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["splora", *map(str, getattr(args, "argv", []))]),
            "adapter": adapter_provenance(args.adapter_dir),
            "base": checkpoint_provenance(args.base, args.revision),
            "aligned": checkpoint_provenance(args.aligned, args.revision),
            "aligned_source": aligned_source,
            "options": {"metric": args.metric, "null": args.null, "seed": args.seed, "top_k": args.top_k,
                        "fraction": args.fraction, "threshold": args.threshold},
        },
        **scores.to_dict(),
        "selected": selected,
    }


def dumps(document: dict) -> str:
    return json.dumps(document, indent=2, allow_nan=False)


# --- the table's order ----------------------------------------------------------------------------

# key -> (score field, descending): how --sort orders the table (unscored layers last, in module order)
SORTS = {"module": None, "name": None, "suspicion": None, "ediem": ("ediem", True), "cosine": ("cosine", False),
         "signed": ("signed_alignment", False), "distance": ("relative_distance", True)}


def sorted_scores(scores: Any, key: str) -> list[Any]:
    """The layers of ``scores`` in ``--sort`` order: module (as scored), name, suspicion (most suspect
    first under the metric), or one score, most suspect first (E-DIEM and distance high, cosine and
    signed low)."""
    layers = list(scores)
    if key == "module":
        return layers
    if key == "name":
        return sorted(layers, key=lambda score: score.name)
    if key == "suspicion":
        suspicion = scores.suspicion()
        return sorted(layers, key=lambda s: (s.name not in suspicion, -suspicion.get(s.name, 0.0)))
    field, descending = SORTS[key]
    sign = -1.0 if descending else 1.0
    return sorted(layers, key=lambda s: (getattr(s, field) is None, sign * (getattr(s, field) or 0.0)))
