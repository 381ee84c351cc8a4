"""One-line set-up: keyword construction, base_model="auto" (local card, known pairs, errors), and a
base download that fetches only what the streaming reader needs (splora_callback.base_models)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard, ModelCardData
from tiny import add_lora, llama_attention_names, save_pair, tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from splora_callback import SPLoRACallback, SPLoRAConfig
from splora_callback.base_models import (
    AUTO,
    KNOWN_PAIRS,
    BaseModelNotFound,
    aligned_name_or_path,
    hub_allow_patterns,
    infer_base_model,
)
from splora_callback.checkpoint import resolve_checkpoint
from splora_callback.report import load_report


@pytest.fixture
def pair(tmp_path):
    base_dir, aligned_dir, _ = save_pair(tmp_path / "pair", tiny_llama, llama_attention_names)
    return base_dir, aligned_dir


def write_card(folder, **data) -> None:
    ModelCard.from_template(ModelCardData(**data), model_description="An aligned model.").save(folder / "README.md")


def test_keywords_build_the_same_callback_as_a_config():
    by_keywords = SPLoRACallback(base_model="meta-llama/Llama-2-7b-hf", select="top_k", k=10)
    by_config = SPLoRACallback(SPLoRAConfig(base_model="meta-llama/Llama-2-7b-hf", select="top_k", k=10))
    assert by_keywords.config == by_config.config and by_keywords.base_model_source == "given"
    assert SPLoRACallback(k=10).config.select == "top_k"  # the inference SPLoRAConfig does, unchanged
    with pytest.raises(TypeError, match="not both .*got config and k"):
        SPLoRACallback(SPLoRAConfig(base_model="b"), k=3)
    with pytest.raises(ValueError, match=r"SPLoRAConfig.k=-1"):  # the config's own checks, by field name
        SPLoRACallback(base_model="b", select="top_k", k=-1)


def test_no_arguments_means_infer_the_base_and_safe_defaults():
    callback = SPLoRACallback()
    assert callback.config.base_model == AUTO and callback.config.select == "fraction"
    assert callback.config.action == "none" and callback.config.alignment_placement == "stream"  # monitor only
    plan, doubtful = callback.config.plan()
    assert plan.startswith("SPLoRA: monitoring E-DIEM and cosine") and "nothing is pruned" in plan
    assert "probe=SafetyProbe" in plan and not doubtful
    probe_only = SPLoRACallback(metric="probe", probe=object())
    assert probe_only.config.base_model is None  # the probe needs no geometry
    patch = SPLoRACallback(probe=object())  # a probe alone: the study's pick, the safety patch; E-DIEM still scored
    assert (patch.config.metric, patch.config.select, patch.config.action) == ("probe", "fraction", "patch")
    assert patch.config.base_model == AUTO
    repair = SPLoRACallback(probe=object(), select="repair")  # a rule named: the measured component repair
    assert (repair.config.granularity, repair.config.action) == ("component", "prune")
    assert SPLoRACallback(base_model="b", k=3, action="prune").config.plan()[1]  # E-DIEM pruning: warned


def test_known_pairs_answer_offline_and_fast():
    start = time.perf_counter()
    assert infer_base_model("meta-llama/Llama-2-7b-chat-hf") == ("meta-llama/Llama-2-7b-hf", "known pairs")
    assert time.perf_counter() - start < 1.0
    for aligned in ("meta-llama/Meta-Llama-3-8B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3",
                    "Qwen/Qwen2.5-7B-Instruct", "google/gemma-2-9b-it", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert infer_base_model(aligned)[0] == KNOWN_PAIRS[aligned]
    assert all(base != aligned and "nstruct" not in base and not base.endswith("-it")
               for aligned, base in KNOWN_PAIRS.items())


def test_an_unknown_hub_id_fails_fast_offline_naming_base_model():
    start = time.perf_counter()
    with pytest.raises(BaseModelNotFound, match=r"SPLoRACallback\(base_model=\.\.\.\).*") as error:
        infer_base_model("someone/finetuned-chat-7b")
    assert time.perf_counter() - start < 1.0
    assert "HF_HUB_OFFLINE=1" in str(error.value) and "known pairs" in str(error.value)


def test_base_inferred_from_a_local_card_in_a_real_training_run(pair, tmp_path):
    base_dir, aligned_dir = pair
    write_card(aligned_dir, base_model=str(base_dir))
    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    callback = SPLoRACallback(select="top_k", k=3, score_every_n_steps=2)  # no base_model: from the card
    model = add_lora(LlamaForCausalLM.from_pretrained(aligned_dir))
    assert aligned_name_or_path(model) == str(aligned_dir)
    trainer = Trainer(model=model, train_dataset=dataset, callbacks=[callback],
                      args=TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                             disable_tqdm=True))
    trainer.train()
    report = load_report(tmp_path / "out")
    assert report["config"]["base_model"] == str(base_dir)
    assert report["base_model_source"] == f"model card {aligned_dir / 'README.md'}"
    assert report["alignment"]["base"] == str(base_dir) and report["alignment"]["judgeable"] == 8
    assert len(report["action"]["layers"]) == 3
    # the saved state holds the resolved base, so a resumed callback does not infer it again
    assert callback.state()["args"]["config"]["base_model"] == str(base_dir)


def test_a_local_model_without_a_card_fails_before_the_first_step_naming_base_model(pair, tmp_path):
    _, aligned_dir = pair
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(model=add_lora(LlamaForCausalLM.from_pretrained(aligned_dir)),
                      train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
                      callbacks=[SPLoRACallback()],
                      args=TrainingArguments(str(tmp_path / "out"), max_steps=2, report_to=[], use_cpu=True))
    with pytest.raises(BaseModelNotFound, match="cannot infer the unaligned base") as error:
        trainer.train()
    assert f"{aligned_dir / 'README.md'} does not exist" in str(error.value)
    assert "SPLoRACallback(base_model=...)" in str(error.value) and trainer.state.global_step == 0


def test_cards_without_base_or_with_several_bases_are_refused(pair):
    _, aligned_dir = pair
    write_card(aligned_dir, license="mit")
    with pytest.raises(BaseModelNotFound, match="no base_model field"):
        infer_base_model(str(aligned_dir))
    write_card(aligned_dir, base_model=["org/a", "org/b"])
    with pytest.raises(BaseModelNotFound, match=r"several base models \['org/a', 'org/b'\]"):
        infer_base_model(str(aligned_dir))
    write_card(aligned_dir, base_model=str(aligned_dir))
    with pytest.raises(BaseModelNotFound, match="the aligned model itself"):
        infer_base_model(str(aligned_dir))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A Hub repository listing of a Mistral-style repo: sharded safetensors + index, a consolidated copy,
    .bin files and a tokenizer."""
    import huggingface_hub

    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                             "b.weight": "model-00002-of-00002.safetensors",
                                             "c.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = ["config.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "tokenizer.json"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, revision=None: str(tmp_path / filename))
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, allow_patterns=None: calls.append(allow_patterns) or str(tmp_path))
    return calls


def test_the_base_download_fetches_the_index_and_its_shards_only(fake_hub):
    assert hub_allow_patterns("mistralai/Mistral-7B-v0.3") == [
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    resolve_checkpoint("mistralai/Mistral-7B-v0.3")
    (patterns,) = fake_hub
    assert "consolidated.safetensors" not in patterns and "*.safetensors" not in patterns
    assert not any(name.endswith(".bin") or name.startswith("tokenizer") for name in patterns)


def test_offline_the_download_asks_the_cache_without_listing_the_repo(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("listed the Hub offline"))
    assert hub_allow_patterns("org/model") == ["*.safetensors", "model.safetensors.index.json"]


def test_the_package_imports_its_public_names_on_first_use():
    import subprocess
    import sys

    import splora_callback

    assert splora_callback.__all__ == sorted(splora_callback._EXPORTS)
    for name in splora_callback.__all__:
        assert getattr(splora_callback, name).__name__ == name
    # a fresh interpreter: importing the package loads neither torch nor transformers
    code = "import sys, splora_callback; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
