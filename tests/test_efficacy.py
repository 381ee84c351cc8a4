"""The efficacy study's configs and driver (benchmarks/efficacy.py): every config parses, and one
cell runs end to end at smoke size on the real demo model, then resumes without redoing anything."""

from __future__ import annotations

import json
import os
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
    "evaluation.utility_examples=4",
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
def test_efficacy_driver_smoke_real_model(tmp_path):
    """One cell of setting (a) at smoke size: trained, evaluated (every rule, its controls, the
    one-shot patch calibrated), reported; a second run finds everything cached."""
    command = [sys.executable, "benchmarks/efficacy.py", "--settings", "a", "--seeds", "0",
               "--root", str(tmp_path / "cells"), "--results", str(tmp_path / "report"), "--override", *SMOKE]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
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
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and "train (load" not in second.stdout and "evaluate (load" not in second.stdout
    assert (cell / "results.json").stat().st_mtime_ns == stamp  # cached: nothing redone
