"""Finding a live model's LoRA layers, and reading their factors from it and from saved adapters (the same updates as PEFT)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from splora_callback import lora_updates_from_model
from splora_callback.adapter_files import lora_updates_from_adapter, read_adapter_config
from splora_callback.layers import (
    UnsupportedAdapterError,
    adapter_names,
    get_lora_layer,
    iter_lora_layers,
    unwrap_peft,
)


@pytest.mark.parametrize(
    "extra", [{}, {"use_rslora": True}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"model.layers.1.self_attn.v_proj": 3}}]
)
def test_adapter_dir_updates_equal_live_updates_and_peft_delta(llama_pair, tmp_path, extra):
    _, aligned_dir, _ = llama_pair
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(aligned_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra))
    for layer in unwrap_peft(model).modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"].weight)
    model.save_pretrained(tmp_path)
    live = {update.name: update for update in lora_updates_from_model(model)}
    saved, _, _ = lora_updates_from_adapter(tmp_path)
    assert {update.name for update in saved} == set(live)
    for update in saved:
        assert update.scaling == pytest.approx(live[update.name].scaling)
        expected = unwrap_peft(model).get_submodule(update.name).get_delta_weight("default")
        torch.testing.assert_close(update.delta_weight(), expected)


def test_gpt2_updates_are_in_weight_orientation(tmp_path):
    from tiny import add_lora, tiny_gpt2

    model = add_lora(tiny_gpt2(), targets=["c_attn"], fan_in_fan_out=True)
    for update in lora_updates_from_model(model):
        layer = unwrap_peft(model).get_submodule(update.name)
        assert update.shape == (96, 32) and update.fan_in_fan_out
        torch.testing.assert_close(update.delta_weight(), layer.get_delta_weight("default").T)


def test_unsupported_adapter_configs_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(UnsupportedAdapterError, match="is not LORA"):
        read_adapter_config(tmp_path)


def test_one_walk_finds_the_lora_layers_by_type_and_adapter():
    from tiny import add_lora, tiny_llama

    model = add_lora(tiny_llama(), targets=["q_proj", "v_proj"])
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    names = [name for name, _ in iter_lora_layers(model, "default")]
    assert names == [f"model.layers.{i}.self_attn.{kind}" for i in range(2) for kind in ("q_proj", "v_proj")]
    assert [name for name, _ in iter_lora_layers(model, "other")] == names[::2]
    assert [name for name, _ in iter_lora_layers(model)] == names  # any adapter
    assert [name for name, _ in iter_lora_layers(model, "default", unwrap=False)] == [
        "base_model.model." + name for name in names]
    assert adapter_names(model) == {"default", "other"}
    assert get_lora_layer(model, names[1], "default") is dict(iter_lora_layers(model, "default"))[names[1]]
    with pytest.raises(KeyError, match="is not a LoRA layer of adapter 'other'"):
        get_lora_layer(model, names[1], "other")
