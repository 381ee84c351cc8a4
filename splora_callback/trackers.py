"""Where SPLoRA's series go, as ``TrainingArguments.report_to`` says: W&B, TensorBoard, the console.

- **W&B** (``"wandb"``): into the run ``WandbCallback`` opened (``wandb.run``), on the Trainer's
  ``train/global_step``, never a second run (HF_NOTES); the SPLoRA settings in the run's config
  (``splora/<field>``). Per scoring call: the safety signal (``splora/safety/*``), the summary,
  per-kind means and per-layer E-DIEM / probe scalars for at most :data:`WANDB_LAYER_SERIES` layers
  (a 7B q/k/v/o adapter has 128). All layers go in one chart per module kind at the end
  (``splora/ediem/<kind>``, ``wandb.plot.line_series``) and in the tables.
- **TensorBoard** (``"tensorboard"``): a ``SummaryWriter`` of our own in the Trainer's TensorBoard
  folder (``logging_dir``; TensorBoard reads several event files in one folder), the same scalars,
  per-layer tags included, grouped per module kind by a custom-scalars layout.
- every other ``report_to`` backend gets no SPLoRA series (a user callback cannot reach them,
  HF_NOTES): one warning names them; the JSON/HTML report is the backend-neutral record.
- **console**: logs go through ``transformers.utils.logging`` loggers whose level follows
  ``TrainingArguments(log_level=..., log_level_replica=...)`` (:func:`configure_logging`), and one
  line at the end says what was acted on and where the report and adapters are.
"""

from __future__ import annotations

import io
import logging as std_logging
import os
import re
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .dashboard import figure_png, heatmap_figure, short_names, wandb_final_media
from .headline import STOP_REASONS, headline, safety_summary, verdict
from .report import over_threshold, wandb_step_payload, wandb_summary
from .scoring import LayerScores

logger = logging.get_logger(__name__)

LIBRARY_LOGGER = "splora_callback"
CONSOLE_LOGGER = "splora_callback.console"
SERIES_BACKENDS = ("wandb", "tensorboard")
NO_SERIES_EXPECTED = ("codecarbon",)  # measures emissions; not a dashboard
# keys of one layer's series in a step payload: all to TensorBoard; to W&B for at most WANDB_LAYER_SERIES
# layers (one panel each: a 7B q/k/v/o adapter has 128 layers; the end-of-training charts have them all)
PER_LAYER = re.compile(r"^splora/(ediem|probe)/")
WANDB_LAYER_SERIES = 32


# --- the console ----------------------------------------------------------------------------------


def configure_logging(args: Any) -> None:
    """Make ``log_level`` (``log_level_replica`` on other processes) the level of this library's
    loggers, as the Trainer does for transformers'; the end-of-training line (logger
    :data:`CONSOLE_LOGGER`) shows unless that level is ``error`` or ``critical``.

    ``"passive"`` (the default) follows transformers' verbosity when it was changed
    (``transformers.logging.set_verbosity_info()``), else leaves the level to the application's
    logging configuration, as before. With no handler anywhere (a plain script), one stderr handler
    is added, as transformers adds its own; with a root handler (``logging.basicConfig``, pytest)
    records propagate to it.
    """
    from transformers.utils import logging as hf_logging

    level = args.get_process_log_level()
    chosen = args.log_level if getattr(args, "should_log", True) else args.log_level_replica
    library = std_logging.getLogger(LIBRARY_LOGGER)
    if chosen != "passive":
        library.setLevel(level)
    elif hf_logging.get_verbosity() != hf_logging.WARNING:
        library.setLevel(hf_logging.get_verbosity())
    else:
        library.setLevel(std_logging.NOTSET)
    std_logging.getLogger(CONSOLE_LOGGER).setLevel(std_logging.INFO if level <= std_logging.WARNING else level)
    if not any(isinstance(h, ClearProgressBars) for h in library.handlers):
        library.handlers.insert(0, ClearProgressBars())  # before any handler that writes the line
    if not std_logging.getLogger().handlers and not any(getattr(h, "_splora", False) for h in library.handlers):
        handler = std_logging.StreamHandler()
        handler._splora = True
        library.addHandler(handler)


