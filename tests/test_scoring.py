"""score_layers on real PEFT models: planted cases, statuses, adapters, LoRA variants."""

import math

import pytest
import torch
from reference import dense_geometry
from tiny import add_lora, save_pair, tiny_gpt2
from transformers import AutoModelForCausalLM

from splora_callback import AlignmentSubspace, LayerScores, score_layers, select_layers
from splora_callback.layers import NoLoraLayersError, UnsupportedAdapterError, unwrap_peft


@pytest.mark.parametrize("metric", ["ediem", "cosine"])
def test_planted_orthogonal_layers_rank_first_and_top_k_picks_exactly_them(planted_llama, metric):
    model, base_dir, _, orthogonal = planted_llama
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    scores = score_layers(model, alignment, metric=metric)
    assert set(select_layers(scores, "top_k", k=len(orthogonal))) == orthogonal
    for name in orthogonal:
        assert scores[name].relative_distance == pytest.approx(1.0, abs=1e-5)
        assert scores[name].cosine == pytest.approx(0.0, abs=1e-5)
    for name in set(scores.layers) - orthogonal:
        assert scores[name].relative_distance == pytest.approx(0.0, abs=1e-3)
        assert scores[name].cosine == pytest.approx(1.0, abs=1e-5)


def test_scores_match_dense_reference_on_live_model(planted_llama):
    model, base_dir, aligned_dir, _ = planted_llama
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    scores = score_layers(model, alignment)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for name, layer in unwrap_peft(model).named_modules():
        if name in scores.layers:
            direction = layer.base_layer.weight.double() - base.get_submodule(name).weight.double()
            delta = layer.get_delta_weight("default").double()
            dense = dense_geometry(direction, delta)
            assert scores[name].relative_distance == pytest.approx(dense["relative_distance"], abs=1e-5)
            assert scores[name].cosine == pytest.approx(dense["cosine"], abs=1e-5)
            assert scores[name].signed_alignment == pytest.approx(dense["signed_alignment"], abs=1e-5)


def test_fresh_lora_layers_are_inactive_and_never_selected(llama_pair):
    base_dir, aligned_dir, _ = llama_pair
    model = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir))  # B = 0 at init
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    scores = score_layers(model, alignment)
    assert {score.status for score in scores} == {"inactive"}
    assert all(score.ediem is None and score.cosine is None for score in scores)
    assert select_layers(scores, "top_k", k=3) == []


def test_modules_without_alignment_signal_are_reported_not_selected(llama_pair, tmp_path):
    base_dir, _, _ = llama_pair
    model = add_lora(AutoModelForCausalLM.from_pretrained(base_dir))  # aligned == base: V = 0
    for layer in unwrap_peft(model).modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"].weight)
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    scores = score_layers(model, alignment)
    assert {score.status for score in scores} == {"no_alignment"}
    assert select_layers(scores, "fraction", fraction=1.0) == []


def test_permutation_null_is_seeded_and_flags_orthogonal_layers(planted_llama):
    model, base_dir, _, orthogonal = planted_llama
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    first = score_layers(model, alignment, null="permutation", seed=3)
    again = score_layers(model, alignment, null="permutation", seed=3)
    assert [s.ediem for s in first] == [s.ediem for s in again]
    # permuting B's rows moves an inside update out of V's span: inside layers score far below
    inside = set(first.layers) - orthogonal
    assert max(first[name].ediem for name in inside) < min(first[name].ediem for name in orthogonal)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    def c_attn_names(model):
        return [name for name, _ in model.named_modules() if name.endswith("attn.c_attn")]

    base_dir, aligned_dir, bases = save_pair(tmp_path, tiny_gpt2, c_attn_names, fan_in_fan_out=True)
    model = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir), targets=["c_attn"], fan_in_fan_out=True)
    layers = {name: module for name, module in unwrap_peft(model).named_modules() if name in bases}
    with torch.no_grad():
        for module in layers.values():
            torch.nn.init.normal_(module.lora_B["default"].weight)
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    scores = score_layers(model, alignment)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for name, module in layers.items():
        direction = (module.base_layer.weight - base.get_submodule(name).weight).T  # (n, m) -> (m, n)
        delta = module.get_delta_weight("default").T  # PEFT returns Conv1D orientation
        assert tuple(alignment.directions[name].shape) == (96, 32)
        dense = dense_geometry(direction, delta)
        assert scores[name].relative_distance == pytest.approx(dense["relative_distance"], abs=1e-5)
        assert scores[name].cosine == pytest.approx(dense["cosine"], abs=1e-5)


def test_rslora_and_rank_alpha_patterns_use_peft_scaling(llama_pair):
    from peft import LoraConfig, get_peft_model

    base_dir, aligned_dir, _ = llama_pair
    for extra in ({"use_rslora": True}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}}):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(aligned_dir), config)
        for layer in unwrap_peft(model).modules():
            if hasattr(layer, "lora_B"):
                torch.nn.init.normal_(layer.lora_B["default"].weight)
        scores = score_layers(model, AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False))
        for name, layer in unwrap_peft(model).named_modules():
            if name in scores.layers:
                expected = float(torch.linalg.matrix_norm(layer.get_delta_weight("default").double()))
                assert scores[name].update_norm == pytest.approx(expected, rel=1e-5)
    assert math.isclose(8 / math.sqrt(4), 4.0)  # rsLoRA scaling differs from alpha/r = 2 here


def test_active_adapter_is_scored_and_ambiguity_is_refused(llama_pair):
    from peft import LoraConfig

    base_dir, aligned_dir, _ = llama_pair
    model = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    assert len(score_layers(model, alignment)) == 8  # "default" is active: q/k/v/o x 2 layers
    assert len(score_layers(model, alignment, adapter_name="other")) == 2
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="2 active adapters"):
        score_layers(model, alignment)


def test_model_without_lora_and_dora_are_refused(llama_pair):
    base_dir, aligned_dir, _ = llama_pair
    plain = AutoModelForCausalLM.from_pretrained(aligned_dir)
    with pytest.raises(NoLoraLayersError, match="no LoRA layer"):
        score_layers(plain, None, metric="probe", probe=object())
    dora = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir), use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="DoRA adapters are not supported"):
        score_layers(dora, AlignmentSubspace.from_pretrained(base_dir, model=dora, progress=False))


def test_nan_lora_weights_are_refused(planted_llama):
    model, base_dir, _, _ = planted_llama
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    layer = unwrap_peft(model).get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        score_layers(model, alignment)


def test_scores_round_trip_through_dict(planted_llama):
    model, base_dir, _, _ = planted_llama
    scores = score_layers(model, AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False))
    again = LayerScores.from_dict(scores.to_dict())
    assert again.to_dict() == scores.to_dict()
    assert select_layers(again, "top_k", k=3) == select_layers(scores, "top_k", k=3)
