"""Tiny models built in-process (no download) and planted alignment cases, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """Llama with GQA: q/o are (64, 64), k/v are (32, 64)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 with Conv1D c_attn: weight stored (32, 96), i.e. (in, out)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64)).eval()


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


def linear_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


def plant_alignment(model: torch.nn.Module, names: list[str], rank: int = 2, scale: float = 0.05,
                    seed: int = 1, fan_in_fan_out: bool = False) -> dict[str, torch.Tensor]:
    """Add V = scale * U W^T (equal singular values) to each module's weight; return the U's (m, rank)."""
    generator = torch.Generator().manual_seed(seed)
    bases = {}
    with torch.no_grad():
        for name in names:
            weight = linear_weight(model, name)
            m, n = weight.T.shape if fan_in_fan_out else weight.shape
            left, right = orthonormal(m, rank, generator), orthonormal(n, rank, generator)
            direction = (scale * left @ right.T).float()
            weight += direction.T if fan_in_fan_out else direction
            bases[name] = left
    return bases


def save_pair(tmp: Path, model_fn, names_fn, seed: int = 0, fan_in_fan_out: bool = False):
    """Save a base model and an aligned copy with planted low-rank V; return (base_dir, aligned_dir, bases)."""
    base = model_fn(seed)
    base_dir = tmp / "base"
    base.save_pretrained(base_dir)
    aligned = model_fn(seed)
    bases = plant_alignment(aligned, names_fn(aligned), fan_in_fan_out=fan_in_fan_out)
    aligned_dir = tmp / "aligned"
    aligned.save_pretrained(aligned_dir)
    return base_dir, aligned_dir, bases


def llama_attention_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in ATTENTION]


def add_lora(model: torch.nn.Module, r: int = 4, alpha: int = 8, targets=ATTENTION, **kwargs):
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **kwargs)
    return get_peft_model(model, config)


def plant_updates(peft_model, bases: dict[str, torch.Tensor], orthogonal: set[str], seed: int = 2) -> None:
    """Set LoRA factors: B inside V's column space, or orthogonal to it for names in ``orthogonal``."""
    generator = torch.Generator().manual_seed(seed)
    root = peft_model.base_model.model
    with torch.no_grad():
        for name, left in bases.items():
            layer = root.get_submodule(name)
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            r = lora_a.shape[0]
            lora_a.copy_(torch.randn(lora_a.shape, generator=generator) * 0.1)
            if name in orthogonal:
                raw = torch.randn(lora_b.shape, generator=generator, dtype=torch.float64)
                up = raw - left @ (left.T @ raw)
            else:
                up = left @ torch.randn(left.shape[1], r, generator=generator, dtype=torch.float64)
            lora_b.copy_((0.1 * up).float())


def lora_trainer(aligned_dir: Path, dataset, output_dir: Path, callbacks=(), *, model=None, targets=ATTENTION,
                 processing_class=None, **overrides) -> Trainer:
    """A CPU ``Trainer`` of a LoRA (r=4 on ``targets``, LoRA A seeded) on the saved tiny Llama:
    12 steps of 4 sequences at lr 1e-2, logging every 4, no saves, no trackers; ``overrides`` are
    ``TrainingArguments`` fields; ``model``: a PEFT model to train instead."""
    if model is None:
        torch.manual_seed(0)  # LoRA A's init draws from the global RNG
        model = add_lora(LlamaForCausalLM.from_pretrained(aligned_dir), targets=targets)
    args = {"output_dir": str(output_dir), "max_steps": 12, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
            "logging_steps": 4, "save_strategy": "no", "report_to": [], "use_cpu": True, "disable_tqdm": True,
            "seed": 0, **overrides}
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=dataset, callbacks=list(callbacks),
                   processing_class=processing_class)
