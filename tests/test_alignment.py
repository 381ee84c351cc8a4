"""Streaming the alignment subspace: equal to dense V, cached, and clear about bad checkpoints."""

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import ATTENTION, add_lora, tiny_llama
from transformers import AutoModelForCausalLM

from splora_callback import AlignmentMismatchError, AlignmentSubspace, CheckpointError, SafetensorsCheckpoint


def dense_directions(base_dir, aligned_dir, names):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    aligned = AutoModelForCausalLM.from_pretrained(aligned_dir)
    return {name: aligned.get_submodule(name).weight - base.get_submodule(name).weight for name in names}


def test_from_model_and_from_paths_equal_dense_v(llama_pair):
    base_dir, aligned_dir, bases = llama_pair
    model = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir))
    from_model = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    from_paths = AlignmentSubspace.from_pretrained(base_dir, aligned=aligned_dir, target_modules=ATTENTION, progress=False)
    expected = dense_directions(base_dir, aligned_dir, bases)
    assert set(from_model.names) == set(from_paths.names) == set(bases)
    for name, direction in expected.items():
        torch.testing.assert_close(from_model.directions[name], direction, rtol=0, atol=1e-7)
        torch.testing.assert_close(from_paths.directions[name], direction, rtol=0, atol=1e-7)
        assert from_model.spectral_norms[name] == pytest.approx(float(torch.linalg.matrix_norm(direction.double(), ord=2)), rel=1e-5)


def test_sharded_checkpoint_is_streamed(llama_pair, tmp_path):
    base_dir, aligned_dir, bases = llama_pair
    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    from_sharded = AlignmentSubspace.from_pretrained(sharded, aligned=aligned_dir, target_modules=ATTENTION, progress=False)
    from_single = AlignmentSubspace.from_pretrained(base_dir, aligned=aligned_dir, target_modules=ATTENTION, progress=False)
    for name in bases:
        assert torch.equal(from_sharded.directions[name], from_single.directions[name])


def test_reads_across_shards_in_any_order_leave_no_shard_mapped(llama_pair, tmp_path):
    from safetensors.torch import load_file

    from splora_callback.checkpoint import SafetensorsCheckpoint

    base_dir, _, _ = llama_pair
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(sharded, max_shard_size="40KB")
    expected = {}
    for file in sharded.glob("*.safetensors"):
        expected.update({key: tensor.clone() for key, tensor in load_file(file).items()})  # not file-backed
    maps = Path("/proc/self/maps")

    def mapped() -> bool:  # is any shard of this checkpoint mapped into this process?
        return maps.is_file() and str(sharded) in maps.read_text()

    checkpoint = SafetensorsCheckpoint.open(sharded)
    keys = sorted(checkpoint.weight_map)
    assert len(set(checkpoint.weight_map.values())) > 1
    for key in keys + keys[::-1]:  # every shard boundary, both directions
        assert torch.equal(checkpoint.read(key), expected[key])
        assert not mapped()  # the read tensor is gone: so is its shard's mapping


def test_cache_is_reused_and_rebuilt_when_stale(llama_pair, tmp_path, caplog):
    base_dir, aligned_dir, _ = llama_pair
    cache = tmp_path / "alignment.safetensors"
    first = AlignmentSubspace.from_pretrained(base_dir, aligned=aligned_dir, target_modules=ATTENTION, cache_file=cache, progress=False)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    time.sleep(0.01)
    again = AlignmentSubspace.from_pretrained(base_dir, aligned=aligned_dir, target_modules=ATTENTION, cache_file=cache, progress=False)
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    assert again.source == first.source and again.spectral_norms == first.spectral_norms
    for name in first.names:
        assert torch.equal(again.directions[name], first.directions[name])
    fewer = AlignmentSubspace.from_pretrained(base_dir, aligned=aligned_dir, target_modules=["q_proj"], cache_file=cache, progress=False)
    assert len(fewer) == 2 and "rebuilding" in caplog.text


def test_missing_tensor_in_base_is_named(llama_pair, tmp_path):
    base_dir, aligned_dir, _ = llama_pair
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(base_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no tensor for module 'model.layers.1.self_attn.v_proj'"):
        AlignmentSubspace.from_pretrained(broken, aligned=aligned_dir, target_modules=ATTENTION, progress=False)


def test_wrong_base_model_shape_mismatch(llama_pair, tmp_path):
    _, aligned_dir, _ = llama_pair
    other = tiny_llama(layers=2)
    other.config.num_key_value_heads = 4
    wrong = AutoModelForCausalLM.from_config(other.config)
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(AlignmentMismatchError, match=r"k_proj: aligned weight has shape \(32, 64\) but the base"):
        AlignmentSubspace.from_pretrained(tmp_path / "wrong", aligned=aligned_dir, target_modules=ATTENTION, progress=False)


def test_nan_weights_are_refused(llama_pair, tmp_path):
    base_dir, aligned_dir, _ = llama_pair
    tensors = load_file(aligned_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    (tmp_path / "nan").mkdir()
    save_file(tensors, tmp_path / "nan" / "model.safetensors")
    with pytest.raises(AlignmentMismatchError, match="NaN/inf"):
        AlignmentSubspace.from_pretrained(base_dir, aligned=tmp_path / "nan", target_modules=["q_proj"], progress=False)


def test_hub_id_offline_fails_fast_with_message(llama_pair):
    _, aligned_dir, _ = llama_pair
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="not a local directory and the Hugging Face Hub did not provide it"):
        AlignmentSubspace.from_pretrained("meta-llama/Llama-2-7b-hf", aligned=aligned_dir, target_modules=ATTENTION, progress=False)
    assert time.monotonic() - start < 10


def test_missing_local_directory_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SafetensorsCheckpoint.open(tmp_path / "nowhere" / "model")


def test_checkpoint_keys_without_model_prefix_resolve(tmp_path):
    save_file({"h.0.attn.c_attn.weight": torch.zeros(2, 3)}, tmp_path / "model.safetensors")
    with SafetensorsCheckpoint.open(tmp_path) as checkpoint:
        assert checkpoint.weight_key("transformer.h.0.attn.c_attn") == "h.0.attn.c_attn.weight"
        assert checkpoint.module_weight("transformer.h.0.attn.c_attn", fan_in_fan_out=True).shape == (3, 2)


def test_neither_model_nor_aligned_is_an_error(llama_pair):
    with pytest.raises(ValueError, match="needs model="):
        AlignmentSubspace.from_pretrained(llama_pair[0])
