"""Offline, deterministic test environment: no Hub, W&B offline, few threads."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, tests/reference.py

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add overhead, and CI has 2 cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    """A saved tiny Llama "base", and an "aligned" copy with planted rank-2 V on q/k/v/o."""
    from tiny import llama_attention_names, save_pair, tiny_llama

    return save_pair(tmp_path_factory.mktemp("llama"), tiny_llama, llama_attention_names)


@pytest.fixture
def planted_llama(llama_pair):
    """(peft_model, base_dir, aligned_dir, orthogonal names): LoRA planted inside V's column space,
    except in ``orthogonal`` layers where it is orthogonal to it."""
    from tiny import add_lora, plant_updates
    from transformers import AutoModelForCausalLM

    base_dir, aligned_dir, bases = llama_pair
    model = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir))
    names = list(bases)
    orthogonal = {names[0], names[3], names[6]}  # layer 0 q/o, layer 1 v: both weight shapes
    plant_updates(model, bases, orthogonal)
    return model, base_dir, aligned_dir, orthogonal
