"""Worker that tests/test_distributed.py launches with ``torchrun --nproc_per_node 2`` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/distributed_worker.py CHECK[,CHECK...] --data DIR --out DIR

CHECK: ``score`` (DDP-style replicas), ``fsdp2`` (``fully_shard``), ``fsdp1`` / ``fsdp1-flat`` (FSDP v1
with / without ``use_orig_params``),
``deepspeed`` (ZeRO-3), ``trainer`` (a DDP ``Trainer`` with ``SPLoRACallback``), ``bench`` (timing).
``--data`` holds ``base/``, ``aligned/`` and ``adapter/`` written by the test. Every rank writes its
results as ``<check>-rank<r>.json`` into ``--out``; the test compares them with a single process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py

from splora_callback import AlignmentSubspace, select_layers  # noqa: E402
from splora_callback._io import atomic_write_text  # noqa: E402
from splora_callback.distributed import (  # noqa: E402
    alignment_for_rank,
    apply_action_distributed,
    layer_slice,
    on_main,
    save_acted_adapter_distributed,
    score_layers_distributed,
)
from splora_callback.layers import lora_updates_from_model  # noqa: E402
from splora_callback.processes import all_gather_object, is_main_process, rank, world_size  # noqa: E402
from splora_callback.sharding import (  # noqa: E402
    gathered,
    lora_layers,
    lora_updates_gathered,
    sharding_engine,
)


def load(data: Path, trainable: bool = False):
    """The live LoRA model: aligned weights (frozen base layers) + the planted adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(data / "aligned", dtype=torch.float32)
    return PeftModel.from_pretrained(model, data / "adapter", is_trainable=trainable)


def dump(out: Path, name: str, payload: dict) -> None:
    (out / f"{name}-rank{rank()}.json").write_text(json.dumps(payload, indent=1))


def factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A, B, base weight) of every LoRA layer of an unsharded model, cloned."""
    root = model.base_model.model
    return {
        u.name: (u.lora_A.clone(), u.lora_B.clone(), root.get_submodule(u.name).get_base_layer().weight.detach().clone())
        for u in lora_updates_from_model(model)
    }


def check_score(data: Path, out: Path) -> None:
    """Replicated model (as under DDP): sliced alignment and scores, same decisions, one report."""
    model = load(data)
    names = [name for name, _ in lora_layers(model)[1]]
    alignment = alignment_for_rank(data / "base", model, cache_file=out / "cache" / "alignment.safetensors")
    result = {"world_size": world_size(), "names": names, "alignment_names": alignment.names,
              "owned": layer_slice(lora_layers(model)[1])}
    for null in ("layers", "permutation"):
        scores = score_layers_distributed(model, alignment, "ediem", null=null, permutations=16, seed=0)
        result[f"scores_{null}"] = scores.to_dict()
        result[f"selected_{null}"] = select_layers(scores, "top_k", k=3)
    result["selected_all_ranks"] = all_gather_object(result["selected_layers"])
    report = out / "reports" / f"report-rank{rank()}.json"
    on_main(atomic_write_text, report, json.dumps(result["selected_layers"]))
    # a second call hits the per-rank cache files written by the first
    result["cached_alignment_equal"] = all(
        torch.equal(alignment_for_rank(data / "base", model, cache_file=out / "cache" / "alignment.safetensors")
                    .directions[name], alignment.directions[name]) for name in alignment.names)

    # one rank fails (its slice lacks a module): every rank raises, none hangs in a collective
    broken = AlignmentSubspace(dict(alignment.directions), alignment.frobenius_norms, alignment.spectral_norms)
    if rank() == 1:
        del broken.directions[broken.names[0]]
    try:
        score_layers_distributed(model, broken)
        result["failure"] = None
    except Exception as error:  # the type is what the test checks
        result["failure"] = type(error).__name__

    chosen = result["selected_layers"]
    save_acted_adapter_distributed(model, out / "acted-project", chosen, "project", alignment)
    if is_main_process():  # single-process reference, full alignment, written by rank 0 only
        from splora_callback.pruning import save_acted_adapter

        full = AlignmentSubspace.from_pretrained(data / "base", model=model, progress=False)
        save_acted_adapter(model, out / "acted-project-ref", chosen, "project", full)
    apply_action_distributed(model, alignment, chosen, "project")
    result["projected_B"] = {n: u.lora_B.tolist() for n, u in ((u.name, u) for u in lora_updates_from_model(model))
                             if n in chosen}
    report_prune = apply_action_distributed(model, alignment, chosen, "prune")
    result["pruned"] = report_prune.layers
    result["remaining"] = [name for name, _ in lora_layers(model)[1]]
    dump(out, "score", result)


def check_sharded(engine: str, data: Path, out: Path) -> None:
    """Gather contexts, alignment from the sharded live model and scores under a sharding engine."""
    reference = load(data)
    expected = factors(reference)
    model = shard(engine, load(data, trainable=True))
    result = {"engine": sharding_engine(model), "world_size": world_size()}
    equal = {}
    for update in lora_updates_gathered(model):
        a, b, _ = expected[update.name]
        equal[update.name] = torch.equal(update.lora_A, a) and torch.equal(update.lora_B, b)
    result["lora_equal"] = equal
    name, layer = lora_layers(model)[1][0]  # gathered(params) on one frozen base weight
    try:
        with gathered([layer.get_base_layer().weight], model=model) as (weight,):
            result["gathered_params"] = "equal" if torch.equal(weight, expected[name][2]) else "different"
    except ValueError:  # FSDP v1 without use_orig_params has no per-module parameters to name
        result["gathered_params"] = "refused"
    alignment = alignment_for_rank(data / "base", model)
    full = AlignmentSubspace.from_pretrained(data / "base", model=reference, progress=False)
    result["alignment_names"] = alignment.names
    result["alignment_max_diff"] = max(
        (float((alignment.directions[n] - full.directions[n]).abs().max()) for n in alignment.names), default=0.0)
    scores = score_layers_distributed(model, alignment, "ediem", null="layers")
    result["scores_layers"] = scores.to_dict()
    chosen = select_layers(scores, "top_k", k=3)
    result["selected_layers"] = chosen
    save_acted_adapter_distributed(model, out / f"acted-{engine}", chosen, "prune", alignment)
    result["still_sharded"] = still_sharded(engine, model, expected)
    try:
        apply_action_distributed(model, alignment, chosen, "prune")
        result["prune_refused"] = False
    except ValueError:
        result["prune_refused"] = True
    dump(out, engine, result)


def shard(engine: str, model):
    """Wrap ``model`` the way Accelerate would, on CPU/gloo."""
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size(),))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if engine in ("fsdp1", "fsdp1-flat"):  # PEFT's auto-wrap policy, as the Trainer installs it
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model),
                                        use_orig_params=engine == "fsdp1", device_id=torch.device("cpu"))
    if engine == "deepspeed":
        import importlib

        import deepspeed

        # DeepSpeed JIT-compiles a shared-memory CPU all-reduce (minutes) at init; gloo is enough here.
        # (``deepspeed.comm.torch`` as an attribute is the torch module: import the submodule by name.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        }
        trainable = [param for param in model.parameters() if param.requires_grad]
        deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        return model  # the Trainer hands callbacks this (the engine is trainer.model_wrapped)
    raise ValueError(engine)


def still_sharded(engine: str, model, expected: dict) -> bool:
    """After all the gathers: every LoRA factor and base weight holds only its shard again."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if engine.startswith("fsdp1"):  # every unit's flat parameter is back to its local shard
        units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel) and m._flat_param is not None]
        return bool(units) and all(
            u._flat_param.numel() < u._flat_param._unpadded_unsharded_size.numel() for u in units)
    adapter, layers = lora_layers(model)
    for name, layer in layers:
        modules = (layer.lora_A[adapter], layer.lora_B[adapter], layer.get_base_layer())
        for module, full in zip(modules, expected[name], strict=True):
            weight = module.weight
            if engine == "fsdp2" and not (isinstance(weight, DTensor) and weight.to_local().numel() < full.numel()):
                return False
            if engine == "deepspeed" and weight.numel() != 0:
                return False
    return True


def check_trainer(data: Path, out: Path) -> None:
    """Real DDP Trainer runs with SPLoRACallback: as shipped, then with the distributed drop-ins.

    The second run swaps, inside the callback module, ``score_layers`` -> ``score_layers_distributed``,
    ``AlignmentSubspace.from_pretrained`` -> ``alignment_for_rank`` and ``apply_action`` ->
    ``apply_action_distributed`` (same signatures): the integration docs/multi-gpu.md describes.
    """
    import splora_callback.callback as callback_module

    writes = []  # every report write of this rank (only the main process may write)
    for function in ("write_json_report", "write_html_report"):
        original = getattr(callback_module, function)
        setattr(callback_module, function, lambda *a, _f=original, _n=function, **k: writes.append(_n) or _f(*a, **k))
    result = {"shipped": train_with_callback(data, out / "trainer")}
    result["world_size"] = world_size()  # the Trainer (Accelerate) initialised the process group
    result["report_writes"] = list(writes)

    class SlicedAlignment:
        from_pretrained = staticmethod(alignment_for_rank)

    callback_module.score_layers = score_layers_distributed
    callback_module.AlignmentSubspace = SlicedAlignment
    callback_module.apply_action = apply_action_distributed
    result["distributed"] = train_with_callback(data, out / "trainer-distributed")
    dump(out, "trainer", result)


