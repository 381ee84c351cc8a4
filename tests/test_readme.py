"""The README's quickstart runs as written: Hub ids swapped for tiny local checkpoints, W&B offline.

The aligned checkpoint gets a word-level tokenizer (with a chat template, for the SFTTrainer block)
whose vocabulary fits the tiny model's 128 ids, and ``SFTConfig`` gets ``use_cpu=True`` (its bfloat16
default needs it on a CPU-only machine); everything else in the two blocks runs unchanged.
"""

import json
import re
from functools import partial
from pathlib import Path

from tiny import llama_attention_names, save_pair, tiny_llama

README = Path(__file__).parents[1] / "README.md"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def quickstart_blocks() -> list[str]:
    """The Trainer block and the SFTTrainer block of the Quickstart section."""
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return [block for block in blocks if "trainer.train()" in block]


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>"]
    words += sorted(set(re.findall(r"\w+|[^\w\s]", " ".join(quickstart_blocks()))))[: 120 - len(words)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE  # no pad token: the quickstart sets it, as for Llama-2
    tokenizer.save_pretrained(folder)


def test_quickstart_blocks_run_and_save_pruned_adapters_with_cards(tmp_path, monkeypatch):
    base_dir, aligned_dir, _ = save_pair(tmp_path, partial(tiny_llama, layers=4), llama_attention_names)
    save_tokenizer(aligned_dir)
    blocks = quickstart_blocks()
    assert len(blocks) == 2 and "SFTTrainer" in blocks[1]
    code = "\n".join(blocks)
    code = code.replace('"meta-llama/Llama-2-7b-hf"', repr(str(base_dir)))
    code = code.replace('"meta-llama/Llama-2-7b-chat-hf"', repr(str(aligned_dir)))
    assert str(base_dir) in code and str(aligned_dir) in code
    # SFTConfig trains in bfloat16 by default, which a CPU-only machine accepts only with use_cpu=True
    code = code.replace('SFTConfig("out-sft", ', 'SFTConfig("out-sft", use_cpu=True, ')
    assert "use_cpu=True" in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    namespace = {}
    try:
        exec(compile(code, "README quickstart", "exec"), namespace)
    finally:
        import wandb

        wandb.finish()
        wandb.teardown()  # a W&B setup left behind would be reused by later tests (another WANDB_DIR, mode)
    for out in ("out", "out-sft"):
        config = json.loads((tmp_path / out / "adapter_config.json").read_text())
        assert len(config["exclude_modules"]) == 10  # k=10 of the 16 q/k/v/o modules pruned
        report = json.loads((tmp_path / out / "splora_report.json").read_text())
        assert sorted(report["action"]["layers"]) == sorted(config["exclude_modules"])
        assert "10 of 16 LoRA layers removed" in (tmp_path / out / "README.md").read_text()
        assert (tmp_path / out / "splora_report.html").is_file()
