"""Multi-process scoring: 2 processes on gloo (torchrun) against one process on the same weights.

The worker (tests/distributed_worker.py) runs the checks on both ranks and writes each rank's
results; the tests compare them with ``score_layers`` / ``save_acted_adapter`` here. Single-process
behaviour of splora_callback.distributed (no process group) is tested without launching anything.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import ATTENTION, add_lora, llama_attention_names, plant_updates, save_pair, tiny_llama

from splora_callback import AlignmentSubspace, NoLoraLayersError, score_layers
from splora_callback.distributed import (
    alignment_for_rank,
    apply_action_distributed,
    layer_slice,
    on_main,
    rank_slice,
    save_acted_adapter_distributed,
    score_layers_distributed,
)
from splora_callback.processes import (
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    is_main_process,
    process_state,
    rank,
    world_size,
)
from splora_callback.pruning import save_acted_adapter
from splora_callback.sharding import (
    gathered,
    lora_layers,
    lora_updates_gathered,
    sharding_engine,
    warn_if_sharded,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
RELATIVE = 1e-9  # float32 weights, traces accumulated in float64: the split must not move a digit
ABSOLUTE = 1e-12  # for values that are 0 up to rounding (E-DIEM at the median)
NO_SIGNAL = "model.layers.2.self_attn.k_proj"  # V = 0 there: "no_alignment"
INACTIVE = "model.layers.1.self_attn.v_proj"  # B = 0 there: "inactive"
ORTHOGONAL = {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.v_proj"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """base/, aligned/ (planted V on all q/k/v/o but one) and adapter/ (planted updates)."""
    root = tmp_path_factory.mktemp("distributed")
    _, aligned_dir, bases = save_pair(
        root, lambda seed: tiny_llama(seed, layers=3),
        lambda model: [name for name in llama_attention_names(model) if name != NO_SIGNAL],
    )
    from transformers import AutoModelForCausalLM

    model = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32), targets=ATTENTION)
    plant_updates(model, bases, ORTHOGONAL)
    with torch.no_grad():
        layers = dict(lora_layers(model)[1])
        layers[NO_SIGNAL].lora_B["default"].weight.normal_(0, 0.1)
        layers[INACTIVE].lora_B["default"].weight.zero_()
    model.save_pretrained(root / "adapter")
    return root


def load(data: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(data / "aligned", dtype=torch.float32)
    return PeftModel.from_pretrained(model, data / "adapter")


@pytest.fixture(scope="module")
def reference(data):
    """Single-process scores, alignment and model on the same weights."""
    model = load(data)
    alignment = AlignmentSubspace.from_pretrained(data / "base", model=model, progress=False)
    scores = {null: score_layers(model, alignment, "ediem", null=null).to_dict() for null in ("layers", "permutation")}
    return {"model": model, "alignment": alignment, "scores": scores}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(checks: str, data: Path, out: Path, timeout: int = 240) -> str:
    """Run the worker under ``torchrun --nproc_per_node 2``; return its output (also in out/torchrun.log)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(WORKER), checks, "--data", str(data), "--out", str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its two workers: our own process group
        output, _ = process.communicate()
        output += f"\ntorchrun {checks} timed out after {timeout} s"
    (out / "torchrun.log").write_text(output)
    return output


def results(out: Path, check: str) -> list[dict]:
    """Both ranks' results of ``check``; on failure, the end of torchrun's output says why."""
    files = [out / f"{check}-rank{r}.json" for r in range(2)]
    log = (out / "torchrun.log").read_text() if (out / "torchrun.log").is_file() else ""
    assert all(file.is_file() for file in files), f"{check}: no results from both ranks:\n{log[-6000:]}"
    return [json.loads(file.read_text()) for file in files]