def train_with_callback(data: Path, output_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from splora_callback import SPLoRAConfig
    from splora_callback.callback import SPLoRACallback

    model = load(data, trainable=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (16, 12), generator=generator)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    config = SPLoRAConfig(base_model=str(data / "base"), select="top_k", k=3, action="prune",
                          score_every_n_steps=2, prune_at_end=True)
    callback = SPLoRACallback(config)
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        ddp_backend="gloo", dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    return {
        "selected": callback.selected, "scores": [entry["scores"] for entry in callback.history],
        "history_selected": [entry["selected"] for entry in callback.history],
        "remaining": [name for name, _ in lora_layers(model)[1]],
        "is_world_process_zero": trainer.state.is_world_process_zero,
    }


def check_patch(data: Path, out: Path) -> None:
    """A real DDP Trainer with ``action="patch"`` (the loss stop): every rank's replica ends with
    the same patched factors (rank 0's, broadcast), and the report is written once."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from splora_callback import SafetyProbe, SPLoRAConfig
    from splora_callback.callback import SPLoRACallback
    from splora_callback.patch import lora_factors

    model = load(data, trainable=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (16, 12), generator=generator)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    probe_ids = torch.randint(0, 128, (6, 10), generator=generator)
    labels = probe_ids.clone()
    labels[:, :4] = -100
    probe = SafetyProbe.from_tensors(probe_ids, torch.ones_like(probe_ids), labels, batch_size=3)
    config = SPLoRAConfig(metric="probe", probe=probe, action="patch", patch_stop="refusal_loss", patch_anchors=0,
                          patch_lr=1e-2, score_every_n_steps=0)
    callback = SPLoRACallback(config)
    args = TrainingArguments(
        output_dir=str(out / "patch"), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        ddp_backend="gloo", dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    dump(out, "patch", {"world_size": world_size(), "record": (callback.action_report or {}).get("patch"),
                        "failed": (callback.action_report or {}).get("failed"),
                        "factors": [p.detach().double().flatten().tolist()[:64] + [p.detach().double().sum().item()]
                                    for p in lora_factors(model)]})


def check_bench(out: Path, modules: int = 32, size: int = 1024, rank_r: int = 8, repeats: int = 3) -> None:
    """Seconds to build the alignment slice and to score ``modules`` LoRA layers of size x size."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    body = torch.nn.Sequential(*[torch.nn.Linear(size, size, bias=False) for _ in range(modules)])
    generator = torch.Generator().manual_seed(1)
    base_dir = out / "bench-base"
    base = {  # W_base = W_aligned - V with a rank-4 V per module
        f"{index}.weight": layer.weight.detach() - 0.01 * torch.randn(size, 4, generator=generator)
        @ torch.randn(4, size, generator=generator) for index, layer in enumerate(body)
    }
    if is_main_process():
        base_dir.mkdir(parents=True, exist_ok=True)
        save_file(base, str(base_dir / "model.safetensors"))
    if dist.is_initialized():
        dist.barrier()
    config = LoraConfig(r=rank_r, lora_alpha=16, target_modules=[str(i) for i in range(modules)])
    model = get_peft_model(body, config)
    with torch.no_grad():
        for _, layer in lora_layers(model)[1]:
            layer.lora_B["default"].weight.normal_(0, 0.01, generator=generator)
    timings, cpu = {}, {}  # wall seconds, and this process's CPU seconds (the machine is shared)
    start, start_cpu = time.perf_counter(), time.process_time()
    alignment = alignment_for_rank(base_dir, model, progress=False)
    timings["alignment"], cpu["alignment"] = time.perf_counter() - start, time.process_time() - start_cpu
    for null in ("layers", "permutation"):
        seconds = []
        for _ in range(repeats):
            if dist.is_initialized():
                dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            score_layers_distributed(model, alignment, "ediem", null=null)
            seconds.append((time.perf_counter() - start, time.process_time() - start_cpu))
        timings[null], cpu[null] = min(seconds)
    dump(out, "bench", {"world_size": world_size(), "threads": torch.get_num_threads(), "seconds": timings,
                        "cpu_seconds": cpu, "modules_in_slice": len(alignment), "load": os.getloadavg()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checks")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ and not {"trainer", "patch", "deepspeed"} & set(args.checks.split(",")):
        dist.init_process_group("gloo")
    elif "deepspeed" in args.checks:
        dist.init_process_group("gloo")  # DeepSpeed reuses an initialised process group
    args.out.mkdir(parents=True, exist_ok=True)
    for check in args.checks.split(","):
        if check == "score":
            check_score(args.data, args.out)
        elif check in ("fsdp2", "fsdp1", "fsdp1-flat", "deepspeed"):
            check_sharded(check, args.data, args.out)
        elif check == "trainer":
            check_trainer(args.data, args.out)
        elif check == "patch":
            check_patch(args.data, args.out)
        elif check == "bench":
            check_bench(args.out)
        else:
            raise ValueError(f"unknown check {check!r}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
