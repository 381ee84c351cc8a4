"""Model cards of the adapters the library writes, and pushing them to a local stand-in of the Hub
(splora_callback.model_card)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import PeftModel
from tiny import add_lora, llama_attention_names, save_pair, tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from splora_callback import SPLoRACallback
from splora_callback.model_card import BEGIN, END, TAGS, CardFacts, push_adapter_to_hub, write_model_card
from splora_callback.probe import SafetyProbe
from splora_callback.report import load_report


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base_dir, aligned_dir, _ = save_pair(tmp_path_factory.mktemp("pair"), tiny_llama, llama_attention_names)
    return base_dir, aligned_dir


def probe() -> SafetyProbe:
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    return SafetyProbe.from_tensors(ids, torch.ones_like(ids), torch.where(torch.arange(12) < 6, -100, ids))


@pytest.fixture(scope="module")
def trained(pair, tmp_path_factory):
    """A finished run (pruned at the end, acted copies at checkpoints) and its saved adapter."""
    out = tmp_path_factory.mktemp("run") / "out"
    ids = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(0))
    callback = SPLoRACallback(base_model=str(pair[0]), metric="ediem", select="top_k", k=3, action="prune",
                              score_every_n_steps=4, probe=probe(),
                              prune_at_checkpoints=True)
    torch.manual_seed(0)
    trainer = Trainer(model=add_lora(LlamaForCausalLM.from_pretrained(pair[1])), callbacks=[callback],
                      train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
                      args=TrainingArguments(str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=4,
                                             disable_tqdm=True))
    trainer.train()
    trainer.save_model()  # into output_dir: PEFT updates the card the callback wrote there
    return trainer, callback, out


def test_the_saved_adapter_carries_the_splora_card_through_peft_save_pretrained(trained, pair):
    trainer, callback, out = trained
    card = ModelCard.load(out / "README.md")
    text = card.text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert card.data.base_model == str(pair[1])  # the model the adapter applies to (the Hub's convention)
    assert card.data.library_name == "peft" and "splora" in card.data.tags  # kept by PEFT (model tags)
    assert f"| Aligned model (this adapter applies to it) | `{pair[1]}` |" in text
    assert f"`{pair[0]}`" in text and "metric `ediem`, `top_k` (k=3)" in text
    assert "3 of 8 LoRA layers removed" in text
    assert all(f"`{name}`" in text for name in callback.action_report["layers"])
    report = load_report(out)
    before = report["history"][-1]["scores"]["losses"]["refusal"]
    after, aligned = report["safety"]["after_action"]["refusal_loss"], report["safety"]["aligned_refusal_loss"]
    assert (f"{before:.3f} at the end of training, {after:.3f} after the action; aligned model {aligned:.3f}"
            in text)
    assert "[splora_report.html](splora_report.html)" in text and (out / "splora_report.html").is_file()
    assert "- PEFT" in text  # PEFT's own update came after ours and kept it
    # the card does not get in the way of loading the adapter
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pair[1]), out)
    assert len(reloaded.peft_config["default"].exclude_modules) == 3


def test_every_acted_checkpoint_copy_has_its_card(trained):
    _, _, out = trained
    for step in (4, 8):
        folder = out / f"checkpoint-{step}" / "splora"
        text = (folder / "README.md").read_text()
        chosen = load_report(folder)["action"]["layers"]
        assert "3 of 8 LoRA layers removed" in text and all(f"`{name}`" in text for name in chosen)
        assert "[splora_report.json](splora_report.json)" in text and f"step {step} (checkpoint)" in text


def test_rewriting_a_card_replaces_our_block_and_keeps_a_trainers_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- trl\n- sft\n---\n\n# My fine-tune\n\nTrained with TRL.\n")
    facts = CardFacts(aligned="org/chat", base="org/base", rule="metric `ediem`", action="prune",
                      acted=["model.layers.0.self_attn.v_proj"], total_layers=4)
    write_model_card(tmp_path, facts)
    write_model_card(tmp_path, facts)  # twice: one block
    card = ModelCard.load(tmp_path / "README.md")
    assert card.text.count(BEGIN) == 1 and "# My fine-tune" in card.text and "Trained with TRL." in card.text
    assert card.data.tags == ["trl", "sft", *TAGS, "base_model:adapter:org/chat"] and card.data.license == "mit"
    assert card.data.pipeline_tag == "text-generation"
    assert card.text.index(BEGIN) < card.text.index("# My fine-tune")
    assert card.data.base_model == "org/chat"


class LocalHub:
    """A stand-in for the Hugging Face Hub: repositories are folders under ``root``; ``create_repo``,
    ``create_commit`` (what ``upload_folder`` and transformers' ``push_to_hub`` call), the card
    download of ``ModelCard.load`` and the README metadata check of ``upload_folder`` (the Hub's
    ``/api/validate-yaml``; here: the YAML must parse into a card) are patched onto huggingface_hub."""

    def __init__(self, root: Path, monkeypatch):
        import huggingface_hub
        import huggingface_hub.hf_api
        import huggingface_hub.repocard
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.errors import EntryNotFoundError

        self.root, self.commits = root, []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            (hub.root / repo_id).mkdir(parents=True, exist_ok=True)
            return SimpleNamespace(repo_id=repo_id)

        def create_commit(api, repo_id, operations, **kwargs):
            added = []
            for operation in operations:
                assert isinstance(operation, CommitOperationAdd)
                target = hub.root / repo_id / operation.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                with operation.as_file() as source:
                    target.write_bytes(source.read())
                added.append(operation.path_in_repo)
            hub.commits.append(sorted(added))
            return SimpleNamespace(commit_url=f"local://{repo_id}/commit/{len(hub.commits)}")

        def download(repo_id, filename, **kwargs):
            path = hub.root / repo_id / filename
            if not path.is_file():
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            return str(path)

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
        monkeypatch.setattr(huggingface_hub.HfApi, "_validate_yaml", lambda api, content, **kwargs: ModelCard(content))
        # with hf_xet installed, upload_folder streams through its own pipeline; the single-commit path
        # goes through create_commit, which this stand-in implements
        monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
        monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", download)

    def files(self, repo_id: str) -> list[str]:
        return sorted(str(p.relative_to(self.root / repo_id)) for p in (self.root / repo_id).rglob("*") if p.is_file())


def test_push_adapter_to_hub_uploads_adapter_card_and_report_not_the_checkpoints(trained, tmp_path, monkeypatch):
    _, _, out = trained
    hub = LocalHub(tmp_path / "hub", monkeypatch)
    url = push_adapter_to_hub(out, "me/chat-lora-splora")
    assert url == "local://me/chat-lora-splora/commit/1"
    assert hub.files("me/chat-lora-splora") == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                "splora_report.html", "splora_report.json"]
    assert (tmp_path / "hub/me/chat-lora-splora/README.md").read_text() == (out / "README.md").read_text()


def test_peft_push_to_hub_keeps_the_card_already_on_the_hub(trained, pair, tmp_path, monkeypatch):
    trainer, _, out = trained
    hub = LocalHub(tmp_path / "hub", monkeypatch)
    # PEFT's (transformers') push_to_hub writes the card of the Hub repo over README.md: a fresh repo
    # gets a blank template, which is why push_adapter_to_hub uploads the folder with its card
    trainer.model.push_to_hub("me/fresh")
    assert BEGIN not in (tmp_path / "hub/me/fresh/README.md").read_text()
    push_adapter_to_hub(out, "me/repaired")
    trainer.model.push_to_hub("me/repaired")  # e.g. a later re-push of the weights
    card = (tmp_path / "hub/me/repaired/README.md").read_text()
    assert card.count(BEGIN) == 1 and "3 of 8 LoRA layers removed" in card
    assert "adapter_model.safetensors" in hub.files("me/repaired") and len(hub.commits) == 3


def test_push_adapter_to_hub_refuses_a_folder_without_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found: run trainer.save_model"):
        push_adapter_to_hub(tmp_path, "me/x")
    shutil.copy(Path(__file__), tmp_path / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="README.md not found"):
        push_adapter_to_hub(tmp_path, "me/x")