def assert_scores_close(actual: dict, expected: dict) -> None:
    assert (actual["metric"], actual["null"]) == (expected["metric"], expected["null"])
    assert [layer["name"] for layer in actual["layers"]] == [layer["name"] for layer in expected["layers"]]
    for got, want in zip(actual["layers"], expected["layers"], strict=True):
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=RELATIVE, abs=ABSOLUTE), (want["name"], key)
            else:
                assert got[key] == (list(value) if isinstance(value, tuple) else value), (want["name"], key)


# --- one process: the drop-in is exactly the single-process function --------------------------------


def test_single_process_is_score_layers(reference):
    model, alignment = reference["model"], reference["alignment"]
    assert world_size() == 1 and is_main_process() and sharding_engine(model) == "none"
    assert not warn_if_sharded(model)
    for null in ("layers", "permutation"):
        assert score_layers_distributed(model, alignment, null=null).to_dict() == reference["scores"][null]
    statuses = {layer["status"] for layer in reference["scores"]["layers"]["layers"]}
    assert statuses == {"active", "inactive", "no_alignment"}  # the fixture covers every status


def test_single_process_helpers(data, reference):
    model = reference["model"]
    names = [name for name, _ in lora_layers(model)[1]]
    assert names == [update.name for update in lora_updates_gathered(model)]
    assert rank_slice(names) == sorted(names)
    assert rank_slice(names, 1, 2) == sorted(names)[1::2]
    assert sorted(rank_slice(names, 0, 2) + rank_slice(names, 1, 2)) == sorted(names)
    assert layer_slice(lora_layers(model)[1]) == sorted(names, key=lambda n: (n.rsplit(".", 1)[1] in ("k_proj", "v_proj"), n))
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    with gathered([weight]) as (full,):
        assert full.data_ptr() == weight.data_ptr()  # plain tensors: no copy
    assert on_main(lambda x: x + 1, 1) == 2
    with pytest.raises(ZeroDivisionError):
        on_main(lambda: 1 / 0)
    assert alignment_for_rank(data / "base", model, progress=False).names == reference["alignment"].names


def test_one_process_collectives_are_identities():
    """Without a process group Accelerate is not consulted (its PartialState would start one under torchrun)."""
    tensor = torch.ones(3, dtype=torch.float64)
    assert process_state() is None and rank() == 0 and world_size() == 1 and is_main_process()
    assert all_gather_object({"a": 1}) == [{"a": 1}] and broadcast_object(4) == 4
    assert all_reduce_sum(tensor) is tensor


def test_rank_slice_balances_shapes():
    """Llama GQA q/k/v/o on 4 ranks: by name alone each rank would get one kind (k/v are 4x smaller)."""
    names = [f"model.layers.{i}.self_attn.{kind}" for i in range(8) for kind in ATTENTION]
    sizes = {name: 1024 * 4096 if name.endswith(("k_proj", "v_proj")) else 4096 * 4096 for name in names}
    loads = [sum(sizes[n] for n in rank_slice(names, r, 4, sizes=sizes)) for r in range(4)]
    assert max(loads) == min(loads)
    by_name = [sum(sizes[n] for n in rank_slice(names, r, 4)) for r in range(4)]
    assert max(by_name) == 4 * min(by_name)  # what sizes= avoids


def test_actions_single_process_match_pruning(data, reference, tmp_path):
    chosen = ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.o_proj"]
    save_acted_adapter_distributed(reference["model"], tmp_path / "acted", chosen, "project", reference["alignment"])
    save_acted_adapter(reference["model"], tmp_path / "ref", chosen, "project", reference["alignment"])
    acted, expected = load_file(tmp_path / "acted" / "adapter_model.safetensors"), load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert acted.keys() == expected.keys() and all(torch.equal(acted[k], expected[k]) for k in expected)
    with pytest.raises(NoLoraLayersError, match="No LoRA layer holds adapter 'default'"):
        lora_layers(tiny_llama(), "default")
    model = load(data)
    report = apply_action_distributed(model, None, ["model.layers.0.self_attn.q_proj"], "prune")
    assert report.layers == ["model.layers.0.self_attn.q_proj"]
    assert "model.layers.0.self_attn.q_proj" not in [name for name, _ in lora_layers(model)[1]]


