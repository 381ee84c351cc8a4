"""Scoring speed: low-rank E-DIEM + cosine (``score_updates``) against the dense reference method.

Adapters shaped like Llama-2-7B (q/k/v/o all 4096 x 4096) and like a GQA 7-8B model (q/o 4096 x 4096,
k/v 1024 x 4096), 32 layers = 128 modules, LoRA ranks 8, 16, 64; V and LoRA factors are synthetic
random float32 tensors generated here. By default a pool of ``--v-pool`` distinct V tensors per
shape is reused across modules (each 4096 x 4096 V is 64 MB, twice the 32 MB L3 cache, so reuse
saves memory, not time; ``--v-pool 0`` gives every module its own V: 8.6 GB for Llama-2-7B).

- low-rank: one ``score_updates(updates, AlignmentSubspace(...), "ediem", null="layers")`` call
  over the whole adapter (E-DIEM, cosine and the signed diagnostic in one pass);
- dense (what the reference code does): per module ``C = V V^T / ||V||_F`` (m, m), ``dW = s B A``,
  ``P = C dW``, then cosine and distance; timed on ``--dense-modules`` modules per shape and
  extrapolated to the whole adapter (it takes minutes per adapter);
- spectral norms ``||V||_2`` (computed once, when the alignment subspace is built): timed on a few
  modules per shape and extrapolated.

Run: ``python benchmarks/scoring_speed.py`` (about 2-3 minutes at low load). Prints the tables and
writes them into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

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

from splora_callback.alignment import AlignmentSubspace
from splora_callback.layers import LoraUpdate
from splora_callback.metrics import (
    frobenius_norm,
    layer_geometry,
    spectral_norm,
)
from splora_callback.scoring import score_updates

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
# (out_features m, in_features n) per module kind
MODELS = {
    "llama2-7b": {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096)},
    "gqa-8b": {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)},
}
SCALING_ALPHA = 16  # PEFT scaling = alpha / r
V_STD = 1e-3  # entries of V: alignment updates are small next to the weights


@dataclass
class Adapter:
    updates: list[LoraUpdate]
    alignment: AlignmentSubspace
    pool: dict[tuple[int, int], list[torch.Tensor]]  # shape -> distinct V tensors

    def count(self, shape: tuple[int, int]) -> int:
        return sum(1 for update in self.updates if update.shape == shape)


def make_pool(shapes: set[tuple[int, int]], size: int, generator: torch.Generator) -> dict:
    return {shape: [torch.randn(shape, generator=generator) * V_STD for _ in range(size)] for shape in shapes}


def make_adapter(model: str, layers: int, rank: int, pool: dict, distinct: bool, seed: int) -> Adapter:
    """Synthetic LoRA updates and alignment subspace for ``layers`` x q/k/v/o modules.

    Spectral norms of pooled V are computed for real (block power iteration, once per pool tensor);
    with distinct V, the Marchenko-Pastur edge ``std (sqrt(m) + sqrt(n))`` stands in for them (the
    value does not change the timing).
    """
    generator = torch.Generator().manual_seed(seed + rank)
    spectral_of = {id(v): spectral_norm(v) for tensors in pool.values() for v in tensors} if not distinct else {}
    updates, directions, frobenius, spectral = [], {}, {}, {}
    counters: dict[tuple[int, int], int] = {}
    for layer in range(layers):
        for kind in KINDS:
            m, n = MODELS[model][kind]
            name = f"model.layers.{layer}.self_attn.{kind}"
            if distinct:
                direction = torch.randn((m, n), generator=generator) * V_STD
                spectral[name] = V_STD * (math.sqrt(m) + math.sqrt(n))
            else:
                index = counters.get((m, n), 0)
                counters[(m, n)] = index + 1
                tensors = pool[(m, n)]
                direction = tensors[index % len(tensors)]
                spectral[name] = spectral_of[id(direction)]
            directions[name] = direction
            frobenius[name] = frobenius_norm(direction)
            lora_a = torch.randn((rank, n), generator=generator) / math.sqrt(n)
            lora_b = torch.randn((m, rank), generator=generator) * 1e-3
            updates.append(LoraUpdate(name, lora_a, lora_b, SCALING_ALPHA / rank))
    return Adapter(updates, AlignmentSubspace(directions, frobenius, spectral), pool)


@torch.no_grad()
def dense_geometry(direction: torch.Tensor, update: LoraUpdate, frobenius: float, spectral: float) -> tuple[float, float]:
    """The reference code's method: materialise C (m, m) and C @ dW, float32. Returns (distance, cosine)."""
    alignment_matrix = direction @ direction.T / frobenius  # C, (m, m)
    delta = update.scaling * update.lora_B @ update.lora_A  # dW, (m, n)
    projected = alignment_matrix @ delta  # P = C dW, (m, n)
    delta_norm = torch.linalg.vector_norm(delta)
    cosine = float(torch.sum(projected * delta) / (torch.linalg.vector_norm(projected) * delta_norm))
    soft = projected * (frobenius / spectral**2)  # Ct dW = C dW ||V||_F / ||V||_2^2
    distance = float(torch.linalg.vector_norm(soft - delta) / delta_norm)
    return distance, cosine


