"""The SPLoRA report: ``splora_report.json`` and the numbers logged per scoring call.

The JSON is the source of truth (config, per-layer score history, selection, action, versions);
the HTML dashboard and the W&B charts (``dashboard.py``) are views of it. Everything here is a pure
function of scores or of the report dict, except :func:`write_json_report` (an atomic file write).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections import defaultdict
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .scoring import LayerScores

REPORT_JSON = "splora_report.json"
REPORT_HTML = "splora_report.html"
REPORT_FORMAT = "splora-report-v1"
# E-DIEM is (d - median) / IQR: for a symmetric null, Tukey's upper fence Q3 + 1.5 IQR sits at
# median + 2 IQR, i.e. E-DIEM = 2. Used to count "layers over threshold" when no threshold is set.
DEFAULT_OVER_THRESHOLD = 2.0
PACKAGES = ("splora-callback", "torch", "transformers", "peft", "accelerate", "trl", "wandb", "matplotlib")
TABLE_COLUMNS = ["layer", "kind", "status", "ediem", "cosine", "signed_alignment", "relative_distance",
                 "update_norm", "probe", "utility", "rank", "kept_rank", "pruned"]


def library_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the scores and the report."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def over_threshold(config: dict[str, Any]) -> float:
    """The E-DIEM level the "layers over threshold" count uses: alert, then selection, then 2."""
    if config.get("alert_threshold") is not None:
        return float(config["alert_threshold"])
    # the config's flat fields hold exactly the rule's parameters: a threshold only for a threshold rule
    selects_on_ediem = config.get("threshold") is not None and config.get("metric") == "ediem"
    if selects_on_ediem and config.get("threshold") is not None:
        return float(config["threshold"])
    return DEFAULT_OVER_THRESHOLD


# --- numbers per scoring call -------------------------------------------------------------------


def _values(scores: LayerScores, field: str) -> list[float]:
    return [getattr(score, field) for score in scores if getattr(score, field) is not None]


def kind_means(scores: LayerScores) -> dict[str, dict[str, float]]:
    """Module kind -> mean E-DIEM and cosine of its active layers (spec 7: kinds matter)."""
    grouped: dict[str, list] = defaultdict(list)
    for score in scores:
        if score.ediem is not None:
            grouped[score.kind].append(score)
    return {kind: {"ediem": sum(s.ediem for s in group) / len(group),
                   "cosine": sum(s.cosine for s in group) / len(group)}
            for kind, group in sorted(grouped.items())}


def summary_scalars(scores: LayerScores, selected: Sequence[str] | None, threshold: float) -> dict[str, float]:
    """Scalars that summarise one scoring call (statistics of empty sets are left out, never NaN;
    ``selected`` None: a step without the probes' attributions, which selected nothing)."""
    ediem, cosine = _values(scores, "ediem"), _values(scores, "cosine")
    signed = _values(scores, "signed_alignment")
    summary: dict[str, float] = {
        "active_layers": sum(score.status == "active" for score in scores),
        "inactive_layers": sum(score.status == "inactive" for score in scores),
        "ediem_over_threshold": sum(value > threshold for value in ediem),
    }
    if selected is not None:
        summary["selected_layers"] = len(selected)
    for name, values in (("ediem", ediem), ("cosine", cosine), ("signed", signed)):
        if values:
            summary[f"{name}_max"] = max(values)
            summary[f"{name}_min"] = min(values)
            summary[f"{name}_mean"] = sum(values) / len(values)
    return summary


def wandb_step_payload(scores: LayerScores, step: int, selected: Sequence[str] | None, threshold: float,
                       seconds: float | None = None) -> dict[str, float]:
    """The ``wandb.log`` payload of one scoring call: keys under ``splora/`` plus the Trainer's step.

    ``splora/ediem/<layer>`` (and ``splora/probe/<layer>``) per active layer,
    ``splora/summary/<stat>``, ``splora/kind/<kind>/{ediem,cosine}_mean``, ``train/global_step``.
    """
    payload: dict[str, float] = {f"splora/ediem/{s.name}": s.ediem for s in scores if s.ediem is not None}
    payload.update({f"splora/probe/{s.name}": s.probe for s in scores if s.probe is not None})
    summary = summary_scalars(scores, selected, threshold)
    payload.update({f"splora/summary/{key}": value for key, value in summary.items()})
    if seconds is not None:
        payload["splora/summary/scoring_seconds"] = seconds
    for kind, means in kind_means(scores).items():
        payload[f"splora/kind/{kind}/ediem_mean"] = means["ediem"]
        payload[f"splora/kind/{kind}/cosine_mean"] = means["cosine"]
    payload["train/global_step"] = step
    return payload


# --- the report dict ----------------------------------------------------------------------------


def build_report(config: dict[str, Any], history: list[dict], *, selected: list[str], action: dict | None,
                 status: str, step: int, checkpoints: list[dict] | None = None,
                 alignment: dict | None = None) -> dict[str, Any]:
    """The JSON report. ``history`` items are ``{"step", "scores": LayerScores.to_dict(), ...}``."""
    return {
        "format": REPORT_FORMAT,
        "status": status,
        "step": step,
        "config": config,
        "over_threshold": over_threshold(config),
        "selected": list(selected),
        "action": action,
        "checkpoints": list(checkpoints or []),
        "alignment": alignment,
        "history": history,
        "versions": library_versions(),
    }


def finite_json(value: Any) -> Any:
    """``value`` with every NaN / infinite float replaced by None (strict JSON has no such number;
    the entry that held them says why: ``non_finite`` of a scoring step, ``skipped`` of an action)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def write_json_report(directory: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write ``splora_report.json`` into ``directory`` atomically (non-finite numbers as ``null``);
    return its path."""
    path = Path(directory) / REPORT_JSON
    atomic_write_text(path, json.dumps(finite_json(report), indent=1, allow_nan=False))
    return path


class ReportError(ValueError):
    """A report file is missing, not JSON, or lacks what the dashboard needs."""


# field -> (type, what it is): what the views read from a report
_REQUIRED = {"status": (str, "a string"), "step": (int, "an integer"), "config": (dict, "an object"),
             "selected": (list, "a list"), "history": (list, "a list"), "over_threshold": ((int, float), "a number")}


def report_path(path: str | os.PathLike) -> Path:
    """``splora_report.json`` in a folder, or the JSON file itself."""
    path = Path(path)
    return path / REPORT_JSON if path.is_dir() else path


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a report from its JSON file or from the directory holding it, checked field by field.

    Raises:
        FileNotFoundError: no report there.
        ReportError: not JSON, not a SPLoRA report, or a field missing / of the wrong type (named).
    """
    path = report_path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass the training output_dir holding {REPORT_JSON}, or that file."
        )
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ReportError(f"{path} is not a SPLoRA report (a JSON object with format {REPORT_FORMAT!r}).")
    for key, (kind, what) in _REQUIRED.items():
        if not isinstance(report.get(key), kind) or isinstance(report.get(key), bool):
            found = "missing" if key not in report else f"{type(report[key]).__name__} {report[key]!r:.40}"
            raise ReportError(f"{path}: field {key!r} must be {what}, found {found}; the report is damaged.")
    for index, entry in enumerate(report["history"]):
        layers = entry.get("scores", {}).get("layers") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or "step" not in entry or not isinstance(layers, list):
            raise ReportError(
                f"{path}: history[{index}] must be an object with 'step' and 'scores' {{'layers': [...]}}; "
                "the report is damaged."
            )
    return report


def final_scores(report: dict[str, Any]) -> LayerScores | None:
    """The last scoring call of the report (None when nothing was scored)."""
    return LayerScores.from_dict(report["history"][-1]["scores"]) if report["history"] else None


def pruned_layers(report: dict[str, Any]) -> list[str]:
    """Layers the action was applied to at the end ([] for ``none`` or when not applied)."""
    action = report.get("action")
    return list(action["layers"]) if action and action["action"] != "none" else []


def table_rows(scores: LayerScores, pruned: list[str], kept_rank: dict[str, int] | None = None) -> list[list[Any]]:
    """Rows of the final score table, columns :data:`TABLE_COLUMNS`.

    ``kept_rank``: module -> rank left by a component action (the action report's); without it a
    pruned layer keeps rank 0 and the others their rank. ``pruned``: acted on, wholly or in part.
    """
    marked, kept = set(pruned), kept_rank or {}
    return [[s.name, s.kind, s.status, s.ediem, s.cosine, s.signed_alignment, s.relative_distance,
             s.update_norm, s.probe, s.utility, s.rank,
             kept.get(s.name, 0 if s.name in marked and not kept else s.rank), s.name in marked] for s in scores]


def kept_ranks(report: dict[str, Any]) -> dict[str, int] | None:
    """Module -> rank left, from a component action of the report (None for layer actions)."""
    action = report.get("action") or {}
    return action.get("kept_rank") or None


# --- W&B run summary ---------------------------------------------------------------------------


def wandb_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Run-summary entries: what was selected and pruned at the end."""
    action = report.get("action") or {}
    return {
        "splora/pruned_layers": pruned_layers(report),
        "splora/selected_layers": list(report["selected"]),
        "splora/action": action.get("action", "not applied"),
        "splora/num_pruned": len(pruned_layers(report)),
        "splora/parameters_removed": action.get("parameters_removed", 0),
    }
