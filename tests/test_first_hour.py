"""What a new user meets in the first hour (issue 28): the card survives the Trainer's own card
writing and ``push_to_hub``, console lines start a line under tqdm, the end line says what was done
in the unit acted on (or, monitor-only, how far the model drifted), and no internal reference
("spec 3c", a ``docs/`` path a pip user does not have) reaches what users read."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from tiny import add_lora, llama_attention_names, save_pair, tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from splora_callback import SPLoRACallback
from splora_callback.model_card import BEGIN, END, PIPELINE_TAG, TAGS

INTERNAL = re.compile(r"\bspec \d|\(spec\b|\bdocs/[\w./-]+\.md|\.\./docs/")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base_dir, aligned_dir, _ = save_pair(tmp_path_factory.mktemp("pair"), tiny_llama, llama_attention_names)
    return base_dir, aligned_dir


def tokens(rows: int = 16, length: int = 12) -> Dataset:
    ids = torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def word_tokenizer(folder: Path):
    """A word-level tokenizer whose 128 ids fit the tiny model, with a chat template (TRL wants one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(125)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                        pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} <eos> {% endfor %}"
    tokenizer.save_pretrained(folder)
    return tokenizer


class FakeHub:
    """``transformers.trainer.hf_api()``: records the card each upload would send."""

    def __init__(self):
        self.cards: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"user/{Path(repo_id).name}")

    def upload_folder(self, *, folder_path, **kwargs):
        self.cards.append((Path(folder_path) / "README.md").read_text())
        return "https://huggingface.co/user/x/commit/0"


def assert_splora_card(text: str, aligned_dir: Path) -> None:
    card = ModelCard(text)
    assert card.text.count(BEGIN) == 1 and card.text.count(END) == 1, card.text[:400]
    assert card.text.index(BEGIN) < 40  # ours first, the trainer's text below
    assert card.data.base_model == str(aligned_dir)
    assert card.data.library_name == "peft" and card.data.pipeline_tag == PIPELINE_TAG
    assert set(TAGS) <= set(card.data.tags) and f"base_model:adapter:{aligned_dir}" in card.data.tags
    assert "2 of 8 LoRA layers removed" in card.text


def callback(pair) -> SPLoRACallback:
    return SPLoRACallback(base_model=str(pair[0]), metric="ediem", select="top_k", k=2, action="prune",
                          score_every_n_steps=2)


def test_trainer_create_model_card_and_push_to_hub_keep_the_splora_card(pair, tmp_path, monkeypatch):
    import transformers.trainer

    torch.manual_seed(0)
    trainer = Trainer(model=add_lora(LlamaForCausalLM.from_pretrained(pair[1])), train_dataset=tokens(),
                      callbacks=[callback(pair)],
                      args=TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()  # alone, it writes "More information needed" over the card
    text = (tmp_path / "out" / "README.md").read_text()
    assert_splora_card(text, pair[1])
    assert "More information needed" in text  # the Trainer's own text is kept, below ours
    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer.push_to_hub()
    assert len(hub.cards) == 1
    assert_splora_card(hub.cards[0], pair[1])


def test_sft_trainer_create_model_card_and_push_to_hub_keep_base_model_and_the_card(pair, tmp_path, monkeypatch):
    import transformers.trainer
    from trl import SFTConfig, SFTTrainer

    tokenizer = word_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    trainer = SFTTrainer(model=add_lora(LlamaForCausalLM.from_pretrained(pair[1])), processing_class=tokenizer,
                         train_dataset=tokens().remove_columns("labels"), callbacks=[callback(pair)],
                         args=SFTConfig(str(tmp_path / "out-sft"), max_steps=2, per_device_train_batch_size=4,
                                        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                        bf16=False))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()  # TRL's replaces the whole card, without base_model for a local model
    text = (tmp_path / "out-sft" / "README.md").read_text()
    assert_splora_card(text, pair[1])
    assert "sft" in ModelCard(text).data.tags  # TRL's metadata is merged, not dropped
    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer.push_to_hub()
    assert len(hub.cards) == 1
    assert_splora_card(hub.cards[0], pair[1])


SCRIPT = textwrap.dedent("""
    import sys, torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments
    sys.path.insert(0, {tests!r})
    from tiny import add_lora
    from splora_callback import SPLoRACallback

    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({{"input_ids": ids.tolist(), "labels": ids.tolist()}})
    torch.manual_seed(0)
    callback = SPLoRACallback(base_model={base!r}, score_every_n_steps=2)  # no probe: monitor only
    trainer = Trainer(model=add_lora(LlamaForCausalLM.from_pretrained({aligned!r})), train_dataset=data,
                      callbacks=[callback],
                      args=TrainingArguments({out!r}, max_steps=4, per_device_train_batch_size=4, report_to=[],
                                             use_cpu=True, save_strategy="no", disable_tqdm=False))
    trainer.train()
""")


def visible_lines(stream: str) -> list[str]:
    """What a terminal shows: each line with its carriage returns applied (later text over earlier)."""
    lines = []
    for raw in stream.split("\n"):
        screen = ""
        for part in raw.split("\r"):
            screen = part + screen[len(part):]
        lines.append(screen.rstrip())
    return lines


def test_console_lines_start_a_line_under_the_trainers_progress_bar_and_monitor_only_ends_with_a_verdict(
        pair, tmp_path):
    script = SCRIPT.format(tests=str(Path(__file__).parent), base=str(pair[0]), aligned=str(pair[1]),
                           out=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = done.stderr
    assert "it/s]SPLoRA" not in raw and "s/it]SPLoRA" not in raw
    lines = visible_lines(raw)
    end = [line for line in lines if "SPLoRA: " in line and "adapter:" in line]
    assert len(end) == 1 and end[0].startswith("SPLoRA: "), end
    line = end[0]
    # monitor only: nothing changed, said so; how far it drifted; where the report is
    assert line.startswith("SPLoRA: monitor only, nothing changed")
    assert "most drift from alignment (E-DIEM): " in line and "no safety probe" in line
    assert f"report {tmp_path / 'out' / 'splora_report.html'}" in line
    assert "SPLoRA none:" not in raw  # the action 'none' no longer reads as if something acted
    assert not INTERNAL.search(raw), INTERNAL.search(raw)
