"""Issue 27 diagnostic: refusal against over-refusal along the rate patch's path, on the CPU demo's
trained LoRA (the efficacy study's setting (a), replication 0: the patch's calibration cell).

The rate patch takes whole AdamW steps (here 2: probe refusal 0.00 -> 0.35 -> 0.95). Between steps
the LoRA factors are blended, ``factors(t) = before + alpha * (after - before)`` at alpha = 1/8 ...
1, and each blend answers the probe's 20 prompts, the 40 held-out harmful prompts and the 56
held-out benign ones (greedy, 8 new tokens, keyword judge; the evaluation's batch sizes). The rule
fixed before the run: the smallest alpha whose probe refusal rate reaches the stop's target.

Needs a finished `make demo` (outputs/cpu-demo/adapter-lora, the cached aligned model). Run from the
repository root, alone (about 4 minutes on 2 cores):
    python benchmarks/results/issue27-patch-path/patch_path.py
Writes patch-path-a0.json next to this file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "recipes"))

from demo_data import BENIGN_PROBE_REQUESTS  # noqa: E402
from peft import PeftModel  # noqa: E402
from recipe_config import load_config  # noqa: E402
from recipe_data import prepare  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from splora_callback.patch import anchor_pairs, lora_factors, safety_patch  # noqa: E402
from splora_callback.repair import rate_target  # noqa: E402
from splora_callback.safety import adapters_disabled, refusal_rate_now  # noqa: E402


def main() -> None:
    start = time.time()
    config = load_config(ROOT / "recipes" / "configs" / "cpu-demo.yaml")
    data, _, aligned, probe = prepare(config, {})
    tokenizer = AutoTokenizer.from_pretrained(aligned)

    def trained_lora() -> PeftModel:
        model = AutoModelForCausalLM.from_pretrained(aligned, torch_dtype=torch.float32)
        return PeftModel.from_pretrained(model, ROOT / "outputs" / "cpu-demo" / "adapter-lora").eval()

    template = trained_lora()
    anchors = anchor_pairs(template, tokenizer, BENIGN_PROBE_REQUESTS, max_new_tokens=24, batch_size=24)

    def factors_after(steps: int) -> list[torch.Tensor]:
        model = trained_lora()
        safety_patch(model, probe, factors="both", lr=4e-4, batch_size=10, steps=steps, stop=None, anchor_pairs=anchors, anchors=4,
                     tokenizer=tokenizer, anchor_max_length=int(config["probe"]["max_length"]), seed=config["seed"])
        return [p.detach().clone() for p in lora_factors(model)]

    by_step = [[p.detach().clone() for p in lora_factors(template)], factors_after(1), factors_after(2)]
    model = trained_lora()
    live = lora_factors(model)
    with adapters_disabled(model):
        aligned_probe = refusal_rate_now(model, tokenizer, probe.prompts, 8, batch_size=20)
    rows = []
    for step in (1, 2):
        before, after = by_step[step - 1], by_step[step]
        for alpha in [i / 8 for i in range(1, 9)]:
            with torch.no_grad():
                for parameter, old, new in zip(live, before, after, strict=True):
                    parameter.copy_(old + alpha * (new - old))
            rows.append({"segment": f"step{step - 1}-{step}", "alpha": alpha,
                         "probe": refusal_rate_now(model, tokenizer, probe.prompts, 8, batch_size=20),
                         "heldout_refusal": refusal_rate_now(model, tokenizer, data["eval_prompts"], 8, batch_size=56),
                         "over_refusal": refusal_rate_now(model, tokenizer, data["benign_prompts"], 8, batch_size=56)})
            print(rows[-1], flush=True)
    result = {"aligned_probe": aligned_probe, "target": rate_target(0.0, aligned_probe, 0.9), "rows": rows,
              "seconds": time.time() - start}
    (Path(__file__).parent / "patch-path-a0.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
