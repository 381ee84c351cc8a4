"""The efficacy study (issue 16): which repair rule restores refusals, at what cost, against chance.

    python benchmarks/efficacy.py [--settings a b c] [--seeds 0 1 2] [--stage all|train|evaluate|report]

3 settings (``recipes/configs/efficacy-{a,b,c}.yaml``: the demo's q/k/v/o mix, q/v only, a
benign-only fine-tune) x 3 replications (``seed``: the aligned model and the LoRA re-seeded).
Each cell is one folder ``outputs/efficacy/<setting>/seed<N>``, run in two subprocesses,
``recipes/finetune.py --train-only`` (writes ``training.json`` last) and ``recipes/evaluation_run.py``
(writes ``results.json`` last, and caches every evaluated model in ``variants.jsonl`` as it
finishes). A finished piece is never redone, so the study resumes where it was stopped; delete a
cell's folder to redo it. An evaluation whose ``results.json`` was written with another config
(e.g. controls or a candidate added to the YAML) runs again, reusing every model already evaluated
with the same inputs (``variants.jsonl``; a prebuilt model's inputs include its own section only,
``evaluation_run.cache_fingerprints``). Cells run replication-major (every setting of seed 0 first).

The report stage reads every finished cell and writes ``benchmarks/results/efficacy.json``,
``efficacy.md`` (tables) and ``efficacy.png`` (safety-utility figure). It needs the machine to
itself: a second job on 2 cores makes the LoRA steps 3-5x slower (wall time and load are recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SETTINGS = {
    "a": "recipes/configs/efficacy-a.yaml",
    "b": "recipes/configs/efficacy-b.yaml",
    "c": "recipes/configs/efficacy-c.yaml",
}
RESULTS_DIR = ROOT / "benchmarks" / "results"
CALIBRATION = ("a", 0)  # the cell whose run fixes the patches' steps and Safe Delta's scale for all others


def cell_dir(setting: str, seed: int, root: Path) -> Path:
    """Where one replication of one setting lives."""
    return root / setting / f"seed{seed}"


def calibrated(setting: str, seed: int, root: Path) -> list[str]:
    """What the calibration cell fixed, frozen for every other cell as overrides: the one-shot
    patch's and the anchored patch's step counts, Safe Delta's scale (the other cells therefore
    wait for that cell's results)."""
    if (setting, seed) == CALIBRATION:
        return []
    done = cell_dir(*CALIBRATION, root) / "results.json"
    if not done.is_file():
        raise SystemExit(f"evaluate {CALIBRATION[0]}/seed{CALIBRATION[1]} first: it calibrates the one-shot "
                         "patches' steps and Safe Delta's scale for every other cell")
    results = json.loads(done.read_text())
    baselines = results.get("baselines") or {}
    fixed = {"one_shot_patch.steps": (results.get("one_shot_patch") or {}).get("steps"),
             "anchored_patch.steps": (baselines.get("anchored_patch") or {}).get("steps"),
             "safe_delta.scale": (baselines.get("safe_delta") or {}).get("scale")}
    return [f"evaluation.{key}={value}" for key, value in fixed.items() if value is not None]


def same_config(ran: object, current: object) -> bool:
    """Whether a config as run (``results.json``) is ``current``; what ``current`` leaves null or
    unset matches what the run filled in (``model.base``, ``splora.alignment_cache``, ...)."""
    if current is None:
        return True
    if isinstance(current, dict):
        return isinstance(ran, dict) and all(same_config(ran.get(key), value) for key, value in current.items())
    return ran == current


def evaluated_with(folder: Path, setting: str, overrides: list[str]) -> bool:
    """Whether the cell's ``results.json`` exists and was written with the config it would run now.
    The callback's section (``splora``) is the training's: it does not change the unpruned LoRA
    (``adapter-lora/``) the evaluation reads; a new training needs the cell's folder deleted."""
    from recipe_config import load_config

    done = folder / "results.json"
    if not done.is_file():
        return False
    current = json.loads(json.dumps(load_config(ROOT / SETTINGS[setting], overrides), default=str))
    ran = json.loads(done.read_text())["config"]
    return same_config({**ran, "splora": None}, {**current, "splora": None})


def run_cell(setting: str, seed: int, root: Path, stages: set[str], overrides: list[str]) -> dict:
    """Train and evaluate one cell unless already done; returns the wall times and loads of what ran."""
    folder = cell_dir(setting, seed, root)
    cell = [f"seed={seed}", f"output_dir={folder}", *overrides]
    common = [SETTINGS[setting], "--override", *cell]
    ran = {}
    for name, script, done in (
        ("train", "recipes/finetune.py", "training.json"),
        ("evaluate", "recipes/evaluation_run.py", "results.json"),
    ):
        if name not in stages:
            continue
        extra = ["--train-only"] if name == "train" else calibrated(setting, seed, root)
        if name == "train" and (folder / done).is_file():
            continue
        if name == "evaluate" and evaluated_with(folder, setting, cell + extra):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, script, *common, *extra]
        load, start = os.getloadavg()[0], time.perf_counter()
        print(f"[efficacy] {setting}/seed{seed} {name} (load {load:.2f}): {' '.join(command)}", flush=True)
        with (folder / f"{name}.log").open("a") as log:
            code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        print(f"[efficacy] {setting}/seed{seed} {name}: exit {code}, {wall:.0f} s", flush=True)
        if code != 0:
            raise SystemExit(f"{setting}/seed{seed} {name} failed (exit {code}); see {folder / f'{name}.log'}")
        ran[name] = {"wall_s": wall, "load_before": load, "load_after": os.getloadavg()[0]}
    if ran:
        record = folder / "wall.json"
        previous = json.loads(record.read_text()) if record.is_file() else {}
        record.write_text(json.dumps({**previous, **ran}, indent=1))
    return ran


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--stage", default="all", choices=["all", "train", "evaluate", "report"])
    parser.add_argument("--root", type=Path, default=ROOT / "outputs" / "efficacy")
    parser.add_argument("--override", nargs="*", default=[], help="passed to every cell (smoke runs)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the report goes")
    args = parser.parse_args(argv)
    stages = {"train", "evaluate"} if args.stage == "all" else {args.stage}
    start = time.perf_counter()
    if stages & {"train", "evaluate"}:
        for seed in args.seeds:
            for setting in args.settings:
                run_cell(setting, seed, args.root, stages, args.override)
    if args.stage in ("all", "report"):
        from efficacy_report import write_report

        # every finished cell, not only this run's: a partial run must not shrink the committed report
        write_report(args.root, list(SETTINGS), sorted(set(args.seeds) | {0, 1, 2}), args.results)
    print(f"[efficacy] done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
