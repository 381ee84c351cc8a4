"""The README runs as written: every ``python`` block, in order, as one script (the blocks share
their names, as a reader's session would), with the two Hub ids swapped for tiny local checkpoints
and W&B offline.

What is swapped, and nothing else: the aligned checkpoint gets a word-level tokenizer (with a chat
template, for the SFTTrainer blocks) whose vocabulary fits the tiny model's 128 ids; ``SFTConfig``
gets ``use_cpu=True`` (its bfloat16 default needs it on a CPU-only machine); the ``TrlParser`` block
reads the command line its comment shows (Hub id swapped). The ``bash`` blocks are commands of
``make`` and the recipes (run by tests/test_recipes.py and the CI) or the CLI's synopsis (each
command is tested in tests/test_cli.py).
"""

import json
import re
import sys
from functools import partial
from pathlib import Path

from tiny import llama_attention_names, save_pair, tiny_llama

README = Path(__file__).parents[1] / "README.md"
BASE_ID, ALIGNED_ID = "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>"]
    words += sorted(set(re.findall(r"\w+|[^\w\s]", " ".join(python_blocks()))))[: 120 - len(words)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE  # no pad token: the Trainer block sets it, as for Llama-2
    tokenizer.save_pretrained(folder)


def test_the_quickstart_comes_first_and_takes_the_recommended_path():
    text = README.read_text()
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections[:2] == ["Install", "Quickstart: repair with your own harmful prompts"]
    assert text.index("## Quickstart") < text.index("**An honest note.**") < text.index("## Set-up")
    install = re.search(r"## Install\n\n```bash\n(.*?)```", text, re.S).group(1)
    assert install.startswith("pip install ")
    quickstart = python_blocks()[0]
    code = [line for line in quickstart.splitlines() if line.strip() and not line.startswith(("from ", "import "))]
    assert len(code) <= 12, len(code)  # about ten lines of code after the imports
    assert "SPLoRACallback(base_model=BASE, probe=probe)" in quickstart and "harmful_requests = [" in quickstart
    assert "top_k" not in quickstart and "action=" not in quickstart  # the default repair, not E-DIEM pruning
    assert "monitor only" in python_blocks()[1]
    # one import path per public name across the README
    paths: dict[str, set[str]] = {}
    for module, names in re.findall(r"^from (splora_callback[\w.]*) import (.+)$", text, re.M):
        for name in names.split(","):
            paths.setdefault(name.strip(), set()).add(module)
    assert all(len(modules) == 1 for modules in paths.values()), {n: m for n, m in paths.items() if len(m) > 1}


def test_every_python_block_of_the_readme_runs_on_tiny_models(tmp_path, monkeypatch):
    base_dir, aligned_dir, _ = save_pair(tmp_path, partial(tiny_llama, layers=4), llama_attention_names)
    save_tokenizer(aligned_dir)
    blocks = python_blocks()
    assert len(blocks) == 11  # quickstart, monitor-only, Trainer, QLoRA, post hoc, safety patch, components,
    # repair, rate stop, TrlParser, rule
    code = "\n".join(blocks)
    assert code.count(repr(BASE_ID).replace("'", '"')) >= 1 and code.count(ALIGNED_ID) >= 1
    code = code.replace(f'"{BASE_ID}"', repr(str(base_dir))).replace(f'"{ALIGNED_ID}"', repr(str(aligned_dir)))
    # SFTConfig trains in bfloat16 by default, which a CPU-only machine accepts only with use_cpu=True
    assert code.count('SFTConfig("out", ') == 1
    code = code.replace('SFTConfig("out", ', 'SFTConfig("out", use_cpu=True, ')
    parsed = re.search(r"# python train.py (.*?)  \(or --config", code).group(1)
    argv = ["train.py", *parsed.replace(BASE_ID, str(base_dir)).split(), "--use_cpu", "true"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    namespace = {"__name__": "readme"}
    try:
        exec(compile(code, "README.md python blocks", "exec"), namespace)
    finally:
        import wandb

        wandb.finish()
        wandb.teardown()  # a W&B setup left behind would be reused by later tests (another WANDB_DIR, mode)
    for out in ("out", "out-trainer"):
        report = json.loads((tmp_path / out / "splora_report.json").read_text())
        assert report["config"]["metric"] == "probe" and (tmp_path / out / "splora_report.html").is_file()
        card = (tmp_path / out / "README.md").read_text()
        assert "<!-- splora:begin -->" in card and "Measured: refusal loss" in card
        assert (tmp_path / out / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "pruned-adapter" / "adapter_config.json").is_file()  # the post hoc block
    assert (tmp_path / "out" / "patched-adapter" / "adapter_config.json").is_file()  # the safety patch block
    assert namespace["splora_config"].base_model == str(base_dir)  # the TrlParser block read its command line