def dense_adapter_estimate(adapter: Adapter, modules_per_shape: int) -> tuple[dict, float, float]:
    """Time the dense method on a few modules of each shape; return per-shape seconds, total, max error.

    The error is the largest |dense - low-rank| over distance and cosine of the timed modules.
    """
    per_shape, total, error = {}, 0.0, 0.0
    for shape in sorted({update.shape for update in adapter.updates}, reverse=True):
        chosen = [update for update in adapter.updates if update.shape == shape][:modules_per_shape]
        seconds = []
        for update in chosen:
            direction = adapter.alignment.directions[update.name]
            frob, spec = adapter.alignment.frobenius_norms[update.name], adapter.alignment.spectral_norms[update.name]
            start = time.perf_counter()
            distance, cosine = dense_geometry(direction, update, frob, spec)
            seconds.append(time.perf_counter() - start)
            fast = layer_geometry(
                direction, update.lora_A, update.lora_B, update.scaling,
                alignment_spectral_norm=spec, alignment_frobenius_norm=frob,
            )
            error = max(error, abs(distance - fast.relative_distance), abs(cosine - fast.cosine))
        per_shape[shape] = median(seconds)
        total += per_shape[shape] * adapter.count(shape)
    return per_shape, total, error


def float64_check(adapter: Adapter) -> tuple[float, float, str]:
    """|error| of dense float32 and of low-rank float32 against dense float64, on one module.

    Uses the smallest module shape (the float64 (m, m) product is slow). Returns (dense, low-rank, shape).
    """
    update = min(adapter.updates, key=lambda u: u.shape[0] * u.shape[1])
    direction = adapter.alignment.directions[update.name]
    frob, spec = adapter.alignment.frobenius_norms[update.name], adapter.alignment.spectral_norms[update.name]
    exact = dense_geometry(direction.double(), LoraUpdate(update.name, update.lora_A.double(), update.lora_B.double(),
                                                          update.scaling), frob, spec)
    dense = dense_geometry(direction, update, frob, spec)
    fast = layer_geometry(direction, update.lora_A, update.lora_B, update.scaling,
                          alignment_spectral_norm=spec, alignment_frobenius_norm=frob)
    dense_error = max(abs(dense[0] - exact[0]), abs(dense[1] - exact[1]))
    fast_error = max(abs(fast.relative_distance - exact[0]), abs(fast.cosine - exact[1]))
    return dense_error, fast_error, f"{update.shape[0]}x{update.shape[1]}"


def machine_rates(pool: dict) -> tuple[float, float]:
    """Measured read bandwidth (GB/s, summing the V pool) and sgemm rate (GFLOP/s, 2048^3)."""
    tensors = [v for values in pool.values() for v in values]
    nbytes = sum(v.numel() * v.element_size() for v in tensors)
    seconds = median(time_call(lambda: [v.sum() for v in tensors], repeats=3))
    square = torch.randn(2048, 2048)
    gemm = median(time_call(lambda: square @ square, repeats=3))
    return nbytes / seconds / 1e9, 2 * 2048**3 / gemm / 1e9


