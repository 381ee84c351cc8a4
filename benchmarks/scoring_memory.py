"""Accelerator memory the callback adds for V, and the scoring time, per ``alignment_placement`` (spec 5b).

Adapters shaped like Llama-2-7B (q/k/v/o 4096 x 4096) and a GQA 8B model (k/v 1024 x 4096), 32 layers
= 128 modules, LoRA r=8 (and ``--ranks``), synthetic float32 V from a pool of distinct tensors per
shape (as ``scoring_speed.py``). One ``score_updates`` call per placement:

- ``resident`` (the behaviour before): all of V on the scoring device;
- ``stream`` (the default): V kept on the CPU, each module's V copied to the scoring device when it
  is scored and dropped after. No GPU here: the scoring device is emulated on the CPU
  (``StreamedDirections(always_copy=True)``): every copy is a real allocation and memcpy, counted by
  ``DeviceAccount`` (bytes placed, peak held at once). On a GPU the copy is a host-to-device transfer
  instead; its time is estimated from the bytes (not measured: no GPU was lent);
- ``cpu``: V kept and scored on the CPU; on a CPU-only machine this *is* ``resident``.

Also counted: the O(r) products a scoring call allocates per module ((m, r) and (n, r) float32).

Run: ``python benchmarks/scoring_memory.py`` (about a minute at low load; 0.5 GB of RAM for the pool).
"""

from __future__ import annotations

import argparse

import torch
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
from scoring_speed import MODELS, make_adapter, make_pool

from splora_callback.alignment import AlignmentSubspace
from splora_callback.memory import StreamedDirections
from splora_callback.scoring import score_updates

GIB, MIB = 1024**3, 1024**2
PCIE_GBPS = (12.0, 25.0)  # pageable and pinned host-to-device bandwidth of a PCIe 4.0 x16 GPU (typical)
TARGET_TIME_RATIO = 2.0


def streamed_copy(alignment: AlignmentSubspace) -> AlignmentSubspace:
    """The same subspace, its directions streamed to an emulated scoring device (a copy per access)."""
    directions = StreamedDirections(alignment.directions, "cpu", always_copy=True)
    return AlignmentSubspace(directions, alignment.frobenius_norms, alignment.spectral_norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--v-pool", type=int, default=2, help="distinct V tensors per shape")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved scoring calls per placement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--wait-load", type=float, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    set_threads(args.threads)
    wait_for_load(args.wait_load)
    load_before = load_text()
    generator = torch.Generator().manual_seed(0)
    rows, verdicts = [], []
    for model in args.models:
        pool = make_pool(set(MODELS[model].values()), args.v_pool, generator)
        for rank in args.ranks:
            adapter = make_adapter(model, args.layers, rank, pool, False, seed=1)
            resident, streamed = adapter.alignment, streamed_copy(adapter.alignment)
            account = streamed.directions.account
            score_updates(adapter.updates[:4], resident, "ediem")  # warm-up
            times = {"resident": [], "stream": []}
            for _ in range(args.repeats):  # interleaved: load drift hits both alike
                times["resident"] += time_call(lambda a=adapter, v=resident: score_updates(a.updates, v, "ediem"), 1, 0)
                account.reset_peak()
                times["stream"] += time_call(lambda a=adapter, v=streamed: score_updates(a.updates, v, "ediem"), 1, 0)
            moved, peak, live = account.moved, account.peak, account.live  # of the last streamed call
            check = score_updates(adapter.updates, streamed, "ediem").to_dict()
            assert check == score_updates(adapter.updates, resident, "ediem").to_dict(), "streamed scores differ"
            v_total = sum(update.shape[0] * update.shape[1] * 4 for update in adapter.updates)
            largest = max(update.shape[0] * update.shape[1] * 4 for update in adapter.updates)
            products = max(4 * rank * 4 * (update.shape[0] + update.shape[1]) for update in adapter.updates)
            ratio = median(times["stream"]) / median(times["resident"])
            assert moved == v_total and live == 0, (moved, v_total, live)  # each module's V once, all freed
            transfer = [moved / (rate * 1e9) for rate in PCIE_GBPS]
            modules = len(adapter.updates)
            rows.append([model, rank, modules, f"{v_total / GIB:.2f} GiB", f"{peak / MIB:.0f} MiB",
                         f"{products / MIB:.2f} MiB", f"{median(times['resident']):.2f}",
                         f"{median(times['stream']):.2f}", spread(times["stream"]), f"{ratio:.2f}",
                         f"{transfer[1]:.2f}-{transfer[0]:.2f}"])
            memory_met = peak <= largest
            verdicts.append(f"{model} r={rank}: memory {'met' if memory_met else 'MISSED'} (peak {peak / MIB:.0f} MiB "
                            f"of V = one module's {largest / MIB:.0f} MiB, vs {v_total / GIB:.2f} GiB resident); "
                            f"time with the emulated copy {ratio:.2f}x resident "
                            f"({'within' if ratio <= TARGET_TIME_RATIO else 'over'} {TARGET_TIME_RATIO:g}x)")
            print(f"[bench] {model} r={rank}: resident {median(times['resident']):.2f} s, stream "
                  f"{median(times['stream']):.2f} s, peak {peak / MIB:.0f} MiB, load {load_text()}")
            del adapter, resident, streamed
    body = "\n\n".join([
        "## Accelerator memory for V and scoring time per placement (`benchmarks/scoring_memory.py`)",
        header(load_before),
        f"- setup: {args.layers} layers x q/k/v/o, synthetic float32 V (a pool of {args.v_pool} per shape), one "
        f"`score_updates(..., 'ediem')` call per placement, {args.repeats} interleaved repeats (median). "
        "`stream` on an emulated scoring device: every access copies that module's V "
        "(`StreamedDirections(always_copy=True)`), and `DeviceAccount` counts the bytes placed and the peak held. "
        "Scores identical to `resident` (checked, bit for bit).",
        markdown_table(
            ["model", "r", "modules", "V on the device, resident", "V on the device, stream (peak)",
             "O(r) products per module", "resident s", "stream s (CPU copy)", "stream spread s",
             "time ratio", "est. GPU transfer s/call"],
            rows,
        ),
        "Targets (at most one module's V plus O(r) on the accelerator; scoring time within "
        f"{TARGET_TIME_RATIO:g}x of resident): " + "; ".join(verdicts) + ". On a CPU-only run `stream` makes no "
        "copy at all (V is already where the LoRA weights are), so its time there is resident's by construction; "
        "the emulated copy here is a fresh 64 MiB allocation and memcpy per module (page faults included), an "
        "upper bound of what a CPU pays, not what a GPU pays.",
        "What these numbers are: no GPU was lent to this measurement, so no `torch.cuda.max_memory_allocated` "
        "exists yet. The device bytes are counted exactly (every copy streaming makes is registered and its "
        "release tracked); the times are CPU times, where a copy is a host memcpy. On a GPU each scored module "
        "costs a host-to-device copy of its V instead: the last column is that volume at "
        f"{PCIE_GBPS[1]:g} (pinned) to {PCIE_GBPS[0]:g} (pageable) GB/s, an estimate that is not measured; the GPU "
        "matmuls themselves are a few ms per call. A GPU run of this script should replace it "
        "(`alignment_placement='resident'` stays available where V fits: fastest).",
    ])
    print(body)
    if not args.no_write:
        write_section("scoring_memory", body)


if __name__ == "__main__":
    main()
