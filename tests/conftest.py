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


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread in every test, restored after one that changes it (two OpenMP threads on a
    loaded 2-core machine made a 64 x 64 matmul ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pair(llama_pair):
    """(base_dir, aligned_dir) of :func:`llama_pair`, what the Trainer tests read."""
    return llama_pair[0], llama_pair[1]


@pytest.fixture(scope="module")
def dataset():
    """32 random sequences of 16 tokens, labels = inputs: what the tiny Trainer runs train on."""
    from datasets import Dataset

    ids = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


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