def spectral_seconds(tensors: list[torch.Tensor]) -> float:
    """Median seconds per module of ``metrics.spectral_norm``."""
    seconds = []
    for v in tensors:
        start = time.perf_counter()
        spectral_norm(v)
        seconds.append(time.perf_counter() - start)
    return median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 64])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--v-pool", type=int, default=8, help="distinct V tensors per shape (0: one per module)")
    parser.add_argument("--repeats", type=int, default=1, help="timed whole-adapter scoring calls per config")
    parser.add_argument("--dense-modules", type=int, default=1, help="modules per shape timed with the dense method")
    parser.add_argument("--spectral-modules", type=int, default=1, help="modules per shape timed for the spectral norm")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, 2 here)")
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-min load is below this")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    set_threads(args.threads)

    wait_for_load(args.wait_load)
    load_before = load_text()
    generator = torch.Generator().manual_seed(0)
    distinct = args.v_pool == 0
    rows, dense_rows, spectral_rows, floor_rows, accuracy_rows, verdicts = [], [], [], [], [], []
    spectral_by_shape = {}
    for model in args.models:
        shapes = sorted(set(MODELS[model].values()), reverse=True)
        pool = make_pool(set(shapes), max(args.v_pool, args.spectral_modules, 1), generator)
        bandwidth, gemm_rate = machine_rates(pool)
        for shape in shapes:
            if shape not in spectral_by_shape:  # the same shape in two models: timed once
                spectral_by_shape[shape] = spectral_seconds(pool[shape][: args.spectral_modules])
            per_module = spectral_by_shape[shape]
            count = args.layers * sum(1 for kind in KINDS if MODELS[model][kind] == shape)
            spectral_rows.append([model, f"{shape[0]}x{shape[1]}", f"{per_module:.2f}", count,
                                  f"{per_module * count:.0f}"])
        # dense: timed once per model, at the largest rank (beyond forming dW, < 1 %, it does not depend on r)
        dense_adapter = make_adapter(model, args.layers, max(args.ranks), pool, False if pool else distinct, seed=1)
        dense_per_shape, dense_total, dense_diff = dense_adapter_estimate(dense_adapter, args.dense_modules)
        for shape, per_module in dense_per_shape.items():
            dense_rows.append([model, f"{shape[0]}x{shape[1]}", f"{per_module:.2f}", dense_adapter.count(shape),
                               f"{per_module * dense_adapter.count(shape):.0f}", f"{dense_diff:.1e}"])
        if min(update.shape[0] for update in dense_adapter.updates) <= 1024:  # float64 (m, m) stays cheap
            dense_error, fast_error, checked = float64_check(dense_adapter)
            accuracy_rows.append([model, max(args.ranks), checked, f"{dense_error:.1e}", f"{fast_error:.1e}"])
        del dense_adapter
        if distinct:
            pool = {}
        for rank in args.ranks:
            adapter = make_adapter(model, args.layers, rank, pool, distinct, seed=1)
            modules = len(adapter.updates)
            score_updates(adapter.updates[:4], adapter.alignment, "ediem", null="layers")  # warm-up: one layer
            seconds = time_call(lambda adapter=adapter: score_updates(adapter.updates, adapter.alignment, "ediem",
                                                                      null="layers"), repeats=args.repeats, warmup=0)
            low = median(seconds)
            v_bytes = sum(update.shape[0] * update.shape[1] * 4 for update in adapter.updates)
            flops = sum(4 * update.shape[0] * update.shape[1] * rank for update in adapter.updates)
            floor = max(2 * v_bytes / (bandwidth * 1e9), flops / (gemm_rate * 1e9))
            rows.append([model, rank, modules, f"{low / modules * 1e3:.0f}", f"{low:.2f}", spread(seconds),
                         f"{dense_total:.0f}", f"{dense_total / low:.0f}x"])
            floor_rows.append([model, rank, f"{2 * v_bytes / 1e9:.1f}", f"{flops / 1e9:.0f}", f"{floor:.2f}",
                               f"{2 * v_bytes / low / 1e9:.1f}", f"{flops / low / 1e9:.1f}",
                               f"{bandwidth:.1f}", f"{gemm_rate:.0f}"])
            verdicts.append(f"{model} r={rank}: {low:.1f} s (< 15 s: {'met' if low < 15 else 'MISSED'}), "
                            f"{dense_total / low:.0f}x dense (>= 30x: {'met' if dense_total / low >= 30 else 'MISSED'})")
            print(f"[bench] {model} r={rank}: low-rank {low:.2f} s, "
                  f"dense (extrapolated) {dense_total:.0f} s, load {load_text()}")
            del adapter
    v_note = (f"a pool of {args.v_pool} distinct V tensors per shape, reused across modules" if not distinct
              else "a distinct V per module")
    body = "\n\n".join([
        "## Scoring speed (`benchmarks/scoring_speed.py`)",
        header(load_before),
        f"- setup: {args.layers} layers x q/k/v/o, synthetic float32 V ({v_note}; a 4096x4096 V is 64 MB, "
        "twice the L3 cache, so reuse does not make reads cheaper), LoRA A, B random, scaling alpha/r with "
        f"alpha={SCALING_ALPHA}. Low-rank: one `score_updates(..., 'ediem', null='layers')` call over the whole "
        f"adapter (E-DIEM + cosine + signed diagnostic), median of {args.repeats} call(s). Dense: the reference "
        f"method (C = V V^T / norm_F(V) materialised (m, m), then C @ dW), timed on {args.dense_modules} module(s) "
        "per shape at the largest rank and extrapolated to all modules (minutes per adapter).",
        markdown_table(
            ["model", "r", "modules", "low-rank ms/module", "low-rank adapter s", "spread s",
             "dense adapter s (extrap.)", "speed-up"],
            rows,
        ),
        "Targets (whole adapter < 15 s, >= 30x dense): " + "; ".join(verdicts) + ".",
        "`metrics.layer_geometry` computes `V^T X` as `(X^T V)^T` (same flops): MKL's sgemm with a "
        "transposed (m, n) operand and r <= 8 columns ran 5-20x below memory bandwidth on this CPU (14.7 s "
        "for the r=8 Llama-2-7B adapter in the previous run of this script, before the change).",
        "Arithmetic floor of one low-rank call: each module reads V twice (`V^T X`, then `V (V^T X)`: the "
        "second product needs the whole first result, and a 64 MB V does not stay in cache) and does two "
        "(m,n)x(n,r) products (4 m n r flops). Floor = max(bytes / measured read bandwidth, "
        "flops / measured sgemm rate), both measured in this run (read: `V.sum()` over the V pool; sgemm: "
        "2048^3).",
        markdown_table(
            ["model", "r", "V bytes read GB", "GFLOP", "floor s", "achieved GB/s", "achieved GFLOP/s",
             "machine read GB/s", "machine sgemm GFLOP/s"],
            floor_rows,
        ),
        f"Dense method per module (timed at r={max(args.ranks)}; 'max abs diff' = largest |dense float32 - "
        "low-rank| of distance and cosine on the timed modules):",
        markdown_table(["model", "shape", "dense s/module", "modules", "adapter s (extrap.)", "max abs diff"],
                       dense_rows),
        "Accuracy against the dense method in float64 on one module (max abs error of distance and cosine):",
        markdown_table(["model", "r", "shape", "dense float32", "low-rank float32 (fp64 traces)"], accuracy_rows),
        "Spectral norms (`metrics.spectral_norm`: 30 block power iterations, block 8; computed once per module "
        f"when the alignment subspace is built, not per scoring call), timed on {args.spectral_modules} "
        "module(s) per shape and extrapolated (`M^T Y` computed as `(Y^T M)^T`, 4.6x faster than the "
        "transposed product at 4096x4096 in the previous run):",
        markdown_table(["model", "shape", "s/module", "modules", "adapter s (extrap.)"], spectral_rows),
    ])
    print(body)
    if not args.no_write:
        write_section("scoring_speed", body)

if __name__ == "__main__":
    main()
