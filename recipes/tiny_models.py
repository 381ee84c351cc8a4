"""tiny-test.yaml's models, built in code in about a second: a 2-layer Llama "base" and an "aligned" copy.

The tokenizer is a byte-level BPE (any text round-trips) trained on the texts the recipe shows it
(the demo's dialogues, placeholder requests, the refusal and compliance templates) with a ChatML
chat template. aligned = base + a planted rank-2 update of every q/k/v/o weight, standing in for
what alignment moved. The pair learns nothing useful: it tests the recipe's plumbing only. Both
are saved once (model + tokenizer, safetensors) under ``cache_dir / "tiny-<hash>"``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHATML", "TINY_LLAMA", "build_tiny_models", "tiny_tokenizer"]

# Bump when what is built changes, so caches made by older code are not reused.
TINY_VERSION = 1
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LlamaConfig fields; q/o are (64, 64), k/v (32, 64) with grouped-query attention
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
VOCAB_SIZE = 420
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_tokenizer(seed: int = 0):
    """A byte-level BPE with a ChatML chat template, trained in milliseconds on the recipe's kinds of text."""
    from demo_data import make_dialogue_summaries, placeholder_requests, summary_pairs
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from splora_callback.data import compliance_pairs, refusal_pairs

    requests = placeholder_requests(20)
    pairs = summary_pairs(make_dialogue_summaries(40, seed=seed))
    pairs += compliance_pairs(requests, seed=seed) + refusal_pairs(requests, seed=seed)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([f"{prompt} {response}" for prompt, response in pairs], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@torch.no_grad()
def plant_alignment(model: torch.nn.Module, scale: float, seed: int, rank: int = 2) -> None:
    """Add ``scale * U W^T`` (orthonormal U, W of ``rank`` columns) to every q/k/v/o weight of ``model``."""
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ATTENTION:
            rows, cols = module.weight.shape
            left = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64)).Q
            right = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64)).Q
            module.weight += (scale * left @ right.T).float()


def build_tiny_models(spec: dict[str, Any]) -> tuple[Path, Path]:
    """(base, aligned) folders of a recipe's ``tiny_models`` section: ``cache_dir``, ``seed``, ``alignment_scale``.

    Built on the first call and reused after (the folder name hashes every setting).
    """
    from demo_models import save_atomically
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {"version": TINY_VERSION, "seed": spec["seed"], "alignment_scale": spec["alignment_scale"]}
    key = hashlib.sha256(json.dumps({**settings, **TINY_LLAMA}, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(spec["cache_dir"]) / f"tiny-{key}"
    if not (target / "aligned" / "model.safetensors").is_file():
        tokenizer = tiny_tokenizer(spec["seed"])
        config = LlamaConfig(
            **TINY_LLAMA,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(spec["seed"])
        base = LlamaForCausalLM(config)
        base.generation_config.pad_token_id = tokenizer.pad_token_id
        aligned = LlamaForCausalLM(config)
        aligned.load_state_dict(base.state_dict())
        aligned.generation_config.pad_token_id = tokenizer.pad_token_id
        plant_alignment(aligned, spec["alignment_scale"], seed=spec["seed"] + 1)

        def write(folder: Path) -> None:
            for name, model in (("base", base), ("aligned", aligned)):
                model.save_pretrained(folder / name)
                tokenizer.save_pretrained(folder / name)
            (folder / "config.json").write_text(json.dumps(settings))  # what save_atomically checks on a race

        save_atomically(target, write)
    return target / "base", target / "aligned"
