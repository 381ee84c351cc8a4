"""The drift dashboard: figures of a SPLoRA report, its offline HTML page and its W&B media.

Views of ``splora_report.json`` (``report.py``): a layer x step E-DIEM heatmap, the final per-layer
bar chart, per-kind means and the summary lines, as matplotlib figures (no pyplot, no global state);
``splora_report.html`` embeds them as PNG data (no external URL); :func:`wandb_final_media` takes
the ``wandb`` module as an argument, so this module never imports wandb.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .headline import acted_on, acted_words, headline, patch_words, safety_figure, safety_summary, verdict
from .report import (
    REPORT_HTML,
    TABLE_COLUMNS,
    final_scores,
    kept_ranks,
    kind_means,
    load_report,
    pruned_layers,
    report_path,
    summary_scalars,
    table_rows,
)
from .scoring import LayerScores

# --- figures (matplotlib Figure objects: no pyplot, no global state) ---------------------------


def short_names(names: list[str]) -> list[str]:
    """Layer names without their common dotted prefix (``model.layers.``)."""
    if len(names) < 2:
        return list(names)
    parts = [name.split(".") for name in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _score_matrix(report: dict[str, Any]) -> tuple[list[str], list[int], list[list[float]]]:
    """Layers (module order), steps, E-DIEM[layer][step] with NaN where a layer had no score."""
    names: dict[str, None] = {}
    for entry in report["history"]:
        names.update({item["name"]: None for item in entry["scores"]["layers"]})
    steps = [entry["step"] for entry in report["history"]]
    columns = [{item["name"]: item["ediem"] for item in entry["scores"]["layers"]}
               for entry in report["history"]]
    matrix = [[math.nan if column.get(name) is None else column[name] for column in columns]
              for name in names]
    return list(names), steps, matrix


def heatmap_figure(report: dict[str, Any]):
    """E-DIEM, layer (rows) by scoring step (columns); grey = inactive or not judgeable."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    names, steps, matrix = _score_matrix(report)
    values = np.ma.masked_invalid(np.array(matrix, dtype=float).reshape(len(names), len(steps)))
    limit = float(np.nanmax(np.abs(values.filled(np.nan)))) if values.count() else 1.0
    size = (min(max(7, 4 + 0.35 * len(steps)), 16), min(2 + 0.18 * len(names), 30))  # inches; 7B q/k/v/o: 128 rows
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.add_subplot()
    limit = max(limit, 1e-9)  # an all-zero history still needs vmin < 0 < vmax
    image = axes.imshow(values, aspect="auto", interpolation="nearest", norm=TwoSlopeNorm(0.0, -limit, limit),
                        cmap=colormaps["RdBu_r"].with_extremes(bad="#d9d9d9"))
    pruned = set(pruned_layers(report))
    labels = [f"{short} [pruned]" if name in pruned else short
              for name, short in zip(names, short_names(names), strict=True)]
    axes.set_yticks(range(len(names)), labels, fontsize=max(4, 9 - len(names) // 32))
    for label, name in zip(axes.get_yticklabels(), names, strict=True):
        label.set_color("#d62728" if name in pruned else "black")
    ticks = range(0, len(steps), max(1, len(steps) // 12))
    axes.set_xticks(list(ticks), [str(steps[i]) for i in ticks])
    axes.set_xlabel("training step")
    axes.set_title("E-DIEM per layer and step\n(red: drifts from alignment more than its peers)", fontsize=10)
    figure.colorbar(image, ax=axes, label="E-DIEM (IQR units from the median)")
    return figure


SCORE_LABELS = {"ediem": "E-DIEM", "cosine": "Safe LoRA cosine", "probe": "safety-probe attribution",
                "signed": "signed alignment", "signed_alignment": "signed alignment"}


def chosen_by(report: dict[str, Any]) -> str:
    """The per-layer score the selection used (the config's ``metric``), where the scores have it; else E-DIEM."""
    metric = (report.get("config") or {}).get("metric")
    field = {"signed": "signed_alignment"}.get(metric, metric)
    scores = final_scores(report)
    if field in SCORE_LABELS and scores and any(isinstance(getattr(score, field, None), (int, float)) for score in scores):
        return field
    return "ediem"


def final_bar_figure(report: dict[str, Any]):
    """Final per-layer score of the selection's metric (E-DIEM unless the rule chose by another
    score), acted-on layers in red and hatched; the over-threshold line for E-DIEM."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    scores, pruned = final_scores(report), set(pruned_layers(report))
    field = chosen_by(report)
    label = SCORE_LABELS[field]
    names = [score.name for score in scores] if scores else []
    values = [getattr(score, field) if getattr(score, field) is not None else 0.0 for score in scores] if scores else []
    figure = Figure(figsize=(8, min(1.5 + 0.2 * len(names), 30)), layout="constrained")
    axes = figure.add_subplot()
    colors = ["#d62728" if name in pruned else "#4c72b0" for name in names]
    bars = axes.barh(range(len(names)), values, color=colors)
    for bar, name, score in zip(bars, names, scores or [], strict=True):
        if name in pruned:
            bar.set_hatch("//")
        if getattr(score, field) is None:
            axes.text(0, bar.get_y() + bar.get_height() / 2, f" {score.status}", va="center", fontsize=7,
                      color="grey")
    axes.set_yticks(range(len(names)), short_names(names), fontsize=max(4, 9 - len(names) // 32))
    axes.invert_yaxis()
    if field == "ediem":
        axes.axvline(report["over_threshold"], color="black", linestyle="--", linewidth=0.8)
    axes.set_xlabel(f"{label} at the last scoring step")
    acted = acted_on(report)
    if acted is None:
        done, marked = "", "acted on"
    elif acted["unit"] == "components":
        done = f" ({acted['count']} rank-one components removed from {len(pruned)} layers)"
        marked = "rank-one components removed"
    else:
        marked = {"prune": "pruned", "project": "projected"}.get(acted["action"], "acted on")
        done = f" ({len(pruned)} {marked})"
    axes.set_title(f"Final {label} per layer{done}", fontsize=10)
    axes.legend(handles=[Patch(color="#d62728", hatch="//", label=marked),
                         Patch(color="#4c72b0", label="kept")], loc="lower right", fontsize=7)
    return figure


def kind_figure(report: dict[str, Any]):
    """Per module kind: mean E-DIEM over steps, and how many of its layers the action hit."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [entry["step"] for entry in report["history"]]
    series: dict[str, list[float]] = defaultdict(list)
    for entry in report["history"]:
        means = kind_means(LayerScores.from_dict(entry["scores"]))
        for kind in {item["kind"] for item in entry["scores"]["layers"]}:
            series[kind].append(means[kind]["ediem"] if kind in means else math.nan)
    figure = Figure(figsize=(10, 3.5), layout="constrained")
    lines, bars = figure.subplots(1, 2)
    for kind, values in sorted(series.items()):
        lines.plot(steps[-len(values):], values, marker="o", markersize=3, label=kind)
    lines.set(xlabel="training step", ylabel="mean E-DIEM", title="Mean E-DIEM per module kind")
    if series:
        lines.legend(fontsize=7)
    scores, pruned = final_scores(report), set(pruned_layers(report))
    kinds = sorted({score.kind for score in scores}) if scores else []
    totals = [sum(score.kind == kind for score in scores) for kind in kinds]
    hit = [sum(score.kind == kind and score.name in pruned for score in scores) for kind in kinds]
    bars.bar(kinds, totals, color="#c7d3e8", label="layers")
    components = (acted_on(report) or {}).get("unit") == "components"
    bars.bar(kinds, hit, color="#d62728", label="components removed" if components else "pruned / acted on")
    bars.set(title="Layers with components removed, per kind" if components else "Layers acted on per module kind",
             ylabel="layers")
    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    bars.legend(fontsize=7)
    return figure


def summary_figure(report: dict[str, Any]):
    """E-DIEM max/mean and layers over threshold; cosine and signed alignment min/mean; over steps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    threshold = report["over_threshold"]
    rows = []
    for entry in report["history"]:
        scores = LayerScores.from_dict(entry["scores"])
        rows.append((entry["step"], summary_scalars(scores, entry.get("selected", []), threshold)))
    figure = Figure(figsize=(12, 3.2), layout="constrained")
    panels = figure.subplots(1, 3)
    plots = [("E-DIEM", ["ediem_max", "ediem_mean"]),
             ("cosine / signed alignment", ["cosine_min", "cosine_mean", "signed_min", "signed_mean"]),
             ("layers", ["ediem_over_threshold", "selected_layers"])]
    for axes, (title, keys) in zip(panels, plots, strict=True):
        for key in keys:
            points = [(step, row[key]) for step, row in rows if key in row]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
        axes.set(title=title, xlabel="training step")
        if axes.lines:
            axes.legend(fontsize=7)
    panels[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


FIGURES = {"heatmap": heatmap_figure, "final_bar": final_bar_figure, "kinds": kind_figure,
           "summary": summary_figure}


def figure_png(figure) -> bytes:
    """PNG bytes of a matplotlib figure (Agg canvas, 110 dpi)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


# --- HTML ---------------------------------------------------------------------------------------

_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}img{max-width:100%;border:1px solid #ddd}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}td:first-child{text-align:left}tr.pruned{background:#fde0e0}"
        "code{background:#f4f4f4}")
_CAPTIONS = {
    "safety": "The safety signal: the safety probe's refusal loss at every scoring step (higher = the model refuses "
              "less readily), against the aligned model's (adapter disabled, dashed){alert}; "
              "{star}the refusal rate of greedy generations on held-out prompts on the right axis when measured. "
              "The verdict above the figures says what to do.",
    "heatmap": "E-DIEM per layer and scoring step. Red: the update strays from the alignment subspace more "
               "than its peers; blue: less; grey: inactive (LoRA B still zero) or not judgeable (V = 0).",
    "final_bar": "{score} at the last scoring step: the score the selection used. Red hatched bars: layers the "
                 "action was applied to{threshold}",
    "kinds": "Module kinds: mean E-DIEM over training, and how many layers of each kind were acted on. "
             "Which kinds are acted on can matter more than which layers: on this project's demo a random "
             "choice of the same module kinds restored as much as E-DIEM's choice.",
    "summary": "Summary series: E-DIEM max/mean, Safe LoRA cosine and signed alignment min/mean (negative: "
               "against alignment), layers over threshold and the current selection size.",
}


def caption(key: str, report: dict[str, Any]) -> str:
    """A figure's caption, naming only what that figure draws (the alert line, the star, the threshold)."""
    summary = safety_summary(report)
    field = chosen_by(report)
    return _CAPTIONS[key].format(
        alert=" and the alert level (dotted)" if summary["loss_level"] is not None else "",
        star=("the star is the value after the end-of-training action; "
              if summary["after_action"].get("refusal_loss") is not None else ""),
        score=SCORE_LABELS[field],
        threshold="; dashed line: the over-threshold level." if field == "ediem" else ".")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _acted_sentence(report: dict[str, Any], pruned: list[str]) -> str:
    """What the action changed, in words (escaped): the patch's steps, or the layers acted on."""
    patched = patch_words(report)
    if patched is not None:
        return html.escape(patched[:1].upper() + patched[1:]) + "; no LoRA layer or component removed."
    words = acted_words(report)
    return ((f"{html.escape(words[:1].upper() + words[1:])}: " if pruned and words else "Nothing changed: ")
            + f"{_cell(', '.join(pruned) or 'no layer acted on')}.")


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page (figures as base64 PNG, no external URL) of a report dict."""
    config, scores = report["config"], final_scores(report)
    pruned = pruned_layers(report)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>SPLoRA report</title>"
             f"<style>{_CSS}</style></head><body><h1>SPLoRA report</h1>",
             f"<p>Status <b>{_cell(report['status'])}</b> at step {_cell(report['step'])}; metric "
             f"<code>{_cell(config.get('metric'))}</code>, selection "
             f"<code>{_cell(config.get('select'))}</code>, "
             f"action <code>{_cell(config.get('action'))}</code>. "
             + _acted_sentence(report, pruned) + "</p>",
             f"<div id='headline' style='border-left:4px solid #d62728;padding:0.3em 1em;background:#fafafa'>"
             f"<p><b>Safety signal.</b> {html.escape(headline(report))}</p>"
             f"<p>{html.escape(verdict(report))}</p></div>"]
    if scores is None:
        parts.append("<p>No scoring call was recorded.</p>")
    else:
        # the direct safety signal first, when there is one (without, the headline says how to get it)
        lead = {"safety": safety_figure} if safety_summary(report)["has_signal"] else {}
        for key, function in {**lead, **FIGURES}.items():
            png = base64.b64encode(figure_png(function(report))).decode()
            parts.append(f"<figure id='{key}'><img alt='{key}' src='data:image/png;base64,{png}'>"
                         f"<figcaption>{html.escape(caption(key, report))}</figcaption></figure>")
        header = "".join(f"<th>{html.escape(column)}</th>" for column in TABLE_COLUMNS)
        rows = "".join(f"<tr class='{'pruned' if row[-1] else ''}'>"
                       + "".join(f"<td>{_cell(value)}</td>" for value in row) + "</tr>"
                       for row in table_rows(scores, pruned, kept_ranks(report)))
        parts.append(f"<h2>Final scores (step {_cell(report['history'][-1]['step'])})</h2><table id='scores'>"
                     f"<tr>{header}</tr>{rows}</table>")
    details = {"config": config, "action": report.get("action"), "safety": report.get("safety"),
               "memory": report.get("memory"), "repair": report.get("repair"),
               "checkpoints": report.get("checkpoints"),
               "alignment": report.get("alignment"), "versions": report.get("versions")}
    parts.append(f"<h2>Details</h2><pre>{html.escape(json.dumps(details, indent=1))}</pre></body></html>")
    return "\n".join(parts)


def write_html_report(output_dir: str | os.PathLike) -> Path:
    """Regenerate ``splora_report.html`` from ``output_dir/splora_report.json`` (or from that JSON
    file: the page goes next to it); return its path.

    Raises:
        FileNotFoundError, ReportError: see :func:`~splora_callback.report.load_report`.
    """
    source = report_path(output_dir)
    report = load_report(source)
    path = source.parent / REPORT_HTML
    atomic_write_text(path, render_html(report))
    return path


# --- W&B end-of-training media (the wandb module is passed in, never imported here) --------------


def wandb_final_media(wandb: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Tables, native bar charts and the heatmap image logged once at the end of training."""
    from PIL import Image

    scores, pruned = final_scores(report), pruned_layers(report)
    table = wandb.Table(columns=TABLE_COLUMNS, data=table_rows(scores, pruned, kept_ranks(report)))
    marked = set(pruned)
    bars = wandb.Table(columns=["layer", "ediem"], data=[
        [f"[pruned] {s.name}" if s.name in marked else s.name, s.ediem]
        for s in scores if s.ediem is not None])
    kinds = wandb.Table(columns=["kind", "mean_ediem"],
                        data=[[kind, means["ediem"]] for kind, means in kind_means(scores).items()])
    history = wandb.Table(columns=["step", "layer", "kind", "ediem", "cosine"], data=[
        [entry["step"], item["name"], item["kind"], item["ediem"], item["cosine"]]
        for entry in report["history"] for item in entry["scores"]["layers"] if item["ediem"] is not None])
    heatmap = Image.open(io.BytesIO(figure_png(heatmap_figure(report))))
    return {
        "splora/final/scores": table,
        "splora/final/ediem_by_layer": wandb.plot.bar(bars, "layer", "ediem", title="Final E-DIEM per layer"),
        "splora/final/ediem_by_kind": wandb.plot.bar(kinds, "kind", "mean_ediem",
                                                     title="Final mean E-DIEM per kind"),
        "splora/ediem_history": history,
        "splora/ediem_heatmap": wandb.Image(heatmap, caption="E-DIEM, layer x step"),
    }
