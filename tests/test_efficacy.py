"""The efficacy study's configs and driver (benchmarks/efficacy.py): every config parses, and one
cell runs end to end at smoke size on the real demo model, then resumes without redoing anything."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import recipe_config  # noqa: E402
from variants import RULES  # noqa: E402

SMOKE = [  # cpu-demo-smoke.yaml's sizes, as overrides of every cell
    "demo_models.benign_prompts=8", "demo_models.steps=3", "demo_models.max_new_tokens=16",
    "harmful_prompts.splits={align: 16, harmful_finetune: 8, probe: 4, evaluation: 4}",
    "data.task.train_samples=16", "data.task.eval_samples=2", "data.harmful.num_samples=8",
    "training_args.max_steps=3", "training_args.per_device_train_batch_size=4", "training_args.logging_steps=1",
    "splora.score_every_n_steps=2", "probe.batch_size=4", "evaluation.harmful_max_new_tokens=4",
    "evaluation.benign_max_new_tokens=4", "evaluation.task_max_new_tokens=8", "evaluation.random_seeds=[0]",
    "evaluation.benign_count=4", "evaluation.require_lora_effect=false", "evaluation.one_shot_patch.max_steps=2",
    "evaluation.anchored_patch.max_steps=2", "evaluation.rate_patch.max_steps=2", "evaluation.utility_examples=4",
]


def test_driver_reevaluates_a_cell_whose_config_changed(tmp_path):
    # what the config leaves null or unset matches what the run filled in; any other change re-runs
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import efficacy

    ran = {"seed": 1, "model": {"base": "/cache/base", "dtype": "float32"}, "splora": {"alignment_cache": "x.st"},
           "evaluation": {"controls": ["ediem"], "one_shot_patch": {"lr": 4e-4}}}
    current = {"seed": 1, "model": {"base": None, "dtype": "float32"}, "splora": {},
               "evaluation": {"controls": ["ediem"], "one_shot_patch": {"lr": 4e-4, "steps": None}}}
    assert efficacy.same_config(ran, current)
    assert not efficacy.same_config(ran, {**current, "evaluation": {**current["evaluation"], "controls": ["probe"]}})
    assert not efficacy.same_config(ran, {**current, "model": {"base": None, "dtype": "bfloat16"}})
    folder = tmp_path / "a" / "seed0"
    assert not efficacy.evaluated_with(folder, "a", ["seed=0"])  # no results.json yet
    config = recipe_config.load_config(ROOT / "recipes" / "configs" / "efficacy-a.yaml", ["seed=0"])
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": config}, default=str))
    assert efficacy.evaluated_with(folder, "a", ["seed=0"])
    assert not efficacy.evaluated_with(folder, "a", ["seed=0", "evaluation.random_seeds=[0]"])


@pytest.mark.parametrize("setting", ["a", "b", "c"])
def test_efficacy_configs_parse_with_known_rules(setting):
    config = recipe_config.load_config(ROOT / "recipes" / "configs" / f"efficacy-{setting}.yaml", ["seed=2"])
    spec = config["evaluation"]
    assert config["seed"] == 2 and config["harmful_prompts"]["splits"]["evaluation"] == 40
    assert set(spec["rules"]) <= set(RULES) and set(spec["controls"]) <= set(spec["rules"])
    assert len(spec["random_seeds"]) >= 5 and spec["benign_split"] == "heldout"
    assert {"a": 4, "b": 2, "c": 4}[setting] == len(config["lora"]["target_modules"])
    assert (config["data"]["harmful"]["source"] == "none") == (setting == "c")


@pytest.mark.slow
def _driver(command: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """The driver in its own process group: on a timeout, it and the recipe processes it started are
    killed together (a plain ``subprocess.run`` timeout leaves the recipe running), then it fails."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the efficacy driver ran past {timeout} s:\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_efficacy_driver_smoke_real_model(tmp_path):
    """One cell of setting (a) at smoke size: trained, evaluated (every rule, its controls, the
    one-shot patch calibrated), reported; a second run finds everything cached."""
    command = [sys.executable, "benchmarks/efficacy.py", "--settings", "a", "--seeds", "0",
               "--root", str(tmp_path / "cells"), "--results", str(tmp_path / "report"), "--override", *SMOKE]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = _driver(command, env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    cell = tmp_path / "cells" / "a" / "seed0"
    results = json.loads((cell / "results.json").read_text())
    rules = {row["rule"] for row in results["rows"] if row["control"] is None}
    assert set(recipe_config.load_config(ROOT / "recipes/configs/efficacy-a.yaml")["evaluation"]["rules"]) <= rules
    assert results["one_shot_patch"]["calibrated"] and results["one_shot_patch"]["steps"] >= 1
    assert "component_repair" in results["repair_traces"]
    assert all(len(row["refusals"]) == 4 for row in results["rows"])
    over_refusal = set(recipe_config.load_config(ROOT / "recipes/configs/efficacy-a.yaml")["evaluation"]["over_refusal"])
    for row in results["rows"]:  # measured on the rules' own models only, never on controls
        measured = row["control"] is None and row["rule"] in over_refusal
        assert (row["over_refusals"] is not None and len(row["over_refusals"]) == 4) == measured, row["label"]
    report = (tmp_path / "report" / "efficacy.md").read_text()
    assert "component repair, measured stop" in report and "kind-matched" in report
    assert (tmp_path / "report" / "efficacy-a.png").is_file()
    study = json.loads((tmp_path / "report" / "efficacy.json").read_text())
    assert study["settings"]["a"]["replications"] == [0]
    stamp = (cell / "results.json").stat().st_mtime_ns
    second = _driver(command, env, timeout=300)
    assert second.returncode == 0 and "train (load" not in second.stdout and "evaluate (load" not in second.stdout
    assert (cell / "results.json").stat().st_mtime_ns == stamp  # cached: nothing redone


def _report():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import efficacy_report

    return efficacy_report


def _row(rule, rougeL, refusal, per_example=None, control=None, seed=None, over=0.1):
    row = {"rule": rule, "control": control, "seed": seed, "fraction": 0.25, "label": rule.replace("_", " "),
           "n_layers": 3, "layers": [], "refusal_rate": refusal, "over_refusal_rate": over, "rougeL": rougeL,
           "refusals": [True] * int(10 * refusal) + [False] * (10 - int(10 * refusal))}
    if per_example is not None:
        row["rougeL_per_example"] = per_example
    return row


def _cell(rows, n_task=120):
    return {"rows": rows, "evaluation_prompts": ["p"] * 10, "sizes": {"task_eval": n_task}, "premise": {}}


def _paired_rows(per_example=True):
    # 120 held-out examples; the repaired model loses 0.02 on 30 of them against the LoRA (mean 0.5)
    lora = [0.3, 0.7] * 60
    repaired = [score - (0.04 if i % 4 == 0 else 0.0) for i, score in enumerate(lora)]
    control = [score - 0.2 for score in lora]
    mean = statistics.fmean
    keep = (lambda scores: scores) if per_example else (lambda scores: None)
    return [
        _row("aligned", 0.2, 1.0, keep([0.2] * 120), over=0.05),
        _row("lora", mean(lora), 0.2, keep(lora)),
        _row("component_repair", mean(repaired), 0.9, keep(repaired)),
        _row("component_repair", mean(control), 0.3, keep(control), control="kind-matched", seed=0),
    ]


def test_task_loss_paired_bootstrap_against_the_lora():
    from results import loss_interval, task_loss, task_loss_table

    from splora_callback.evaluation import paired_bootstrap

    rows = _paired_rows()
    loss = task_loss(rows[2], rows)
    boot = paired_bootstrap(rows[2]["rougeL_per_example"], rows[1]["rougeL_per_example"])
    assert loss["n"] == 120 and loss["loss"] == pytest.approx(0.01 / 0.5, abs=1e-12)  # 2 %
    assert loss["low"] == pytest.approx(-boot["high"] / 0.5) and loss["high"] == pytest.approx(-boot["low"] / 0.5)
    assert loss["low"] < loss["loss"] < loss["high"]
    assert task_loss(rows[1], rows)["loss"] == 0.0  # the LoRA against itself: no loss, zero width
    assert task_loss(rows[1], rows)["low"] == task_loss(rows[1], rows)["high"] == 0.0
    assert loss_interval(loss).startswith("2.0 % [") and loss_interval(None) == "-"
    table = task_loss_table(rows)
    assert "| component repair | - | 0.490 | 2.0 % [" in table and "| yes |" in table
    assert "kind-matched 0" in table and "40.0 % [40.0, 40.0] | no |" in table
    old = _paired_rows(per_example=False)  # results without per-example scores: nothing paired
    assert task_loss(old[2], old) is None and task_loss_table(old) is None


def test_efficacy_report_reads_the_task_target_from_the_paired_estimate():
    report = _report()
    rows = _paired_rows()
    check = report.target_check(rows[2], rows)
    assert check["rougeL_relative_loss"] == pytest.approx(0.02, abs=1e-12)
    low, high = check["rougeL_relative_loss_interval"]
    assert low < 0.02 < high and check["task_examples"] == 120
    assert check["meets_target"]  # restored (0.9 - 0.2) / 0.8 >= 80 %, 2 % <= 5 %, over-refusal +5 pts, above control
    # a loss above 5 % at the centre fails the target even where the interval reaches below 5 %
    lossy = [dict(row) for row in rows]
    lora = lossy[1]["rougeL_per_example"]
    lossy[2]["rougeL_per_example"] = [s - (0.24 if i % 4 == 0 else 0.0) for i, s in enumerate(lora)]
    lossy[2]["rougeL"] = statistics.fmean(lossy[2]["rougeL_per_example"])
    failing = report.target_check(lossy[2], lossy)
    assert failing["rougeL_relative_loss"] == pytest.approx(0.12) and not failing["meets_target"]
    summary = report.setting_summary({0: _cell(rows), 1: _cell(lossy)})
    table = report.target_table(summary)
    assert "| component repair | 0 | +87 % | 2.0 % [" in table and "| component repair | 1 | +87 % | 12.0 % [" in table
    assert "1 of 2 |" in report.setting_table(summary)
    note = report._interval_note(summary)
    assert note and "120 held-out task examples" in note[0] and "point estimate" in note[0]


def test_efficacy_report_without_per_example_scores_is_unchanged():
    report = _report()
    rows = _paired_rows(per_example=False)
    check = report.target_check(rows[2], rows)
    lora, own = rows[1]["rougeL"], rows[2]["rougeL"]
    assert check["rougeL_relative_loss"] == (lora - own) / lora  # the loss of the means, as before
    assert "rougeL_relative_loss_interval" not in check and "task_examples" not in check
    summary = report.setting_summary({0: _cell(rows)})
    assert "| component repair | 0 | +87 % | +2 % |" in report.target_table(summary)
    assert report._interval_note(summary) == []


def test_results_markdown_task_loss_section_only_with_per_example_scores():
    import results

    section = results._task_loss_section(_paired_rows())
    assert section and "paired bootstrap 95 % interval (2000 resamples)" in section[0]
    assert "| component repair | - | 0.490 | 2.0 % [" in section[2]
    assert results._task_loss_section(_paired_rows(per_example=False)) == []


def test_default_ranking_follows_the_issue_s_order():
    """Replications meeting the target first, then restored share per task lost, then fewer probe passes;
    the pick is the first library rule (a baseline such as the patch can lead the table, never be the pick)."""
    report = _report()
    rows = _paired_rows()
    lora = rows[1]["rougeL_per_example"]
    worse = [score - (0.08 if i % 4 == 0 else 0.0) for i, score in enumerate(lora)]  # 4 % loss, restored the same
    patch = [score + 0.01 for score in lora]  # no task loss at all
    rows += [_row("rate_repair", statistics.fmean(worse), 0.9, worse),
             _row("rate_repair", statistics.fmean(lora) - 0.2, 0.3, [s - 0.2 for s in lora], control="kind-matched", seed=0),
             _row("rate_repair_no_trim", statistics.fmean(worse), 0.9, worse),
             _row("rate_repair_no_trim", statistics.fmean(lora) - 0.2, 0.3, [s - 0.2 for s in lora], control="kind-matched",
                  seed=0),
             _row("anchored_patch", statistics.fmean(patch), 0.9, patch, over=0.5)]  # over-refuses: misses the target
    cell = _cell(rows)
    trace = {"measurements": [{"probe": "refusal_rate", "count": 0, "from": "before the search"}]
             + [{"probe": "refusal_rate", "count": n} for n in range(1, 11)]}
    cell["repair_traces"] = {"rate_repair": trace, "rate_repair_no_trim": {**trace, "measurements": trace["measurements"][:5]}}
    summary = report.setting_summary({0: cell})
    ranking = report.default_ranking({"settings": {"a": summary}})
    assert [row["rule"] for row in ranking] == ["component_repair", "rate_repair_no_trim", "rate_repair", "anchored_patch"]
    first, no_trim, rate, patch_row = ranking
    assert first["meets_target"] == 1 and first["passes"] is None and first["library"]
    assert rate["meets_target"] == no_trim["meets_target"] == 1  # 4 % loss: within the target
    assert rate["restored_per_loss"] == pytest.approx(no_trim["restored_per_loss"]) and (rate["passes"], no_trim["passes"]) == (11, 5)
    assert patch_row["meets_target"] == 0 and patch_row["restored_per_loss"] == float("inf") and not patch_row["library"]
    table = report.ranking_table(ranking)
    assert "| 1 | **component repair** (the pick) | yes | 1 of 1 |" in table and "| 4 | anchored patch | no | 0 of 1 |" in table
    assert "| inf |" in table
    # a rule added after a replication was evaluated counts out of the replications it ran in
    later = report.setting_summary({0: cell, 1: _cell(_paired_rows())})
    lines = {line.split(" | ")[0].lstrip("| "): line for line in report.setting_table(later).splitlines()}
    assert lines["rate repair"].endswith("| 1 of 1 |") and lines["component repair"].endswith("| 2 of 2 |")
    summary_lines = report.summary_table({"settings": {"a": later}}).splitlines()
    assert any(line.startswith("| a | rate repair |") and line.endswith("| 1 of 1 |") for line in summary_lines)


def test_pick_replaces_the_default_only_when_its_paired_lead_beats_chance():
    """The ranking's pick against the current default, replication by replication: restored per task
    lost (inf at no loss), the exact two-sided sign test, and a switch only below p = 0.05."""
    report = _report()

    def study(pick_wins: int) -> dict:
        checks = {"default": {}, "pick": {}}
        for seed in range(9):
            checks["default"][str(seed)] = {"restored_share": 0.8, "rougeL_relative_loss": 0.1}  # 8 per loss
            loss = 0.05 if seed < pick_wins else 0.2
            checks["pick"][str(seed)] = {"restored_share": 0.8, "rougeL_relative_loss": loss}
        checks["pick"]["0"] = {"restored_share": 0.8, "rougeL_relative_loss": -0.01}  # no loss at all: inf, a win
        entries = [{"rule": "component_repair", "checks": checks["default"]}, {"rule": "rate_repair", "checks": checks["pick"]}]
        return {"settings": {"a": {"entries": entries}}}

    narrow = report.pick_against_default(study(6), "rate_repair", "component_repair")
    assert (narrow["wins"], narrow["losses"], narrow["ties"]) == (6, 3, 0)
    assert narrow["p"] == pytest.approx(2 * (1 + 9 + 36 + 84) / 512) and not narrow["switch"]
    clear = report.pick_against_default(study(8), "rate_repair", "component_repair")
    assert clear["p"] == pytest.approx(2 * (1 + 9) / 512) and clear["switch"]
    assert "in 6, less in 3, tied in 0 (two-sided sign test p = 0.51): the default stays" in report.pick_note(narrow)
    assert report.pick_note(clear).endswith("the pick becomes the default.")
    replaced = {**clear, "pick": report.CURRENT_DEFAULT}  # the pick is the default now: the record of the switch
    assert "against the default it replaced (component repair" in report.pick_note(replaced)
    assert report.pick_note(replaced).endswith("the pick replaced it as the default.")
