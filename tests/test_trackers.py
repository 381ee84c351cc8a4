"""report_to honoured (splora_callback.trackers): TensorBoard event files and the W&B offline run read
back, the warning for other backends, log_level, and the console line at the end."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny import lora_trainer
from transformers import TrainingArguments
from wandb_offline import logged_table, offline_run_dirs, read_offline_run

from splora_callback import SPLoRACallback
from splora_callback.probe import SafetyProbe
from splora_callback.report import REPORT_HTML, load_report
from splora_callback.trackers import CONSOLE_LOGGER, LIBRARY_LOGGER, Trackers, configure_logging

LAYERS = 8  # tiny Llama: 2 layers x q/k/v/o
KINDS = ("k_proj", "o_proj", "q_proj", "v_proj")


@pytest.fixture(autouse=True)
def restore_log_levels():
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in (LIBRARY_LOGGER, CONSOLE_LOGGER)]
    levels, handlers = [lg.level for lg in loggers], [list(lg.handlers) for lg in loggers]
    verbosity = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(verbosity)  # a Trainer with log_level="info" sets transformers' verbosity
    for lg, level, saved in zip(loggers, levels, handlers, strict=True):
        lg.setLevel(level)
        lg.handlers[:] = saved


def probe() -> SafetyProbe:
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    return SafetyProbe.from_tensors(ids, torch.ones_like(ids), torch.where(torch.arange(12) < 6, -100, ids))


def train(pair, dataset, output_dir, report_to, callback=None, **overrides):
    callback = callback or SPLoRACallback(base_model=str(pair[0]), select="top_k", k=3, score_every_n_steps=4,
                                          probe=probe())
    trainer = lora_trainer(pair[1], dataset, output_dir, [callback], report_to=list(report_to), **overrides)
    trainer.train()
    return trainer, callback


def test_tensorboard_gets_the_same_series_in_the_trainers_run_folder(pair, dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, callback = train(pair, dataset, tmp_path / "out", ["tensorboard"])
    (folder,) = (tmp_path / "out" / "runs").iterdir()  # one run: the Trainer's, with our event file in it
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert "train/loss" in scalars  # TensorBoardCallback's series share the folder and the step axis

    def series(tag):
        return [(event.step, event.value) for event in events.Scalars(tag)]

    steps = [entry["step"] for entry in callback.history]
    refusal = [entry["scores"]["losses"]["refusal"] for entry in callback.history]
    assert series("splora/safety/refusal_loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in zip(steps, refusal,
                                                                                                     strict=True)]
    aligned = load_report(tmp_path / "out")["safety"]["aligned_refusal_loss"]
    assert [value for _, value in series("splora/safety/refusal_loss_aligned")] == pytest.approx([aligned] * 3)
    assert [value for _, value in series("splora/safety/refusal_loss_increase")] == pytest.approx(
        [value - aligned for value in refusal], rel=1e-5)
    per_layer = {tag for tag in scalars if tag.startswith("splora/ediem/")}
    assert len(per_layer) == LAYERS
    first = {item["name"]: item["ediem"] for item in callback.history[0]["scores"]["layers"]}
    for name, value in first.items():
        assert series(f"splora/ediem/{name}")[0] == (4, pytest.approx(value, rel=1e-5, abs=1e-6))
    assert {"splora/summary/ediem_max", "splora/summary/scoring_seconds", "splora/kind/v_proj/ediem_mean",
            "splora/probe/model.layers.0.self_attn.q_proj"} <= scalars
    assert events.Tags()["images"] == ["splora/ediem_heatmap"]
    after = load_report(tmp_path / "out")["safety"]["after_action"]["refusal_loss"]  # the measured effect
    assert series("splora/safety/refusal_loss_after_action") == [(12, pytest.approx(after, rel=1e-6))]
    (text,) = events.Tensors("splora/headline/text_summary")
    assert b"Refusal loss on the safety probe" in text.tensor_proto.string_val[0]
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    titles = [category.title for category in layout.category]
    assert titles[0] == "SPLoRA safety signal" and "SPLoRA E-DIEM per layer" in titles
    per_kind = next(c for c in layout.category if c.title == "SPLoRA E-DIEM per layer")
    assert sorted(chart.title for chart in per_kind.chart) == list(KINDS)


def test_wandb_groups_per_layer_series_by_kind_and_leads_with_the_safety_signal(pair, dataset, tmp_path,
                                                                                 monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()  # a W&B setup left by an earlier test (WANDB_MODE=disabled, another WANDB_DIR) would stay
    try:
        _, callback = train(pair, dataset, tmp_path / "out", ["wandb"])
    finally:
        wandb.finish()
        wandb.teardown()
    (run_dir,) = offline_run_dirs(tmp_path)
    logged = read_offline_run(run_dir)
    rows = [row for row in logged.history if "splora/safety/refusal_loss" in row]
    assert [row["train/global_step"] for row in rows] == [4, 8, 12]
    assert [row["splora/safety/refusal_loss"] for row in rows] == pytest.approx(
        [entry["scores"]["losses"]["refusal"] for entry in callback.history])
    keys = set().union(*(set(row) for row in rows))
    per_layer = {key for key in keys if key.startswith(("splora/ediem/model.", "splora/probe/model."))}
    assert len(per_layer) == 2 * LAYERS  # every layer at every scoring step (up to WANDB_LAYER_SERIES layers)
    first = {item["name"]: item["ediem"] for item in callback.history[0]["scores"]["layers"]}
    assert {name: rows[0][f"splora/ediem/{name}"] for name in first} == pytest.approx(first)
    assert len({key for key in keys - per_layer if key.startswith("splora/")}) < 40  # a handful of other panels
    # the SPLoRA settings are in the run's config, next to the Trainer's
    config = {key: value.get("value", value) if isinstance(value, dict) else value for key, value in logged.config.items()}
    assert config["splora/select"] == "top_k" and config["splora/k"] == 3, config
    assert config["splora/base_model"] == str(pair[0])
    for field in ("ediem", "probe"):
        lines = [logged_table(run_dir, logged.summary, f"splora/{field}/{kind}_table")["data"] for kind in KINDS]
        assert sum(len(data) for data in lines) == LAYERS * 3  # every layer at every scoring step
    chart = logged_table(run_dir, logged.summary, "splora/safety/refusal_loss_chart_table")
    assert {line for _, line, _ in chart["data"]} == {"refusal loss (probe)", "aligned model (adapter off)"}
    assert logged.summary["splora/safety/headline"].startswith("Refusal loss on the safety probe")
    assert logged.summary["splora/safety/aligned_refusal_loss"] == pytest.approx(
        load_report(tmp_path / "out")["safety"]["aligned_refusal_loss"])
    assert logged.summary["splora/headline/_type"] == "html-file"
    assert logged.summary["splora/ediem_heatmap/_type"] == "image-file"  # kept
    assert (tmp_path / "out" / REPORT_HTML).is_file()  # written with W&B too: the offline record


def test_other_backends_get_one_warning_naming_them(tmp_path, caplog):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    args.report_to = ["mlflow", "comet_ml", "codecarbon"]
    with caplog.at_level(logging.WARNING, logger=LIBRARY_LOGGER):
        trackers = Trackers.open(args, list(KINDS))
    (record,) = [r for r in caplog.records if "report_to" in r.getMessage()]
    assert "mlflow, comet_ml, which get no SPLoRA series" in record.getMessage()
    assert "codecarbon" not in record.getMessage() and "splora_report.json" in record.getMessage()
    assert trackers.wandb is None and trackers.tensorboard is None


def test_console_line_at_the_end_says_what_was_pruned_and_where(pair, dataset, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    trainer, callback = train(pair, dataset, tmp_path / "out", [])
    plan, line = [r.getMessage() for r in caplog.records if r.name == CONSOLE_LOGGER]  # train start, train end
    assert plan.startswith("SPLoRA: monitoring") and "at the end of training, prune LoRA layers" in plan
    pruned = callback.action_report["layers"]
    kinds = sorted({name.rsplit(".", 1)[-1] for name in pruned})
    assert line.startswith(f"SPLoRA: pruned 3 of {LAYERS} LoRA layers (") and all(k in line for k in kinds)
    assert f"report {tmp_path / 'out' / REPORT_HTML}" in line
    assert "refusal loss" in line and "after" in line and "aligned" in line
    assert f"trainer.save_model() writes it (to {tmp_path / 'out'}" in line


@pytest.mark.parametrize("log_level,info_shown,line_shown", [("info", True, True), ("passive", False, True),
                                                             ("error", False, False)])
def test_log_level_controls_the_library_logs_and_the_end_line(pair, dataset, tmp_path, caplog, log_level,
                                                               info_shown, line_shown):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()  # transformers' default, what "passive" follows
    caplog.handler.setLevel(logging.DEBUG)  # caplog takes every record our loggers emit
    train(pair, dataset, tmp_path / "out", [], log_level=log_level, max_steps=4)
    ours = [r for r in caplog.records if r.name.startswith(LIBRARY_LOGGER)]
    assert any(r.levelno == logging.INFO and r.name != CONSOLE_LOGGER for r in ours) is info_shown
    assert any(r.name == CONSOLE_LOGGER for r in ours) is line_shown


def test_a_plain_script_gets_a_stderr_handler_so_the_line_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no logging configured (not even pytest's)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    configure_logging(args)
    configure_logging(args)  # twice (two train() calls): still one handler
    assert sum(getattr(h, "_splora", False) for h in logging.getLogger(LIBRARY_LOGGER).handlers) == 1
    logging.getLogger(CONSOLE_LOGGER).info("SPLoRA: done")
    assert "SPLoRA: done" in capsys.readouterr().err


def test_tensorboard_folder_follows_logging_dir_and_the_environment(tmp_path, monkeypatch):
    from splora_callback.trackers import tensorboard_dir

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert tensorboard_dir(args, since=0) == Path(tmp_path) / "runs" / "splora"
    (tmp_path / "runs" / "old").mkdir(parents=True)
    assert tensorboard_dir(args, since=0) == tmp_path / "runs" / "old"
    assert tensorboard_dir(args, since=2e9) == tmp_path / "runs" / "splora"  # not from this run
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    assert tensorboard_dir(args, since=0) == tmp_path / "tb"
