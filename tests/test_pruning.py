"""prune / project on live models and saved adapters: exact reloads, atomic writes, nothing lost."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from splora_callback import AlignmentSubspace, apply_action, save_acted_adapter, score_layers, select_layers
from splora_callback._io import OutputExistsError
from splora_callback.adapter_files import lora_updates_from_adapter
from splora_callback.layers import unwrap_peft
from splora_callback.pruning import write_adapter

INPUT = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def chosen_layers(model, base_dir, k=3):
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    return alignment, select_layers(score_layers(model, alignment), "top_k", k=k)


def test_prune_round_trip_matches_disabled_layers_and_reloads_exactly(planted_llama, tmp_path):
    model, base_dir, aligned_dir, orthogonal = planted_llama
    alignment, chosen = chosen_layers(model, base_dir)
    assert set(chosen) == orthogonal
    model.save_pretrained(tmp_path / "full")

    disabled = copy.deepcopy(model)
    for name in chosen:
        unwrap_peft(disabled).get_submodule(name).enable_adapters(False)
    expected = logits(disabled)
    assert not torch.allclose(expected, logits(model))  # the planted updates matter

    report = apply_action(model, alignment, chosen, action="prune")
    assert report.action == "prune" and report.layers == chosen and report.parameters_removed > 0
    for name in chosen:
        assert not isinstance(unwrap_peft(model).get_submodule(name), LoraLayer)  # no LoRA matmul left
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path / "pruned")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir), tmp_path / "pruned")
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-6)
    assert {u.name for u in lora_updates_from_adapter(tmp_path / "pruned")[0]} == set(orthogonal).symmetric_difference(
        {u.name for u in lora_updates_from_adapter(tmp_path / "full")[0]}
    )
    full_tensors = len(lora_updates_from_adapter(tmp_path / "full")[2])
    assert len(lora_updates_from_adapter(tmp_path / "pruned")[2]) == full_tensors - 2 * len(chosen)


def test_save_acted_adapter_leaves_live_model_untouched(planted_llama, tmp_path):
    model, base_dir, aligned_dir, _ = planted_llama
    alignment, chosen = chosen_layers(model, base_dir)
    before = logits(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    save_acted_adapter(model, tmp_path / "snapshot", chosen, "prune", alignment)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
    assert set(json.loads((tmp_path / "snapshot" / "adapter_config.json").read_text())["exclude_modules"]) == set(chosen)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir), tmp_path / "snapshot")
    apply_action(model, alignment, chosen, "prune")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-6)


def test_project_applies_safe_lora_c_b(planted_llama, tmp_path):
    model, base_dir, aligned_dir, _ = planted_llama
    alignment, chosen = chosen_layers(model, base_dir, k=2)
    save_acted_adapter(model, tmp_path / "projected", chosen, "project", alignment)
    expected = {}
    for name in chosen:
        direction = alignment.directions[name].double()
        alignment_matrix = direction @ direction.T / torch.linalg.matrix_norm(direction)  # dense C
        expected[name] = alignment_matrix @ unwrap_peft(model).get_submodule(name).lora_B["default"].weight.double()
    report = apply_action(model, alignment, chosen, action="project")
    assert report.action == "project"
    for name in chosen:
        weight = unwrap_peft(model).get_submodule(name).lora_B["default"].weight
        torch.testing.assert_close(weight.double(), expected[name], rtol=1e-5, atol=1e-8)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir), tmp_path / "projected")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-6)


def test_unknown_action_and_already_pruned_layer(planted_llama):
    model, base_dir, _, _ = planted_llama
    alignment, chosen = chosen_layers(model, base_dir, k=1)
    with pytest.raises(ValueError, match="action='delete'"):
        apply_action(model, alignment, chosen, action="delete")
    apply_action(model, alignment, chosen, action="prune")
    with pytest.raises(KeyError, match="already pruned"):
        apply_action(model, alignment, chosen, action="prune")


def test_existing_output_is_refused_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    state = {"base_model.model.x.lora_A.weight": torch.ones(2, 3)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    write_adapter(tmp_path / "out", state, config)
    original = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        write_adapter(tmp_path / "out", {k: v * 2 for k, v in state.items()}, config)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("splora_callback.pruning.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_adapter(tmp_path / "out", state, config, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        write_adapter(tmp_path / "fresh", state, config)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == original  # old one intact
    assert not (tmp_path / "fresh").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no temporary left behind
