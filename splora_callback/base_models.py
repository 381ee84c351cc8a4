"""Which unaligned base model an aligned model came from, for ``SPLoRACallback()`` with no arguments.

SPLoRA needs both: the aligned chat model being fine-tuned (its frozen weights are ``W_aligned``)
and the unaligned base it was aligned from (``W_base``). ``base_model="auto"`` (the callback's
default) finds the base, in this order:

1. the aligned model's model card metadata, ``base_model:`` (``huggingface_hub.ModelCard``), read
   from its local directory (``README.md``), without any network access;
2. :data:`KNOWN_PAIRS`, a short table of well-known aligned -> base pairs (no network);
3. the model card on the Hugging Face Hub (skipped offline, ``HF_HUB_OFFLINE=1``).

Otherwise a :class:`BaseModelNotFound` error names ``base_model`` and what was tried.

It also says what downloading a base from the Hub fetches (:func:`hub_allow_patterns`): the
safetensors shards its index lists and the index itself, never ``*.bin`` copies, consolidated
duplicates or tokenizer files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

AUTO = "auto"

# aligned (chat / instruct) Hub id -> its unaligned base, as the publishers name them
KNOWN_PAIRS: dict[str, str] = {
    **{f"meta-llama/Llama-2-{size}-chat-hf": f"meta-llama/Llama-2-{size}-hf" for size in ("7b", "13b", "70b")},
    **{f"meta-llama/Meta-Llama-3-{size}-Instruct": f"meta-llama/Meta-Llama-3-{size}" for size in ("8B", "70B")},
    **{f"meta-llama/Llama-3.1-{size}-Instruct": f"meta-llama/Llama-3.1-{size}" for size in ("8B", "70B")},
    **{f"meta-llama/Llama-3.2-{size}-Instruct": f"meta-llama/Llama-3.2-{size}" for size in ("1B", "3B")},
    "mistralai/Mistral-7B-Instruct-v0.1": "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-v0.3",
    **{f"Qwen/Qwen2.5-{size}-Instruct": f"Qwen/Qwen2.5-{size}"
       for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")},
    **{f"google/gemma-{size}-it": f"google/gemma-{size}" for size in ("2b", "7b", "2-2b", "2-9b", "2-27b")},
    **{f"HuggingFaceTB/SmolLM2-{size}-Instruct": f"HuggingFaceTB/SmolLM2-{size}" for size in ("135M", "360M", "1.7B")},
}


class BaseModelNotFound(ValueError):
    """The unaligned base of an aligned model cannot be inferred: pass ``base_model=`` explicitly."""


def aligned_name_or_path(model: Any, adapter_name: str | None = None) -> str | None:
    """The aligned checkpoint a (PEFT) model was loaded from: the adapter config's
    ``base_model_name_or_path``, else the transformers model's ``name_or_path``."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        config = configs.get(adapter_name) if adapter_name else next(iter(configs.values()))
        name = getattr(config, "base_model_name_or_path", None)
        if name:
            return str(name)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(inner, "name_or_path", None) or getattr(getattr(inner, "config", None), "_name_or_path", None)
    return str(name) if name else None


def card_base_model(card_path: str | os.PathLike) -> str | list[str] | None:
    """``base_model`` of a model card file (a string or a list), or None when the card has none."""
    from huggingface_hub import ModelCard

    value = ModelCard.load(Path(card_path)).data.to_dict().get("base_model")
    if isinstance(value, list) and len(value) == 1:
        return str(value[0])
    return value


def _hub_card_base(repo_id: str) -> str | list[str] | None:
    from huggingface_hub import ModelCard

    return ModelCard.load(repo_id).data.to_dict().get("base_model")


