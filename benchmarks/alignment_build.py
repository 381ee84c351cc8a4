"""Alignment build: streaming ``AlignmentSubspace.from_pretrained`` against loading both full models.

Writes a synthetic base/aligned checkpoint pair (bf16, multi-shard safetensors with an index, like
``save_pretrained(max_shard_size=...)``) of a ~1.1B-parameter ``LlamaConfig`` with TinyLlama-1.1B's
real shapes (hidden 2048, 22 layers, GQA 32/4 heads, MLP 5632, vocab 32000, untied head), tensor
by tensor, into a temporary directory; the aligned model differs from the base on q/k/v/o only.
Then, each in a fresh subprocess (so peak memory is the build's own):

- streaming: ``AlignmentSubspace.from_pretrained(base, aligned=..., target_modules=[q,k,v,o])``;
- reference: ``AutoModelForCausalLM.from_pretrained`` of base and aligned (float32, as the reference
  code does), then V = W_aligned - W_base for the same modules (kept in float32).

Peak memory: ``VmHWM`` (the kernel's high-water mark of the subprocess's RSS since exec; includes
resident mmapped checkpoint pages; ``ru_maxrss`` is not used: it keeps the RSS the child inherited
from this script's process between fork and exec, ~1.5 GB after writing the checkpoints) and peak
anonymous RSS (sampled from /proc/self/status every 5 ms: the process's own heap), both also as the
increase over the subprocess's RSS after imports. The temp directory is removed at the end.

Run: ``python benchmarks/alignment_build.py`` (about 2-3 minutes at low load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 1024**2
# glibc raises its mmap threshold after large frees, so freed temporaries become heap holes between the
# V tensors the build keeps; a fixed threshold keeps large allocations in mmap (returned on free).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SIZES = {
    # TinyLlama-1.1B shapes
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # a quick check of the script itself
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}


class MemorySampler:
    """Peak VmRSS / RssAnon / RssFile of this process, sampled from /proc/self/status (and VmHWM)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def read(cls) -> dict[str, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in cls.FIELDS:
                values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.read().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in self.read().items():
            self.peak[key] = max(self.peak[key], value)


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")


def write_pair(root: Path, size: str, shard_mib: int, seed: int = 0) -> dict:
    """Write base/ and aligned/ checkpoints tensor by tensor; return sizes for the report.

    Shards are filled in state-dict order up to ``shard_mib``; the index maps every key to its shard.
    Aligned = base + N(0, 1e-3) on q/k/v/o weights (bf16), identical elsewhere.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(size)
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in LlamaForCausalLM(config).state_dict().items()}
    groups, current, current_bytes = [], [], 0
    for key, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and current_bytes + nbytes > shard_mib * MIB:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += nbytes
    groups.append(current)
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for name in ("base", "aligned"):
        (root / name).mkdir(parents=True)
        config.save_pretrained(root / name)
    weight_map = {}
    for index, keys in enumerate(groups):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        base, aligned = {}, {}
        for key in keys:
            shape = shapes[key]
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            base[key] = tensor
            if key.rsplit(".", 2)[-2] in TARGETS:
                aligned[key] = tensor + (torch.randn(shape, generator=generator) * 1e-3).to(torch.bfloat16)
            else:
                aligned[key] = tensor
            weight_map[key] = shard
            total += tensor.numel()
        save_file(base, str(root / "base" / shard), metadata={"format": "pt"})
        save_file(aligned, str(root / "aligned" / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    for name in ("base", "aligned"):
        (root / name / "model.safetensors.index.json").write_text(json.dumps(index))
    largest = max(shapes.values(), key=lambda shape: torch.Size(shape).numel())
    targets = [shape for key, shape in shapes.items() if key.rsplit(".", 2)[-2] in TARGETS]
    largest_target = max(targets, key=lambda shape: torch.Size(shape).numel())
    return {
        "parameters": total,
        "shards": len(groups),
        "checkpoint_mib": 2 * total / MIB,
        "largest_tensor": list(largest),
        "largest_tensor_bf16_mib": 2 * torch.Size(largest).numel() / MIB,
        "largest_target": list(largest_target),
        "largest_target_fp32_mib": 4 * torch.Size(largest_target).numel() / MIB,
        "kept_fp32_mib": 4 * sum(torch.Size(shape).numel() for shape in targets) / MIB,
        "modules": len(targets),
    }


def child_streaming(base: str, aligned: str) -> dict:
    import torch

    import splora_callback.alignment as alignment_module
    from splora_callback.alignment import AlignmentSubspace

    spectral_seconds = [0.0]
    original = alignment_module.spectral_norm

    def timed_spectral_norm(matrix, *args, **kwargs):  # instrumentation only: same function, timed
        start = time.perf_counter()
        try:
            return original(matrix, *args, **kwargs)
        finally:
            spectral_seconds[0] += time.perf_counter() - start

    alignment_module.spectral_norm = timed_spectral_norm
    baseline = MemorySampler.read()
    with MemorySampler() as sampler:
        start = time.perf_counter()
        subspace = AlignmentSubspace.from_pretrained(base, aligned=aligned, target_modules=TARGETS, progress=False)
        seconds = time.perf_counter() - start
    kept = sum(v.numel() * v.element_size() for v in subspace.directions.values())
    assert all(v.dtype == torch.float32 for v in subspace.directions.values())
    return {"seconds": seconds, "spectral_seconds": spectral_seconds[0], "baseline": baseline,
            "peak": sampler.peak, "kept_bytes": kept, "modules": len(subspace)}


def child_reference(base: str, aligned: str, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    baseline = MemorySampler.read()
    with MemorySampler() as sampler, torch.no_grad():
        start = time.perf_counter()
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
        aligned_model = AutoModelForCausalLM.from_pretrained(aligned, dtype=getattr(torch, dtype))
        base_modules = dict(base_model.named_modules())
        directions = {
            name: module.weight.float() - base_modules[name].weight.float()
            for name, module in aligned_model.named_modules()
            if name.rsplit(".", 1)[-1] in TARGETS
        }
        seconds = time.perf_counter() - start
    kept = sum(v.numel() * v.element_size() for v in directions.values())
    return {"seconds": seconds, "spectral_seconds": 0.0, "baseline": baseline, "peak": sampler.peak,
            "kept_bytes": kept, "modules": len(directions)}


def run_child(mode: str, root: Path, dtype: str, threads: int | None, env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--root", str(root), "--reference-dtype", dtype]
    if threads is not None:
        command += ["--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env={**os.environ, **(env or {})})
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def child_main(mode: str, root: Path, dtype: str) -> None:
    base, aligned = str(root / "base"), str(root / "aligned")
    result = child_streaming(base, aligned) if mode == "streaming" else child_reference(base, aligned, dtype)
    result["peak_rss"] = MemorySampler.read()["VmHWM"]  # the kernel's peak RSS since exec
    print(json.dumps(result))


def excess_text(results: dict, info: dict) -> str:
    """Split the streaming build's peak over kept V into heap excess and mapped checkpoint pages."""
    streaming = results["streaming"]
    anon = (streaming["peak"]["RssAnon"] - streaming["baseline"]["RssAnon"]) / MIB - info["kept_fp32_mib"]
    mapped = (streaming["peak"]["RssFile"] - streaming["baseline"]["RssFile"]) / MIB
    text = (f"Where the streaming peak above kept V goes: {anon:.0f} MiB of heap (anonymous) beyond V, and "
            f"{mapped:.0f} MiB of file-backed pages at the peak (RSS over baseline: pages of the mapped "
            "checkpoint files and of loaded libraries; clean page cache, which the kernel can reclaim; "
            "`SafetensorsCheckpoint.read` maps a shard for one read only).")
    if "streaming-mmap" in results:
        fixed = results["streaming-mmap"]
        fixed_anon = (fixed["peak"]["RssAnon"] - fixed["baseline"]["RssAnon"]) / MIB - info["kept_fp32_mib"]
        text += (f" With glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_=131072`) the heap excess is "
                 f"{fixed_anon:.0f} MiB: the rest ({anon - fixed_anon:.0f} MiB) is allocator fragmentation "
                 "(freed per-module temporaries left as holes between the kept V tensors), not data.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--shard-mib", type=int, default=500, help="max shard size (like max_shard_size='500MB')")
    parser.add_argument("--reference-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the reference path loads the full models in (the reference code: float32)")
    parser.add_argument("--workdir", default=None, help="parent of the temp dir (default: the system temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, 2 here)")
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-min load is below this")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--allocator-row", action="store_true",
                        help=f"also run the streaming build with {ALLOCATOR_ENV} (glibc fragmentation check)")
    parser.add_argument("--child", choices=["streaming", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from _common import header, load_text, markdown_table, set_threads, wait_for_load, write_section

    set_threads(args.threads)
    if args.child:
        child_main(args.child, Path(args.root), args.reference_dtype)
        return

    root = Path(tempfile.mkdtemp(prefix="splora-bench-build-", dir=args.workdir))
    try:
        start = time.perf_counter()
        info = write_pair(root, args.size, args.shard_mib)
        write_seconds = time.perf_counter() - start
        print(f"[bench] wrote {info['parameters'] / 1e9:.2f}B-parameter pair ({info['shards']} shards each) "
              f"in {write_seconds:.0f} s")
        wait_for_load(args.wait_load)
        load_before = load_text()
        results = {mode: run_child(mode, root, args.reference_dtype, args.threads) for mode in ("streaming", "reference")}
        if args.allocator_row:
            results["streaming-mmap"] = run_child("streaming", root, args.reference_dtype, args.threads, ALLOCATOR_ENV)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    bound_mib = 2 * info["largest_tensor_bf16_mib"] + info["kept_fp32_mib"]
    rows = []
    for mode, result in results.items():
        baseline = result["baseline"]
        label = {
            "streaming": "streaming `AlignmentSubspace.from_pretrained`",
            "streaming-mmap": "streaming, `MALLOC_MMAP_THRESHOLD_=131072`",
            "reference": f"reference: 2 x `from_pretrained` ({args.reference_dtype}) + V",
        }[mode]
        rows.append([
            label,
            f"{result['seconds']:.1f}",
            f"{result['spectral_seconds']:.1f}" if mode != "reference" else "- (not computed)",
            f"{result['peak_rss'] / MIB:.0f}",
            f"{(result['peak_rss'] - baseline['VmRSS']) / MIB:.0f}",
            f"{(result['peak']['RssAnon'] - baseline['RssAnon']) / MIB:.0f}",
            f"{result['peak']['RssFile'] / MIB:.0f}",
            f"{result['kept_bytes'] / MIB:.0f}",
        ])
    streaming = results["streaming"]
    increase = (streaming["peak_rss"] - streaming["baseline"]["VmRSS"]) / MIB
    anon_increase = (streaming["peak"]["RssAnon"] - streaming["baseline"]["RssAnon"]) / MIB
    reference = results["reference"]
    body = "\n\n".join([
        "## Alignment build memory and time (`benchmarks/alignment_build.py`)",
        header(load_before),
        f"- checkpoint pair: synthetic `LlamaConfig` with TinyLlama-1.1B shapes ({SIZES[args.size]}), "
        f"{info['parameters'] / 1e9:.2f}B parameters, bf16, {info['shards']} shards of <= {args.shard_mib} MiB "
        f"+ index per checkpoint ({info['checkpoint_mib'] / 1024:.1f} GiB each), written in {write_seconds:.0f} s "
        "(freshly written, so read from the page cache: disk-cold reads would add the read time of "
        f"{2 * info['checkpoint_mib'] / 1024:.1f} GiB for the reference path and of the q/k/v/o tensors only "
        "for the streaming one); aligned = base + N(0, 1e-3) on q/k/v/o.",
        f"- {info['modules']} modules (q/k/v/o x {SIZES[args.size]['num_hidden_layers']} layers); each in a fresh "
        "subprocess; peak RSS = `VmHWM`; 'over baseline' subtracts the subprocess's RSS after imports; "
        "anonymous = RssAnon sampled every 5 ms (own heap; RSS also counts resident pages of the mmapped "
        "shards, RssFile, which the kernel can drop).",
        markdown_table(
            ["method", "wall s", "of which spectral norms s", "peak RSS MiB", "peak RSS over baseline MiB",
             "peak anon over baseline MiB", "peak file-backed RSS MiB", "kept V MiB (fp32)"],
            rows,
        ),
        f"Target: build peak < 2 x largest single tensor ({info['largest_tensor']} bf16, "
        f"{info['largest_tensor_bf16_mib']:.0f} MiB; the largest q/k/v/o tensor the build reads is "
        f"{info['largest_target']}, {info['largest_target_fp32_mib']:.0f} MiB in fp32) + kept V "
        f"({info['kept_fp32_mib']:.0f} MiB) = {bound_mib:.0f} MiB over baseline. Measured: "
        f"{increase:.0f} MiB peak RSS over baseline ({'met' if increase < bound_mib else 'MISSED'}), "
        f"{anon_increase:.0f} MiB anonymous ({'met' if anon_increase < bound_mib else 'MISSED'}). "
        f"Reference path: {(reference['peak_rss'] - reference['baseline']['VmRSS']) / MIB:.0f} MiB over baseline, "
        f"{reference['peak_rss'] / max(streaming['peak_rss'], 1):.1f}x the streaming peak RSS.",
        excess_text(results, info),
    ])
    print(body)
    if not args.no_write:
        write_section("alignment_build", body)


if __name__ == "__main__":
    main()