class ClearProgressBars(std_logging.Handler):
    """Clears the open tqdm bars (the Trainer's, the alignment build's) before a record of this
    library is written, by whatever handler writes it (ours, the application's root handler), so a
    line starts a line instead of landing after ``...62.26it/s]``; a bar redraws itself on its next
    update. What ``tqdm.write`` does, for lines written through ``logging``."""

    def emit(self, record: std_logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            return
        for bar in list(getattr(tqdm, "_instances", ())):
            if not getattr(bar, "disable", True):
                bar.clear()


def final_line(report: dict[str, Any], html: Path | None, adapter: str) -> str:
    """The one console line at the end: what was acted on (counted in its unit: rank-one components
    or layers), the safety signal against the aligned model, the layers that drifted most when
    nothing was changed, and where the report and adapter are."""
    from .headline import acted_on, acted_words, most_drifted, patch_words

    action = report.get("action") or {}
    config = report.get("config", {})
    select = config.get("select")
    select = select.get("name") if isinstance(select, dict) else select
    acted = acted_on(report)
    changed = False
    if not action:
        done = f"monitor only, nothing changed (prune_at_end=False; {len(report.get('selected', []))} layers would be selected)"
    elif action.get("refused"):
        done = f"nothing changed: {action['refused']}"
    elif action.get("action") == "patch":
        changed = patch_words(report) is not None
        done = patch_words(report) or "nothing changed (the patch found the probe's refusal already at its target)"
    elif acted is None:
        reason = STOP_REASONS.get((report.get("repair") or {}).get("measured_stop", {}).get("reason"))
        done = ("monitor only, nothing changed" if action.get("action") == "none"
                else f"nothing changed (the {select} rule chose nothing" + (f": {reason})" if reason else ")"))
    else:
        changed = True
        kinds: dict[str, int] = {}
        for name in acted["layers"]:
            kinds[name.rsplit(".", 1)[-1]] = kinds.get(name.rsplit(".", 1)[-1], 0) + 1
        mix = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
        done = f"{acted_words(report)} ({mix}) by {config.get('metric')} {select}"
    summary = safety_summary(report)
    signal = ""
    if "refusal_loss" in summary:
        last = summary["refusal_loss"]["last"][1]
        after = summary["after_action"].get("refusal_loss")
        signal = f"; refusal loss {last:.3f}" + (f" -> {after:.3f} after" if after is not None else "")
        if summary["aligned_refusal_loss"] is not None:
            signal += f" (aligned {summary['aligned_refusal_loss']:.3f})"
    elif not changed:
        signal = "; no safety probe, so no refusal loss (pass probe=SafetyProbe... to measure and repair)"
    drifted = "" if changed else ", ".join(f"{name} {value:+.2f}" for name, value in
                                           zip(short_names([n for n, _ in most_drifted(report)]),
                                               [v for _, v in most_drifted(report)], strict=True))
    if drifted:
        signal += f"; most drift from alignment (E-DIEM): {drifted}"
    where = f"; report {html}" if html is not None else ""
    return f"SPLoRA: {done}{signal}{where}; adapter: {adapter}"


# --- W&B ----------------------------------------------------------------------------------------


def open_wandb(args: Any) -> Any | None:
    """The wandb module when W&B is a ``report_to`` backend and ``WandbCallback`` opened a run."""
    if "wandb" not in (args.report_to or []):
        return None
    import wandb  # lazy, as transformers' WandbCallback and TRL do

    if wandb.run is None or getattr(wandb.run, "disabled", False):  # WANDB_MODE=disabled: a no-op run
        logger.warning("report_to has 'wandb' but no W&B run is open (or W&B is disabled): SPLoRA's series go to "
                       "its local HTML report only.")
        return None
    return wandb


def grouped_series(report: dict[str, Any], field: str = "ediem") -> dict[str, tuple[list[int], list[list], list[str]]]:
    """Module kind -> (steps, one value list per layer, layer names) of ``field`` over the history."""
    steps = [entry["step"] for entry in report["history"]]
    per_layer: dict[str, dict[str, list]] = {}
    for column, entry in enumerate(report["history"]):
        for item in entry["scores"]["layers"]:
            values = per_layer.setdefault(item["kind"], {}).setdefault(item["name"], [None] * len(steps))
            values[column] = item.get(field)
    return {kind: (steps, list(layers.values()), list(layers)) for kind, layers in sorted(per_layer.items())
            if any(value is not None for values in layers.values() for value in values)}


def wandb_line_charts(wandb: Any, report: dict[str, Any]) -> dict[str, Any]:
    """One ``line_series`` chart per module kind and field (``splora/ediem/<kind>``, ``splora/probe/<kind>``);
    the refusal loss against its aligned reference (``splora/safety/refusal_loss_chart``)."""
    charts = {}
    for field, label in (("ediem", "E-DIEM"), ("probe", "probe attribution")):
        for kind, (steps, values, names) in grouped_series(report, field).items():
            # W&B draws None as a gap; a layer never scored (inactive throughout) is left out above
            charts[f"splora/{field}/{kind}"] = wandb.plot.line_series(
                xs=steps, ys=values, keys=short_names(names), title=f"{label} per layer: {kind}",
                xname="train/global_step")
    summary = safety_summary(report)
    if "refusal_loss" in summary:
        from .headline import loss_series

        steps, losses = map(list, zip(*loss_series(report), strict=True))
        ys, keys = [losses], ["refusal loss (probe)"]
        if summary["aligned_refusal_loss"] is not None:
            ys.append([summary["aligned_refusal_loss"]] * len(steps))
            keys.append("aligned model (adapter off)")
        charts["splora/safety/refusal_loss_chart"] = wandb.plot.line_series(
            xs=steps, ys=ys, keys=keys, title="Safety signal: refusal loss on the probe set",
            xname="train/global_step")
    return charts


def wandb_safety_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Run-summary entries of the safety signal (the headline text first)."""
    summary = safety_summary(report)
    entries: dict[str, Any] = {"splora/safety/headline": headline(report)}
    if summary["aligned_refusal_loss"] is not None:
        entries["splora/safety/aligned_refusal_loss"] = summary["aligned_refusal_loss"]
    if "refusal_loss" in summary:
        entries["splora/safety/final_refusal_loss"] = summary["refusal_loss"]["last"][1]
    for key, value in summary["after_action"].items():
        entries[f"splora/safety/after_action_{key}"] = value
    if summary["stopped_at"] is not None:
        entries["splora/safety/stopped_at_step"] = summary["stopped_at"]
    return entries


# --- TensorBoard --------------------------------------------------------------------------------


def tensorboard_dir(args: Any, since: float) -> Path:
    """The Trainer's TensorBoard folder, so that SPLoRA's tags sit in the same run as ``train/loss``.

    ``args.logging_dir`` where it exists (transformers 4), else ``$TENSORBOARD_LOGGING_DIR`` (what
    ``TensorBoardCallback`` reads), else the ``output_dir/runs/*`` folder it created since ``since``
    (its ``on_train_begin`` runs before ours), else ``output_dir/runs/splora``.
    """
    explicit = getattr(args, "logging_dir", None) or os.getenv("TENSORBOARD_LOGGING_DIR")
    if explicit:
        return Path(explicit).expanduser()
    runs = Path(args.output_dir) / "runs"
    fresh = [path for path in runs.glob("*") if path.is_dir() and path.stat().st_mtime >= since - 1]
    if fresh:
        return max(fresh, key=lambda path: path.stat().st_mtime)
    return runs / "splora"


def custom_scalar_layout(kinds: list[str]) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout: the safety signal first, then one chart per module kind."""
    return {
        "SPLoRA safety signal": {
            "refusal loss vs aligned model": ["Multiline", [r"^splora/safety/refusal_loss(_aligned|_after_action)?$"]],
            "refusal rate vs aligned model": ["Multiline", [r"^splora/safety/refusal_rate(_aligned)?$"]],
        },
        "SPLoRA E-DIEM per layer": {
            kind: ["Multiline", [rf"^splora/ediem/.*\.{re.escape(kind)}$"]] for kind in kinds
        },
        "SPLoRA summary": {
            "E-DIEM max / mean": ["Multiline", [r"^splora/summary/ediem_(max|mean)$"]],
            "mean E-DIEM per kind": ["Multiline", [r"^splora/kind/.*/ediem_mean$"]],
        },
    }


