"""Read back what an offline W&B run really logged (``wandb/offline-run-*/run-*.wandb``).

wandb 0.31 ships no Python reader for its transaction log, so tests parse it (HF_NOTES): a 7-byte
file header (``:W&B``, 2-byte magic, 1-byte version), then 32 KiB blocks of records, each with a
7-byte header (crc32 seeded with the type byte, little-endian u16 length, u8 type: 1 full,
2 first, 3 middle, 4 last) and a ``wandb_internal_pb2.Record`` protobuf as payload. A record
header never straddles a block: fewer than 7 bytes left in a block are zero padding.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """History rows (one dict per ``wandb.log`` call), the final summary, alerts, run records."""

    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, str]] = field(default_factory=list)
    runs: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def read_records(path: str | Path) -> list[bytes]:
    """The protobuf payloads of a ``.wandb`` file, reassembled across blocks, crc-checked."""
    data = Path(path).read_bytes()
    ident, _magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or version != 0:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:HEADER]!r}).")
    records, pending, index = [], b"", HEADER
    while index + HEADER <= len(data):
        left = BLOCK - index % BLOCK
        if left < HEADER:  # zero padding at the end of a block
            index += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[index : index + HEADER])
        if length == 0 and kind == 0:  # trailing zeros of a block that is still open
            break
        payload = data[index + HEADER : index + HEADER + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: crc mismatch at byte {index}.")
        index += HEADER + length
        if kind == FULL:
            records.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            records.append(pending + payload)
            pending = b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {index}.")
    return records


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _history_value(item) -> Any:
    which = item.WhichOneof("value")
    if which is None or which == "none":
        return json.loads(item.value_json) if item.value_json else None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse the single ``run-*.wandb`` file of an offline run directory."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun()
    for payload in read_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(item): _history_value(item) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "alert":
            run.alerts.append(
                {"title": record.alert.title, "text": record.alert.text, "level": record.alert.level}
            )
        elif kind == "run":
            run.runs += 1
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
    return run


def offline_run_dirs(wandb_dir: str | Path) -> list[Path]:
    """``offline-run-*`` directories under ``WANDB_DIR`` (W&B adds a ``wandb/`` level)."""
    return sorted(Path(wandb_dir).glob("**/offline-run-*"))


def logged_table(run_dir: str | Path, summary: dict[str, Any], key: str) -> dict[str, Any]:
    """The ``{"columns", "data"}`` of a table (or chart table) logged under ``key``, read from the
    file its summary entry points to (``files/media/table/...``)."""
    return json.loads((Path(run_dir) / "files" / summary[f"{key}/path"]).read_text())