def _is_offline() -> bool:
    return os.getenv("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def infer_base_model(aligned: str | None) -> tuple[str, str]:
    """The unaligned base of ``aligned`` (a local directory or Hub id), and where it was found.

    Returns:
        ``(base, source)``, ``source`` one of ``"model card <path>"``, ``"known pairs"``,
        ``"Hub model card <id>"``.

    Raises:
        BaseModelNotFound: no card says it and the pair is not known; the message names
            ``base_model`` and what was tried.
    """
    tried = []
    if not aligned:
        raise BaseModelNotFound(
            "SPLoRACallback: base_model='auto' cannot infer the unaligned base: the model does not say which "
            "checkpoint it was loaded from (no name_or_path). Pass SPLoRACallback(base_model=...) (a local "
            "directory or Hub id, e.g. 'meta-llama/Llama-2-7b-hf')."
        )
    local = Path(aligned).expanduser()
    base = None
    if local.is_dir():
        card = local / "README.md"
        if card.is_file():
            base = card_base_model(card)
            tried.append(f"its model card {card} ({'no base_model field' if base is None else base})")
        else:
            tried.append(f"its model card ({card} does not exist)")
        source = f"model card {card}"
    if base is None and aligned in KNOWN_PAIRS:
        base, source = KNOWN_PAIRS[aligned], "known pairs"
    elif base is None:
        tried.append("the table of known pairs (splora_callback.base_models.KNOWN_PAIRS)")
    if base is None and not local.exists() and aligned.count("/") == 1:
        if _is_offline():
            tried.append("its Hub model card (skipped: HF_HUB_OFFLINE=1)")
        else:
            try:
                base, source = _hub_card_base(aligned), f"Hub model card {aligned}"
                tried.append(f"its Hub model card ({'no base_model field' if base is None else base})")
            except Exception as error:  # network, auth, missing repo: say so, fall through to the error
                tried.append(f"its Hub model card ({type(error).__name__}: {str(error)[:120]})")
    if isinstance(base, list):
        raise BaseModelNotFound(
            f"SPLoRACallback: base_model='auto': the model card of {aligned} lists several base models {base} "
            "(a merge?); pass SPLoRACallback(base_model=...) with the unaligned one."
        )
    if base is None:
        raise BaseModelNotFound(
            f"SPLoRACallback: base_model='auto' cannot infer the unaligned base of {aligned!r}; tried "
            f"{'; '.join(tried)}. Pass SPLoRACallback(base_model=...) (the model {aligned} was aligned from: "
            "a local directory or Hub id), or add `base_model: <id>` to its README.md metadata."
        )
    if str(base) == str(aligned):
        raise BaseModelNotFound(
            f"SPLoRACallback: base_model='auto': {source} gives {base!r}, the aligned model itself; pass "
            "SPLoRACallback(base_model=...) with the unaligned base."
        )
    logger.info("SPLoRA base model %s (the unaligned base of %s, from %s)", base, aligned, source)
    return str(base), source


# --- what a base download fetches -----------------------------------------------------------------

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shards_of_index(index: dict[str, Any]) -> list[str]:
    """The shard files an index's ``weight_map`` points to (sorted, each once)."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{INDEX_FILE} has no weight_map: the checkpoint index is damaged.")
    return sorted(set(weight_map.values()))


def hub_allow_patterns(repo_id: str, revision: str | None = None) -> list[str]:
    """What to download of a base on the Hub: the index and the shards it lists, or the single file.

    Without it, ``*.safetensors`` would also fetch e.g. Mistral's ``consolidated.safetensors``
    (a second full copy of the weights). Falls back to ``["*.safetensors", index]`` when the
    repository cannot be listed.
    """
    from huggingface_hub import hf_hub_download, list_repo_files

    if _is_offline():  # the cache answers; listing the repo would fail (or wait on the network)
        return ["*.safetensors", INDEX_FILE]
    try:
        files = set(list_repo_files(repo_id, revision=revision))
        if INDEX_FILE in files:
            index = json.loads(Path(hf_hub_download(repo_id, INDEX_FILE, revision=revision)).read_text())
            return [INDEX_FILE, *shards_of_index(index)]
    except Exception:  # snapshot_download then raises the actionable error
        return ["*.safetensors", INDEX_FILE]
    if SINGLE_FILE in files:
        return [SINGLE_FILE]
    return ["*.safetensors"]
