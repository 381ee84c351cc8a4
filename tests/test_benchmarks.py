"""Every benchmark script runs end to end at a smoke size and prints its table (RESULTS.md untouched).

Each runs as ``__main__`` in its own process, forked from a warm interpreter (``cli_process.py``:
a fresh one spends ~10 s importing torch, transformers and peft).

The numbers mean nothing at this size; what is checked is that ``python benchmarks/<script>.py``
still reproduces a table with the columns and the target verdicts RESULTS.md shows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_process import run_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

SMOKE = {
    "scoring_speed.py": (
        ["--models", "gqa-8b", "--layers", "1", "--ranks", "8", "--v-pool", "1", "--threads", "1"],
        ["low-rank adapter s", "dense adapter s (extrap.)", "Targets (whole adapter < 15 s, >= 30x dense)",
         "floor s"],
    ),
    "alignment_build.py": (
        ["--size", "tiny", "--threads", "1"],
        ["peak RSS over baseline MiB", "streaming `AlignmentSubspace.from_pretrained`", "Target: build peak"],
    ),
    "training_overhead.py": (
        ["--steps", "4", "--repeats", "1", "--modes", "without", "callback", "--threads", "1"],
        ["ratio to without", "on_train_end s (final report)", "Target ratio <= 1.03"],
    ),
    "inference_after_pruning.py": (
        ["--prompts", "1", "--batch", "1", "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1",
         "--threads", "1"],
        ["tokens/s", "LoRA pruned to 60/120 modules (unmerged)", "Pruned / unmerged speed ratio"],
    ),
    "component_cost.py": (
        ["--pairs", "2", "--seq", "16", "--repeats", "1", "--blocks", "1", "--width", "128", "--ranks", "4",
         "--threads", "1"],
        ["safety + utility attribution, components (2 + 2 pairs)", "Attribution cost:", "components removed"],
    ),
    "probe_cost.py": (
        ["--pairs", "2", "--batch", "2", "--seq", "16", "--repeats", "1", "--no-probe-warmup", "--threads", "1"],
        ["probe, logits at response positions (default)", "Probe cost:"],
    ),
    "scoring_memory.py": (
        ["--models", "gqa-8b", "--layers", "1", "--ranks", "8", "--v-pool", "1", "--repeats", "1", "--threads", "1"],
        ["V on the device, stream (peak)", "Targets (at most one module's V", "est. GPU transfer s/call"],
    ),
    "safety_signal_cost.py": (
        ["--pairs", "2", "--prompts", "2", "--new-tokens", "2", "--batch", "2", "--seq", "16", "--repeats", "1",
         "--threads", "1"],
        ["aligned reference: probe loss, adapter off", "refusal rate: 2 prompts x 2 new tokens", "x training step"],
    ),
    "cli_startup.py": (["--repeats", "1", "--no-warmup"], ["`splora --help`", "Target `splora --help` < 1 s"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_script_prints_its_table(script, tmp_path):
    arguments, expected = SMOKE[script]
    before = (BENCHMARKS / "RESULTS.md").read_text()
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = run_script(BENCHMARKS / script, [*arguments, "--no-write"], cwd=BENCHMARKS, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, f"{script}: {text!r} missing from its output"
    assert "| --- |" in done.stdout or "|---|" in done.stdout  # a markdown table was printed
    assert (BENCHMARKS / "RESULTS.md").read_text() == before  # --no-write left the results alone
