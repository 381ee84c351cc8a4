"""Training overhead of ``SPLoRACallback``: Trainer wall time with and without it, same seed and data.

A small Llama (built in code; the weights are the "aligned" model, a saved copy minus a small q/k/v/o
perturbation is the "base" checkpoint) with LoRA on q/k/v/o is trained on CPU for ``--steps``
optimizer steps, ``--repeats`` times with and ``--repeats`` times without
``SPLoRACallback(SPLoRAConfig(base_model=..., action="none"))`` at its default scoring interval, runs
interleaved (with, without, with, ...) so that load drift hits both alike. Reported: median and
spread of ``trainer.train()`` wall time, their ratio (target <= 1.03), the callback's own breakdown
(alignment build at ``on_train_begin``, scoring calls from its history, the rest) and the cost of
one direct ``score_layers`` call.

Run: ``python benchmarks/training_overhead.py`` (about 2-3 minutes at low load).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from _common import (  # noqa: E402
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
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from splora_callback.alignment import AlignmentSubspace  # noqa: E402
from splora_callback.config import SPLoRAConfig  # noqa: E402
from splora_callback.scoring import score_layers  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=2048, max_position_embeddings=256, tie_word_embeddings=False)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences (causal LM: labels = input ids)."""

    def __init__(self, count: int, length: int, vocab: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


EVENTS = ("on_train_begin", "on_step_end", "on_save", "on_log", "on_train_end", "on_epoch_end", "on_evaluate")


def _timed(handler, event: str, totals: dict[str, float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return handler(*args, **kwargs)
        finally:
            totals[event] = totals.get(event, 0.0) + time.perf_counter() - start

    return wrapper


def aligned_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MODEL))


def write_base(path: Path) -> None:
    """The 'unaligned base': the model minus N(0, 1e-3) on q/k/v/o (so V = that perturbation)."""
    model = aligned_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                module.weight -= torch.randn(module.weight.shape, generator=generator) * 1e-3
    model.save_pretrained(path)


def peft_model(rank: int):
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(aligned_model(), config)


def train_once(workdir: Path, dataset, steps: int, batch: int, rank: int, mode: str) -> tuple[float, dict]:
    """One Trainer run; returns ``trainer.train()`` seconds and the callback's breakdown (if used).

    ``mode``: ``"without"`` (no callback), ``"callback"`` (builds V from the base checkpoint at
    ``on_train_begin``), ``"cached"`` (``alignment_cache`` written by an earlier run: loads V).
    """
    from splora_callback.callback import SPLoRACallback

    callback = None
    if mode != "without":
        cache = str(workdir / "alignment.safetensors") if mode == "cached" else None
        callback = SPLoRACallback(SPLoRAConfig(base_model=str(workdir / "base"), action="none", alignment_cache=cache))
    events: dict[str, float] = {}
    if callback is not None:  # time every event handler of the callback (instrumentation only)
        for event in EVENTS:
            setattr(callback, event, _timed(getattr(callback, event), event, events))
    output = workdir / mode
    args = TrainingArguments(
        output_dir=str(output), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
        logging_steps=10**9, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=peft_model(rank), args=args, train_dataset=dataset,
                      callbacks=[callback] if callback else None)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shutil.rmtree(output, ignore_errors=True)
    info = {}
    if callback is not None:
        info = {"events": events, "build": events.get("on_train_begin", 0.0), "scoring": [entry["seconds"] for entry in callback.history],
                "steps": [entry["step"] for entry in callback.history],
                "interval": callback.config.score_every_n_steps}
    return seconds, info


def break_even_text(infos: dict, without: float) -> str:
    """Fixed per-run cost (train begin + train end) against the per-step share of the scoring calls."""
    lines = []
    labels = {"callback": "building V", "cached": "with a warm alignment cache"}
    for mode, label in ((mode, labels[mode]) for mode in infos if mode in labels):
        fixed = median([info["events"].get("on_train_begin", 0.0) + info["events"].get("on_train_end", 0.0)
                        for info in infos[mode]])
        steady = median([sum(info["scoring"]) for info in infos[mode]]) / without
        if steady < 0.03:
            lines.append(f"{label}: fixed {fixed:.2f} s per run, scoring {steady:.2%} of training time, so the "
                         f"ratio is <= 1.03 for any run longer than {fixed / (0.03 - steady):.0f} s of training")
        else:
            lines.append(f"{label}: scoring alone costs {steady:.1%} of training time at this model size")
    return ("Fixed per-run costs (train begin + train end, independent of the number of steps) against "
            "the steady cost of scoring: " + "; ".join(lines) + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["without", "callback", "cached"],
                        choices=["without", "callback", "cached"], help="'without' is always run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, 2 here)")
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-min load is below this")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    set_threads(args.threads)
    logging.getLogger("splora_callback").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()

    if importlib.util.find_spec("splora_callback.callback") is None:
        raise SystemExit("splora_callback/callback.py does not exist yet: nothing to measure.")
    modes = ["without", *(mode for mode in args.modes if mode != "without")]
    workdir = Path(tempfile.mkdtemp(prefix="splora-bench-train-"))
    try:
        write_base(workdir / "base")
        dataset = TokenDataset(args.steps * args.batch, args.seq, MODEL["vocab_size"])
        train_once(workdir, dataset, 5, args.batch, args.rank, "cached")  # warm-up; writes the cache
        wait_for_load(args.wait_load)
        load_before = load_text()
        seconds = {mode: [] for mode in modes}
        infos = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            for mode in modes:  # interleaved: load drift hits every mode alike
                wall, info = train_once(workdir, dataset, args.steps, args.batch, args.rank, mode)
                seconds[mode].append(wall)
                infos[mode].append(info)
            print(f"[bench] repeat {repeat}: " + ", ".join(f"{m} {seconds[m][-1]:.2f} s" for m in modes)
                  + f", load {load_text()}")
        # one direct scoring call, LoRA B non-zero (as after some training)
        model = peft_model(args.rank)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 1e-2)
        alignment = AlignmentSubspace.from_pretrained(str(workdir / "base"), model=model, progress=False)
        call = time_call(lambda: score_layers(model, alignment, "ediem", null="layers"), repeats=5)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    without = median(seconds["without"])
    step_seconds = without / args.steps
    modules = 4 * MODEL["num_hidden_layers"]
    interval = infos[modes[1]][0]["interval"]
    rows, parts = [["without callback", f"{without:.2f}", spread(seconds["without"]), "1", "-"]], []
    verdicts = []
    labels = {"callback": "with callback (builds V at train begin)", "cached": "with callback, `alignment_cache` warm"}
    for mode, label in ((mode, labels[mode]) for mode in modes[1:]):
        ratio = median(seconds[mode]) / without
        pairs = [w / wo for w, wo in zip(seconds[mode], seconds["without"], strict=True)]
        rows.append([label, f"{median(seconds[mode]):.2f}", spread(seconds[mode]), f"{ratio:.3f}", spread(pairs)])
        verdicts.append(f"{label}: {ratio:.3f} ({'met' if ratio <= 1.03 else 'MISSED'})")
        builds = [info["build"] for info in infos[mode]]
        scoring = [sum(info["scoring"]) for info in infos[mode]]
        ends = [info["events"].get("on_train_end", 0.0) for info in infos[mode]]
        handlers = [sum(info["events"].values()) for info in infos[mode]]
        calls = len(infos[mode][0]["scoring"])
        parts.append([label, f"{median(builds):.2f} ({median(builds) / without:.1%})",
                      f"{calls} x {median(scoring) / calls * 1e3:.0f} ms ({median(scoring) / without:.1%})",
                      f"{median(ends):.2f} ({median(ends) / without:.1%})",
                      f"{median(handlers):.2f} ({median(handlers) / without:.1%})"])
    body = "\n\n".join([
        "## Training overhead (`benchmarks/training_overhead.py`)",
        header(load_before),
        f"- setup: `LlamaConfig`({MODEL}), {sum(p.numel() for p in aligned_model().parameters()) / 1e6:.1f}M "
        f"parameters, LoRA r={args.rank} on q/k/v/o ({modules} modules), batch {args.batch} x {args.seq} random "
        f"tokens, {args.steps} optimizer steps ({step_seconds * 1e3:.0f} ms each), fp32 CPU, `report_to=[]`; "
        "callback: `SPLoRACallback(SPLoRAConfig(base_model=<saved base>, action='none'))` at its default "
        f"interval of {interval} steps (scored at steps {infos[modes[1]][0]['steps']}); {args.repeats} "
        "interleaved repeats of each mode after one untimed warm-up run. Wall time = `trainer.train()`.",
        markdown_table(["", "median s", "spread s", "ratio to without", "per-repeat ratios"], rows),
        "Where the callback's time goes (medians over runs; every handler timed):",
        markdown_table(["", "on_train_begin s (alignment build)", "scoring calls (callback history)",
                        "on_train_end s (final report)", "all callback handlers s"], parts),
        "Shares are of one run without the callback.",
        f"One direct `score_layers(model, alignment, 'ediem')` call ({modules} modules): "
        f"{median(call) * 1e3:.1f} ms (spread {spread([c * 1e3 for c in call])} ms), against "
        f"{step_seconds * 1e3:.0f} ms per training step: scoring every {interval} steps costs "
        f"{median(call) / (interval * step_seconds):.2%} of training time. Target ratio <= 1.03: "
        + "; ".join(verdicts) + ".",
        break_even_text(infos, without),
    ])
    print(body)
    if not args.no_write:
        write_section("training_overhead", body)

if __name__ == "__main__":
    main()
