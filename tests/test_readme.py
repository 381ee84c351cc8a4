"""The README's quickstart runs as written: Hub ids swapped for tiny local checkpoints, W&B offline."""

import json
import re
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from tiny import llama_attention_names, save_pair, tiny_llama

README = Path(__file__).parents[1] / "README.md"


def quickstart_block() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_saves_a_pruned_adapter(tmp_path, monkeypatch):
    base_dir, aligned_dir, _ = save_pair(tmp_path, partial(tiny_llama, layers=4), llama_attention_names)
    code = quickstart_block()
    code = code.replace('"meta-llama/Llama-2-7b-hf"', repr(str(base_dir)))
    code = code.replace('"meta-llama/Llama-2-7b-chat-hf"', repr(str(aligned_dir)))
    assert str(base_dir) in code and str(aligned_dir) in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    tokens = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    train_dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "labels": tokens.tolist()})
    namespace = {"train_dataset": train_dataset}
    try:
        exec(compile(code, "README quickstart", "exec"), namespace)
    finally:
        import wandb

        wandb.finish()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert len(config["exclude_modules"]) == 10  # k=10 of the 16 q/k/v/o modules pruned
    report = json.loads((tmp_path / "out" / "splora_report.json").read_text())
    assert sorted(report["action"]["layers"]) == sorted(config["exclude_modules"])
