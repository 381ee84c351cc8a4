"""Inference after pruning: greedy-generation tokens/s of an unmerged LoRA, before and after pruning.

A ~135M-parameter Llama built in code with SmolLM2-135M's shapes (hidden 576, 30 layers, GQA 9/3
heads, MLP 1536, vocab 49152, tied embeddings; random weights: throughput does not depend on them)
with LoRA r=``--rank`` on q/k/v/o (120 modules, non-zero B so nothing is skipped). Variants:

- no LoRA: the plain model;
- unmerged LoRA on all modules;
- unmerged LoRA after ``prune_layers`` on half the modules (seeded random choice: every module of a
  kind costs the same, so which half does not matter for speed);
- merged LoRA (``merge_and_unload``: the cost floor of any adapter).

Greedy ``generate`` with a fixed token count (``min_new_tokens = max_new_tokens``, so EOS cannot
stop early) on fixed prompts, batch 1 and batch ``--batch``; variants interleaved per repeat,
median reported.

Run: ``python benchmarks/inference_after_pruning.py`` (about 2-3 minutes at low load).
"""

from __future__ import annotations

import argparse
import random

import torch
import transformers
from _common import (
    header,
    load_text,
    markdown_table,
    median,
    set_threads,
    spread,
    time_call,
    wait_for_load,
    write_section,
)
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from splora_callback.layers import iter_lora_layers
from splora_callback.pruning import prune_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                    head_dim=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()


def lora_model(rank: int):
    model = get_peft_model(base_model(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                    lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 1e-3)
    return model.eval()


def variants(rank: int, seed: int) -> dict[str, torch.nn.Module]:
    models = {"no LoRA": base_model(), "LoRA, all modules (unmerged)": lora_model(rank)}
    pruned = lora_model(rank)
    names = [name for name, _ in iter_lora_layers(pruned, "default")]
    chosen = sorted(random.Random(seed).sample(names, len(names) // 2))
    report = prune_layers(pruned, chosen)
    remaining = len(list(iter_lora_layers(pruned, "default")))
    models[f"LoRA pruned to {remaining}/{len(names)} modules (unmerged)"] = pruned
    print(f"[bench] pruned {len(report.layers)} of {len(names)} modules ({report.parameters_removed} parameters)")
    models["LoRA merged (merge_and_unload)"] = lora_model(rank).merge_and_unload()
    return models


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator)


@torch.no_grad()
def generate(model, ids: torch.Tensor, new_tokens: int) -> None:
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=SMOLLM2_135M["pad_token_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="batched setting (all prompts in one call)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, 2 here)")
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-min load is below this")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    set_threads(args.threads)
    transformers.logging.set_verbosity_error()

    models = variants(args.rank, args.seed)
    ids = prompts(args.prompts, args.prompt_tokens, SMOLLM2_135M["vocab_size"], args.seed)
    batched = ids[: args.batch]
    settings = {
        "batch 1": (lambda model: [generate(model, ids[i: i + 1], args.new_tokens) for i in range(len(ids))],
                    len(ids) * args.new_tokens),
        f"batch {len(batched)}": (lambda model: generate(model, batched, args.new_tokens),
                                  len(batched) * args.new_tokens),
    }
    for model in models.values():  # warm-up: first-call allocations, kernel selection
        generate(model, ids[:1], 4)
    wait_for_load(args.wait_load)
    load_before = load_text()
    seconds = {(setting, name): [] for setting in settings for name in models}
    for repeat in range(args.repeats):
        for setting, (run, _) in settings.items():
            for name, model in models.items():  # interleaved: load drift hits every variant alike
                seconds[(setting, name)] += time_call(lambda model=model, run=run: run(model), repeats=1, warmup=0)
        print(f"[bench] repeat {repeat} done, load {load_text()}")

    rows, ratios = [], {}
    names = list(models)
    for setting, (_, tokens) in settings.items():
        rate = {name: tokens / median(seconds[(setting, name)]) for name in names}
        for name in names:
            rates = [tokens / s for s in seconds[(setting, name)]]
            rows.append([setting, name, f"{rate[name]:.1f}", spread(rates), f"{rate[name] / rate[names[0]]:.2f}",
                         f"{rate[name] / rate[names[1]]:.2f}"])
        ratios[setting] = rate[names[2]] / rate[names[1]]
    parameters = sum(p.numel() for p in models["no LoRA"].parameters())
    body = "\n\n".join([
        "## Inference after pruning (`benchmarks/inference_after_pruning.py`)",
        header(load_before),
        f"- model: `LlamaConfig` with SmolLM2-135M-Instruct's shapes, built in code ({parameters / 1e6:.1f}M "
        f"parameters, random weights), fp32 CPU, eval mode; LoRA r={args.rank} on q/k/v/o (120 modules), B != 0; "
        f"pruned variant: `prune_layers` on a seeded random half. Greedy `generate`, {args.new_tokens} new tokens "
        f"forced per prompt, {args.prompts} fixed prompts of {args.prompt_tokens} random token ids; "
        f"median of {args.repeats} interleaved repeats (tokens/s = generated tokens / wall time).",
        markdown_table(["setting", "variant", "tokens/s", "spread", "vs no LoRA", "vs unmerged LoRA"], rows),
        "Pruned / unmerged speed ratio: " + ", ".join(f"{setting}: {ratio:.2f}x" for setting, ratio in ratios.items())
        + ". Pruning removes the LoRA matmuls of the pruned modules; the merged adapter costs what the "
        "plain model costs.",
    ])
    print(body)
    if not args.no_write:
        write_section("inference_after_pruning", body)


if __name__ == "__main__":
    main()