# --- two processes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """One torchrun for the replicated (DDP-style), FSDP v2 and FSDP v1 checks (~10 s of it is startup)."""
    out = tmp_path_factory.mktemp("two-ranks")
    return out, launch("score,fsdp2,fsdp1,fsdp1-flat", data, out)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_score_like_one(two_ranks, reference):
    out, _ = two_ranks
    ranks = results(out, "score")
    assert [r["world_size"] for r in ranks] == [2, 2]
    for null in ("layers", "permutation"):
        for result in ranks:
            assert_scores_close(result[f"scores_{null}"], reference["scores"][null])
        assert ranks[0][f"scores_{null}"] == ranks[1][f"scores_{null}"]  # identical, not just close


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_same_decisions_one_report(two_ranks):
    out, _ = two_ranks
    ranks = results(out, "score")
    assert len(ranks[0]["selected_layers"]) == 3
    assert ranks[0]["selected_all_ranks"] == [ranks[0]["selected_layers"]] * 2
    assert ranks[0]["selected_permutation"] == ranks[1]["selected_permutation"]
    assert sorted(path.name for path in (out / "reports").iterdir()) == ["report-rank0.json"]
    # rank 1 lacked a module of its slice: it raised KeyError, rank 0 a RuntimeError (no hang)
    assert [r["failure"] for r in ranks] == ["RuntimeError", "KeyError"]
    assert json.loads((out / "reports" / "report-rank0.json").read_text()) == ranks[0]["selected_layers"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_alignment_sliced(two_ranks, reference):
    out, _ = two_ranks
    ranks = results(out, "score")
    names = ranks[0]["names"]
    slices = [r["alignment_names"] for r in ranks]
    assert [sorted(s) for s in slices] == [sorted(r["owned"]) for r in ranks]
    assert sorted(slices[0] + slices[1]) == sorted(names) and not set(slices[0]) & set(slices[1])
    assert all(r["cached_alignment_equal"] for r in ranks)
    caches = sorted(path.name for path in (out / "cache").iterdir())
    assert caches == ["alignment.rank0-of-2.safetensors", "alignment.rank1-of-2.safetensors"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_project_and_prune(two_ranks, reference):
    out, _ = two_ranks
    ranks = results(out, "score")
    chosen = ranks[0]["selected_layers"]
    acted = load_file(out / "acted-project" / "adapter_model.safetensors")
    expected = load_file(out / "acted-project-ref" / "adapter_model.safetensors")
    assert acted.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(acted[key], expected[key], rtol=1e-6, atol=1e-9)
    for name in chosen:  # the live replicas were projected identically, and as the saved adapter
        key = f"base_model.model.{name}.lora_B.weight"
        assert ranks[0]["projected_B"][name] == ranks[1]["projected_B"][name]
        torch.testing.assert_close(torch.tensor(ranks[0]["projected_B"][name]), expected[key], rtol=1e-6, atol=1e-9)
    for result in ranks:
        assert result["pruned"] == chosen
        assert result["remaining"] == [n for n in result["names"] if n not in chosen]


def _assert_sharded_run(out: Path, engine: str, reference, data: Path) -> None:
    ranks = results(out, engine)
    names = [name for name, _ in lora_layers(reference["model"])[1]]
    for result in ranks:
        assert result["world_size"] == 2
        assert result["engine"] == ("fsdp" if engine.startswith("fsdp1") else engine)
        assert result["lora_equal"] == dict.fromkeys(names, True)
        assert result["gathered_params"] == ("refused" if engine == "fsdp1-flat" else "equal")
        assert result["still_sharded"] and result["prune_refused"]
        assert result["alignment_max_diff"] == 0.0
        assert_scores_close(result["scores_layers"], reference["scores"]["layers"])
    assert sorted(ranks[0]["alignment_names"] + ranks[1]["alignment_names"]) == sorted(names)
    assert ranks[0]["selected_layers"] == ranks[1]["selected_layers"]
    written = out / f"acted-{engine}"
    save_acted_adapter(reference["model"], out / f"ref-{engine}", ranks[0]["selected_layers"], "prune")
    acted, expected = load_file(written / "adapter_model.safetensors"), load_file(out / f"ref-{engine}" / "adapter_model.safetensors")
    assert acted.keys() == expected.keys() and all(torch.equal(acted[k], expected[k]) for k in expected)
    config = json.loads((written / "adapter_config.json").read_text())
    assert set(config["exclude_modules"]) == set(ranks[0]["selected_layers"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_gathers_exact_factors(two_ranks, reference, data):
    _assert_sharded_run(two_ranks[0], "fsdp2", reference, data)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp1_gathers_exact_factors(two_ranks, reference, data):
    _assert_sharded_run(two_ranks[0], "fsdp1", reference, data)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp1_without_orig_params(two_ranks, reference, data):
    """Accelerate's FSDP v1 default: modules hold no parameters; everything works by module."""
    _assert_sharded_run(two_ranks[0], "fsdp1-flat", reference, data)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_zero3_gathers_exact_factors(data, reference, tmp_path):
    pytest.importorskip("deepspeed")
    launch("deepspeed", data, tmp_path)
    _assert_sharded_run(tmp_path, "deepspeed", reference, data)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_ddp_with_callback(data, tmp_path):
    pytest.importorskip("splora_callback.callback")
    launch("trainer", data, tmp_path, timeout=300)
    ranks = results(tmp_path, "trainer")
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["report_writes"] and ranks[1]["report_writes"] == []  # only the main process writes
    assert (tmp_path / "trainer" / "splora_report.json").is_file()
    for run in ("shipped", "distributed"):
        first, second = ranks[0][run], ranks[1][run]
        assert [first["is_world_process_zero"], second["is_world_process_zero"]] == [True, False]
        assert len(first["selected"]) == 3 and first["selected"] == second["selected"]
        assert first["history_selected"] == second["history_selected"] and len(first["history_selected"]) >= 2
        assert first["remaining"] == second["remaining"]
        assert not set(first["selected"]) & set(first["remaining"])
    # the distributed drop-ins inside the callback score exactly what score_layers scores
    shipped, distributed = ranks[0]["shipped"]["scores"], ranks[0]["distributed"]["scores"]
    assert len(shipped) == len(distributed)
    for got, want in zip(distributed, shipped, strict=True):
        assert_scores_close(got, want)


def test_trainer_ddp_patch_leaves_every_replica_the_same(data, tmp_path):
    """action='patch' under DDP: the patch ran (>= 1 step, its loss stop reached) and both replicas
    hold the same patched LoRA factors; only the main process wrote the report."""
    launch("patch", data, tmp_path, timeout=300)
    first, second = results(tmp_path, "patch")
    assert [first["world_size"], second["world_size"]] == [2, 2]
    assert first["failed"] is None and second["failed"] is None
    assert first["record"]["steps"] >= 1 and first["record"]["reached_target"]
    assert first["record"] == second["record"] and first["factors"] == second["factors"]
    assert (tmp_path / "patch" / "splora_report.json").is_file()


# --- the shipped Accelerate configs ----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    """Each config loads as Accelerate's own ClusterConfig and names only real launch options."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) | set(config.deepspeed_config) <= options
    assert config.num_processes >= 2 and not config.use_cpu
    header = path.read_text().split("\n", 8)
    assert any(f"--config_file recipes/accelerate/{path.name}" in line for line in header)


def test_accelerate_configs_cover_the_engines():
    engines = {path.name for path in (REPO / "recipes" / "accelerate").glob("*.yaml")}
    assert engines >= {"ddp.yaml", "fsdp.yaml", "deepspeed_zero3.yaml"}
