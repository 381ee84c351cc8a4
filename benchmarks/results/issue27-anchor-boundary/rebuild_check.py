"""The demo's callback patch (outputs/cpu-demo/adapter, lora_A) trained again from adapter-lora/ by the
evaluation's rate_patch rule (recipes/one_shot_patch.py) and compared tensor by tensor.

Needs a finished `make demo`. Run from the repository root, alone (about 2.5 minutes on 2 cores):
    python benchmarks/results/issue27-anchor-boundary/rebuild_check.py
Measured: 16 steps, probe refusal 0.00 -> 0.95 (the benchmark's aonly_r1 on a0, step by step);
largest |difference| from adapter/ 0.0.
"""

import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "recipes"))

import torch  # noqa: E402
from demo_data import BENIGN_PROBE_REQUESTS  # noqa: E402
from evaluation_run import callback_patch_gap  # noqa: E402
from one_shot_patch import one_shot_patch  # noqa: E402
from peft import PeftModel  # noqa: E402
from recipe_config import load_config  # noqa: E402
from recipe_data import prepare  # noqa: E402
from recipe_sections import evaluation_section  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from splora_callback.patch import anchor_pairs  # noqa: E402

start = time.time()
config = load_config(ROOT / "recipes/configs/cpu-demo.yaml")
data, _, aligned, probe = prepare(config, {})
tokenizer = AutoTokenizer.from_pretrained(aligned)
template = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned, torch_dtype=torch.float32),
                                     ROOT / "outputs/cpu-demo/adapter-lora").eval()
spec = evaluation_section(config)
anchors = anchor_pairs(template, tokenizer, BENIGN_PROBE_REQUESTS, max_new_tokens=spec.task_max_new_tokens,
                       batch_size=len(BENIGN_PROBE_REQUESTS))
model, record = one_shot_patch(template, probe, dataclasses.replace(spec.rate_patch, rebuild=True), None, config["seed"],
                               anchor_pairs=anchors, tokenizer=tokenizer, anchor_max_length=int(config["probe"]["max_length"]))
print("steps", record["steps"], "rates", record["refusal_rate_by_step"])
print("largest |difference| from adapter/:", callback_patch_gap(model, ROOT / "outputs/cpu-demo/adapter"), f"{time.time()-start:.0f} s")