class TensorBoardSeries:
    """SPLoRA's scalars in a ``SummaryWriter`` of its own (the Trainer's writer is not reachable)."""

    def __init__(self, folder: Path, kinds: list[str]):
        from torch.utils.tensorboard import SummaryWriter  # lazy: needs the tensorboard package

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder), filename_suffix=".splora")
        self.writer.add_custom_scalars(custom_scalar_layout(kinds))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            if key != "train/global_step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def final(self, report: dict[str, Any]) -> None:
        """The headline and verdict as text, the heatmap as an image; then close."""
        import numpy as np
        from PIL import Image

        step = report["step"]
        for key, value in safety_summary(report)["after_action"].items():  # the measured effect of the action
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"splora/safety/{key}_after_action", value, step)
        text = headline(report) + ("\n\n" + verdict(report) if verdict(report) else "")
        self.writer.add_text("splora/headline", text, step)
        if report["history"]:
            image = np.asarray(Image.open(io.BytesIO(figure_png(heatmap_figure(report)))).convert("RGB"))
            self.writer.add_image("splora/ediem_heatmap", image, step, dataformats="HWC")
        self.close()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


# --- all of them ----------------------------------------------------------------------------------


class Trackers:
    """The backends of one training run (world-zero process only)."""

    def __init__(self, wandb: Any | None, tensorboard: TensorBoardSeries | None):
        self.wandb = wandb
        self.tensorboard = tensorboard
        self._wandb_layers: set[str] | None = None  # the layers with a W&B series, fixed at the first call

    def log_config(self, config: dict[str, Any]) -> None:
        """The SPLoRA settings in the W&B run's config, under ``splora/`` (next to the Trainer's)."""
        if self.wandb is not None:
            import json

            settings = json.loads(json.dumps(config, default=str))  # a rule object or a path: its text
            self.wandb.run.config.update({f"splora/{key}": value for key, value in settings.items()},
                                         allow_val_change=True)

    def _wandb_layer_keys(self, payload: dict[str, Any]) -> set[str]:
        """Per-layer keys of ``payload`` that go to W&B: every layer up to :data:`WANDB_LAYER_SERIES`,
        else that many with the highest E-DIEM at the first scoring call (the same layers thereafter)."""
        keys = [key for key in payload if PER_LAYER.match(key)]
        if self._wandb_layers is None and keys:
            names = sorted({key.split("/", 2)[2] for key in keys})
            if len(names) > WANDB_LAYER_SERIES:
                ediem = {key.split("/", 2)[2]: value for key, value in payload.items()
                         if key.startswith("splora/ediem/") and isinstance(value, (int, float))}
                names = sorted(names, key=lambda name: -ediem.get(name, float("-inf")))[:WANDB_LAYER_SERIES]
                logger.info("SPLoRA: per-layer W&B series for the %d layers with the highest E-DIEM at step %s of %d; "
                            "every layer is in the end-of-training charts and in TensorBoard.",
                            WANDB_LAYER_SERIES, payload.get("train/global_step"), len(set(k.split("/", 2)[2] for k in keys)))
            self._wandb_layers = set(names)
        return {key for key in keys if key.split("/", 2)[2] in (self._wandb_layers or set())}

    @classmethod
    def open(cls, args: Any, kinds: list[str], since: float | None = None) -> Trackers:
        """The backends ``args.report_to`` asks for; one warning names those that get no series."""
        report_to = list(args.report_to or [])
        others = [name for name in report_to if name not in SERIES_BACKENDS and name not in NO_SERIES_EXPECTED]
        if others:
            logger.warning(
                "SPLoRA logs its series to W&B and TensorBoard only; report_to also has %s, which get no SPLoRA "
                "series (a callback cannot reach them). The report in output_dir (splora_report.json / .html) "
                "has everything.", ", ".join(others))
        tensorboard = None
        if "tensorboard" in report_to:
            folder = tensorboard_dir(args, time.time() if since is None else since)
            tensorboard = TensorBoardSeries(folder, kinds)
            logger.info("SPLoRA TensorBoard scalars: %s", folder)
        return cls(open_wandb(args), tensorboard)

    def log_scores(self, scores: LayerScores, step: int, selected: list[str] | None, config: dict[str, Any],
                   seconds: float, safety: dict[str, float]) -> None:
        """One scoring call: W&B without per-layer keys, TensorBoard with them."""
        payload = {**wandb_step_payload(scores, step, selected, over_threshold(config), seconds), **safety}
        if self.tensorboard is not None:
            self.tensorboard.log(payload, step)
        if self.wandb is not None:  # no step=: the Trainer owns W&B's step; charts use train/global_step
            layers = self._wandb_layer_keys(payload)
            self.wandb.run.log({key: value for key, value in payload.items()
                                if not PER_LAYER.match(key) or key in layers})

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Scalars outside a scoring call (the refusal rate on its own schedule)."""
        if self.tensorboard is not None:
            self.tensorboard.log(scalars, step)
        if self.wandb is not None:
            self.wandb.run.log({**scalars, "train/global_step": step})

    def alert(self, title: str, text: str) -> None:
        if self.wandb is not None:
            # one title per step: W&B drops an alert whose title repeats within wait_duration (1 min)
            self.wandb.run.alert(title=title, text=text, level="WARN")

    def final(self, report: dict[str, Any]) -> None:
        """End of training: W&B media, line charts and summary; TensorBoard text and image."""
        if self.wandb is not None and report["history"]:
            media = {**wandb_final_media(self.wandb, report), **wandb_line_charts(self.wandb, report)}
            media["splora/headline"] = self.wandb.Html(f"<p><b>SPLoRA safety signal.</b> {headline(report)} "
                                                       f"{verdict(report)}</p>")
            self.wandb.run.log({**media, "train/global_step": report["step"]})
        if self.wandb is not None:
            self.wandb.run.summary.update({**wandb_summary(report), **wandb_safety_summary(report)})
        if self.tensorboard is not None:
            self.tensorboard.final(report)
            self.tensorboard = None

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
