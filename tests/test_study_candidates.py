"""Issue 27's candidates in the study, end to end on the tiny recipe: the refusal-rate repairs (with
their trim and guard), the anchored patch, the learned gates and Safe Delta are planned, built,
evaluated and recorded, and a rerun reuses every cached model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import evaluation_run  # noqa: E402
import finetune  # noqa: E402

CANDIDATES = ["component_repair", "rate_repair", "rate_repair_guard", "one_shot_patch", "anchored_patch", "rate_patch",
              "gates", "safe_delta"]
OVERRIDES = [
    f"evaluation.rules=[ediem, {', '.join(CANDIDATES)}]",
    "evaluation.controls=[ediem, rate_repair]",
    "evaluation.fractions=[0.25]",
    "evaluation.one_shot_patch={lr: 1.0e-3, batch_size: 4, steps: 1}",
    "evaluation.anchored_patch={lr: 1.0e-3, batch_size: 4, anchors: 2, steps: 1}",
    "evaluation.rate_patch={lr: 1.0e-3, batch_size: 4, anchors: 2, stop: refusal_rate, max_steps: 2}",
    "evaluation.gates={steps: 2, lr: 0.05}",
    "evaluation.safe_delta={scales: [0.1, 10.0]}",
]


def test_the_study_candidates_run_end_to_end_on_the_tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "recipes" / "configs" / "tiny-test.yaml")
    results = finetune.main([config, "--override", *OVERRIDES])
    rules = {row["rule"] for row in results["rows"]}
    assert set(CANDIDATES) <= rules
    saved = json.loads((tmp_path / "outputs" / "tiny-test" / "results.json").read_text())
    traces = saved["repair_traces"]

    def rows(rule: str, control: bool) -> list[dict]:
        return [row for row in results["rows"] if row["rule"] == rule and bool(row.get("control")) == control]

    # a rule that acts gets a kind-matched control per seed
    assert rows("ediem", False)[0]["n_layers"] > 0 and len(rows("ediem", True)) == 3
    # the tiny models refuse none of the probe's prompts (and the tiny LoRA does not raise the refusal loss), so
    # both stops' targets are met by removing nothing, and a control of an empty removal is not drawn
    loss = traces["component_repair"]
    assert loss["measurements"][0]["loss"] <= loss["target"] and rows("component_repair", False)[0]["n_layers"] == 0
    rate = traces["rate_repair"]
    assert rate["stop"] == "refusal_rate" and rate["aligned"]["refusal_rate"] == 0.0 == rate["target"]
    assert rows("rate_repair", False)[0]["n_layers"] == 0 and rows("rate_repair", True) == []
    guard = traces["rate_repair_guard"]
    assert guard["over_refusal_limit"] == guard["aligned"]["over_refusal"] + 0.05
    baselines = saved["baselines"]
    assert baselines["anchored_patch"]["anchors"] == 2 and baselines["anchored_patch"]["steps"] == 1
    assert len(baselines["gates"]["losses"]) == 3 and baselines["gates"]["components"] > 0
    rate_patch = baselines["rate_patch"]  # nothing refused by the tiny models: the stop takes no step
    assert rate_patch["stop"] == "refusal_rate" and rate_patch["steps"] == 0 and rate_patch["refusal_rate_by_step"] == [0.0]
    delta = baselines["safe_delta"]
    assert delta["scale"] in (0.1, 10.0) and [trial["scale"] for trial in delta["trials"]][0] == 0.1
    assert 0 <= delta["kept_share"] <= 1 and delta["dense"] is True
    # a rerun with the same inputs evaluates nothing again
    cached = (tmp_path / "outputs" / "tiny-test" / "variants.jsonl").read_text().splitlines()
    again = evaluation_run.main([config, "--override", *OVERRIDES])
    assert len((tmp_path / "outputs" / "tiny-test" / "variants.jsonl").read_text().splitlines()) == len(cached)
    assert [row["refusal_rate"] for row in again["rows"]] == [row["refusal_rate"] for row in results["rows"]]
