"""Retag the study's cached evaluations (``variants.jsonl``) written before per-model fingerprints.

One fingerprint used to cover a cell's whole evaluation section, so adding a candidate re-evaluated
every model of the cell (20-28 min). ``evaluation_run.cache_fingerprints`` now ties a prebuilt
model (a patch, Safe Delta) to its own section only. This checks each old line: the old
fingerprint is recomputed from the config the cell was evaluated with (its ``results.json``) and a
line that matches is appended again, tagged with the fingerprint its model has under that same
config. Nothing is rewritten or removed; a line that does not match stays as it is (never reused).

    python benchmarks/retag_cache.py outputs/efficacy/a/seed0 outputs/efficacy/a/seed1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from evaluation_run import cache_fingerprints, run_dir  # noqa: E402
from recipe_data import prepare_data  # noqa: E402

from splora_callback.adapter_files import ADAPTER_WEIGHTS  # noqa: E402

# the plan settings of the old fingerprint (before "over_refusal" left it)
OLD_PLAN_ONLY = ("rules", "fractions", "random_seeds", "controls", "workers", "run_dir", "over_refusal_controls")


def old_fingerprint(config: dict[str, Any], aligned: str, data: dict[str, Any]) -> str:
    """The whole-cell fingerprint as ``evaluation_run`` computed it until per-model fingerprints."""
    digest = hashlib.sha256((run_dir(config) / "adapter-lora" / ADAPTER_WEIGHTS).read_bytes())
    folder = Path(aligned)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                   if not p.name.startswith("alignment_subspace")) if folder.is_dir() else []
    spec = {key: value for key, value in config["evaluation"].items() if key not in OLD_PLAN_ONLY}
    inputs = {"aligned": [str(aligned), files], "dtype": config["model"]["dtype"], "seed": config["seed"],
              "evaluation": spec, "probe": config["probe"],
              "prompts": {key: data[key] for key in ("eval_prompts", "task_eval", "benign_prompts", "probe_prompts")}}
    digest.update(json.dumps(inputs, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def retag(cell: Path) -> tuple[int, int]:
    """Append the cell's old-fingerprint lines with their per-model fingerprints; (appended, unmatched)."""
    payload = json.loads((cell / "results.json").read_text())
    config, aligned = payload["config"], payload["aligned"]
    data = prepare_data(config)
    old, fingerprint = old_fingerprint(config, aligned, data), cache_fingerprints(config, aligned, data)
    cache = cell / "variants.jsonl"
    records = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    present = {(record["key"], record["fingerprint"]) for record in records}
    lines, unmatched = [], 0
    for record in records:
        if record["fingerprint"] != old:
            unmatched += 1
            continue
        tagged = {**record, "fingerprint": fingerprint(json.loads(record["key"])[0])}
        if (tagged["key"], tagged["fingerprint"]) not in present:
            present.add((tagged["key"], tagged["fingerprint"]))
            lines.append(json.dumps(tagged) + "\n")
    with cache.open("a") as handle:
        handle.writelines(lines)
    return len(lines), unmatched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cells", nargs="+", type=Path, help="cell folders (results.json and variants.jsonl)")
    for cell in parser.parse_args().cells:
        appended, unmatched = retag(cell)
        print(f"{cell}: {appended} line(s) retagged, {unmatched} of other inputs left as they are")


if __name__ == "__main__":
    main()
