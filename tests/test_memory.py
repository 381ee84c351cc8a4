"""Where V lives while training (splora_callback.memory, spec 5b): the bytes placed on the scoring device.

No GPU here: a separate scoring device is emulated on the CPU (``always_copy``), every copy of V
that streaming makes is counted, and the scores must equal those of V kept resident.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from datasets import Dataset
from tiny import add_lora, llama_attention_names, save_pair, tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from splora_callback import AlignmentSubspace, SPLoRACallback, apply_action, score_layers
from splora_callback import callback as callback_module
from splora_callback.memory import (
    StreamedDirections,
    device_account,
    place_alignment,
    placement_info,
    storage_device,
)
from splora_callback.report import load_report


def v_bytes(alignment: AlignmentSubspace) -> dict[str, int]:
    directions = alignment.directions
    stored = directions.stored if isinstance(directions, StreamedDirections) else directions
    return {name: tensor.numel() * tensor.element_size() for name, tensor in stored.items()}


@pytest.fixture
def streamed(planted_llama):
    model, base_dir, _, _ = planted_llama
    resident = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    streamed = place_alignment(AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False), "stream",
                               torch.device("cpu"), always_copy=True)
    return model, resident, streamed


@pytest.mark.parametrize("null,granularity", [("layers", "layer"), ("permutation", "layer"), ("layers", "component")])
def test_streamed_scores_equal_resident_ones_with_one_module_on_the_device_at_a_time(streamed, null, granularity):
    model, resident, alignment = streamed
    account = device_account(alignment)
    expected = score_layers(model, resident, null=null, granularity=granularity)
    got = score_layers(model, alignment, null=null, granularity=granularity)
    assert got.to_dict() == expected.to_dict()  # bit for bit
    sizes = v_bytes(alignment)
    per_pass = 2 if granularity == "component" else 1  # the component geometry reads V once more
    assert account.copies == per_pass * len(sizes) and account.moved == per_pass * sum(sizes.values())
    assert account.peak <= max(sizes.values()) < sum(sizes.values())  # at most one module's V at once
    assert account.live == 0  # every copy was freed after its module


def test_projection_streams_too_and_matches(streamed, planted_llama):
    model, resident, alignment = streamed
    names = list(v_bytes(alignment))[:3]
    import copy

    twin = copy.deepcopy(model)
    apply_action(model, alignment, names, action="project")
    apply_action(twin, resident, names, action="project")
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert device_account(alignment).peak <= max(v_bytes(alignment).values())


def test_placements_keep_v_off_the_accelerator_unless_resident():
    gpu = torch.device("cuda", 0)  # a device object only: nothing is allocated on it
    assert storage_device("stream", gpu) == storage_device("cpu", gpu) == torch.device("cpu")
    assert storage_device("resident", gpu) == gpu
    alignment = AlignmentSubspace({"m": torch.ones(4, 3)}, {"m": 1.0}, {"m": 1.0})
    place_alignment(alignment, "stream", gpu)
    assert isinstance(alignment.directions, StreamedDirections) and alignment.directions.device == gpu
    assert "m" in alignment and len(alignment) == 1 and device_account(alignment).copies == 0  # no copy to check
    assert placement_info(alignment, "stream", gpu) == {
        "placement": "stream", "scoring_device": "cuda:0", "stored_on": "cpu", "stored_bytes": 48,
        "last_call": {"moved_bytes": 0, "copies": 0, "peak_bytes": 0}}
    cpu_only = AlignmentSubspace({"m": torch.ones(4, 3)}, {"m": 1.0}, {"m": 1.0})
    assert place_alignment(cpu_only, "stream", torch.device("cpu")).directions.__class__ is dict  # nothing to move
    with pytest.raises(ValueError, match="alignment_placement='gpu'"):
        storage_device("gpu", gpu)


def test_the_callback_streams_v_and_reports_the_bytes_placed(tmp_path, monkeypatch):
    base_dir, aligned_dir, _ = save_pair(tmp_path / "pair", tiny_llama, llama_attention_names)
    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(name, placement):
        callback = SPLoRACallback(base_model=str(base_dir), select="top_k", k=3, score_every_n_steps=2,
                                  alignment_placement=placement)
        torch.manual_seed(0)
        Trainer(model=add_lora(LlamaForCausalLM.from_pretrained(aligned_dir)), train_dataset=dataset,
                callbacks=[callback], args=TrainingArguments(str(tmp_path / name), max_steps=4, learning_rate=1e-2,
                                                             per_device_train_batch_size=4, report_to=[],
                                                             use_cpu=True, save_strategy="no",
                                                             disable_tqdm=True)).train()
        return callback, load_report(tmp_path / name)

    _, resident = run("resident", "resident")
    # a CPU-only machine has no second device: emulate one (every access copies) to count the bytes
    monkeypatch.setattr(callback_module, "place_alignment", partial(place_alignment, always_copy=True))
    callback, streamed = run("streamed", "stream")
    assert [entry["scores"] for entry in streamed["history"]] == [entry["scores"] for entry in resident["history"]]
    memory = streamed["memory"]
    per_module = 64 * 64 * 4  # the largest V (q/o, float32)
    assert memory["placement"] == "stream" and memory["stored_on"] == "cpu"
    assert memory["stored_bytes"] == 4 * (64 * 64 + 32 * 64) * 4 == resident["memory"]["stored_bytes"]
    assert memory["last_call"]["peak_bytes"] <= per_module < memory["stored_bytes"]
    assert memory["last_call"]["copies"] == 8  # the last scoring call: each module's V placed once
    assert "last_call" not in resident["memory"]
