"""Model cards for every adapter the library writes, and pushing one to the Hugging Face Hub.

A card says what a user needs before shipping a repaired adapter: the aligned model it applies to,
the unaligned base the alignment subspace came from, the selection rule, what was pruned or
projected, the predicted and measured effect, and where the report is. It is written as
``README.md`` in the adapter's folder, between ``<!-- splora:begin -->`` / ``<!-- splora:end -->``
markers: a card already there (a trainer's, a user's) keeps its text and metadata below ours, and
PEFT's ``save_pretrained``, which updates an existing ``README.md`` in place, keeps ours.

Metadata (YAML front matter, the Hub's conventions): ``base_model`` = the aligned model (the model
the adapter is applied to), ``library_name: peft``, ``pipeline_tag: text-generation``, the tags
:data:`TAGS` and ``base_model:adapter:<aligned model>``: the same on the callback's cards and on
``splora prune``'s.

The Trainer's own card: ``trainer.create_model_card()`` (which ``trainer.push_to_hub()`` calls)
writes ``output_dir/README.md`` anew (``Trainer``: a template, "More information needed"; TRL's
trainers: a card of their own without ``base_model`` for a local model). :func:`keep_card_through`
wraps that method of the trainer running the callback, so the SPLoRA block and metadata are merged
back right after it, above the trainer's text, before the upload.

Pushing: :func:`push_adapter_to_hub` uploads the folder (adapter, card, report). PEFT's own
``model.push_to_hub(repo)`` (transformers' ``PushToHubMixin``) writes the card *already in the Hub
repository* (or a blank template) over ``README.md``: push with :func:`push_adapter_to_hub` first, or after.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ._io import atomic_write_text

logger = logging.get_logger(__name__)

CARD = "README.md"
BEGIN, END = "<!-- splora:begin -->", "<!-- splora:end -->"
TAGS = ["splora", "lora", "peft", "safety", "transformers"]
PIPELINE_TAG = "text-generation"
# what push_adapter_to_hub uploads from a folder (a Trainer's output_dir also holds checkpoints and logs)
UPLOAD_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", CARD,
                   "splora_report.json", "splora_report.html", "tokenizer*", "special_tokens_map.json",
                   "chat_template.*"]


@dataclass
class CardFacts:
    """What a card states. ``measured``: signal -> {"before", "after", "aligned"} (nats or rate)."""

    aligned: str | None
    base: str | None
    rule: str
    action: str
    acted: list[str] = field(default_factory=list)
    total_layers: int | None = None
    parameters_removed: int | None = None
    components: dict[str, list[int]] | None = None
    predicted: dict[str, float] | None = None
    measured: dict[str, dict[str, float | None]] = field(default_factory=dict)
    report: str | None = None
    made_by: str = "splora-callback"
    notes: list[str] = field(default_factory=list)
    why_unchanged: str | None = None  # the rule's reason for choosing nothing, in words
    patched: str | None = None  # action="patch": what the patch did, in words (headline.patch_words)


def rule_text(config: dict[str, Any]) -> str:
    """``metric ediem, top_k (k=10), granularity layer`` from a config dict."""
    select = config.get("select")
    select = select.get("name") if isinstance(select, dict) else select
    # the config's flat fields hold exactly the rule's parameters (SPLoRAConfig._resolve_rule)
    detail = ", ".join(f"{key}={config[key]}" for key in ("k", "fraction", "threshold", "budget")
                       if config.get(key) is not None)
    return (f"metric `{config.get('metric')}`, `{select}`" + (f" ({detail})" if detail else "")
            + f", granularity `{config.get('granularity', 'layer')}`")


def facts_from_report(report: dict[str, Any], report_link: str | None) -> CardFacts:
    """The card of a training run's report (the callback's end of training, or a checkpoint)."""
    from .headline import STOP_REASONS, patch_words, safety_summary

    config = report.get("config", {})
    action = report.get("action") or {}
    layers = report["history"][-1]["scores"]["layers"] if report.get("history") else []
    summary = safety_summary(report)
    measured: dict[str, dict[str, float | None]] = {}
    if "refusal_loss" in summary:
        measured["refusal loss on the safety probe (nats; lower = refuses more readily)"] = {
            "before": summary["refusal_loss"]["last"][1], "after": summary["after_action"].get("refusal_loss"),
            "aligned": summary["aligned_refusal_loss"]}
    if "refusal_rate" in summary:
        measured["refusal rate on held-out prompts (greedy)"] = {
            "before": summary["refusal_rate"]["last"][1], "after": summary["after_action"].get("refusal_rate"),
            "aligned": summary["aligned_refusal_rate"]}
    repair = report.get("repair") or {}
    predicted = {key: repair[key] for key in ("predicted_refusal_loss_change", "predicted_task_loss_change")
                 if isinstance(repair.get(key), (int, float))}
    acted = list(action.get("layers") or []) if action.get("action") not in (None, "none") else []
    return CardFacts(
        aligned=report.get("aligned_model") or config.get("aligned_model"),
        base=config.get("base_model"), rule=rule_text(config),
        action=action.get("action", "not applied") if not action.get("refused") else "refused",
        acted=acted, total_layers=len(layers), parameters_removed=action.get("parameters_removed"),
        components=action.get("components"), predicted=predicted or None, measured=measured,
        report=report_link, made_by=f"SPLoRACallback, step {report.get('step')} ({report.get('status')})",
        why_unchanged=STOP_REASONS.get(((report.get("repair") or {}).get("measured_stop") or {}).get("reason")),
        patched=patch_words(report),
    )


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def card_block(facts: CardFacts) -> str:
    """The markdown between the markers."""
    kinds = Counter(name.rsplit(".", 1)[-1] for name in facts.acted)
    mix = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
    verb = {"prune": "removed", "project": "projected onto the alignment subspace (Safe LoRA)"}.get(facts.action)
    if facts.action == "patch":
        what = (f"`patch`: {facts.patched}; every LoRA layer and rank kept" if facts.patched
                else "`patch`: nothing changed (the probe's refusal was already at its target)")
    elif verb and facts.acted:
        what = (f"`{facts.action}`: {len(facts.acted)} of {facts.total_layers or '?'} LoRA layers {verb} ({mix})")
        if facts.components:
            removed = sum(len(indices) for indices in facts.components.values())
            what = (f"`prune`: {removed} rank-one components removed from {len(facts.acted)} of "
                    f"{facts.total_layers or '?'} LoRA layers ({mix}); every layer stays, at a lower rank")
        if facts.parameters_removed:
            what += f"; {facts.parameters_removed:,} LoRA parameters removed"
    elif facts.action in ("none", "not applied"):
        what = f"`{facts.action}`: nothing changed (monitoring only)"
    else:
        what = f"`{facts.action}`: nothing changed (the selection rule chose nothing" + (
            f": {facts.why_unchanged})" if facts.why_unchanged else ")")
    rows = [("Aligned model (this adapter applies to it)", f"`{facts.aligned}`" if facts.aligned else "-"),
            ("Unaligned base (alignment subspace V = W_aligned - W_base)", f"`{facts.base}`" if facts.base else "-"),
            ("Selection rule", facts.rule), ("Action", what)]
    for signal, values in facts.measured.items():
        text = f"{_number(values.get('before'))} at the end of training"
        if values.get("after") is not None:
            text += f", {_number(values['after'])} after the action"
        if values.get("aligned") is not None:
            text += f"; aligned model {_number(values['aligned'])}"
        rows.append((f"Measured: {signal}", text))
    if facts.predicted:
        rows.append(("Predicted (first-order estimate from the probes' gradients)", ", ".join(
            f"{key.removeprefix('predicted_').replace('_', ' ')} {value:+.3f}" for key, value in facts.predicted.items())))
    if facts.report:
        rows.append(("Report", f"[{facts.report}]({facts.report}) (per-layer scores, charts)"))
    rows.append(("Written by", facts.made_by))
    table = "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])
    parts = [BEGIN, "# LoRA adapter checked with SPLoRA", "",
             "This LoRA adapter was scored against the alignment of the model it applies to: how far each "
             "layer's update strays from the directions alignment moved the weights (E-DIEM, Safe LoRA's "
             "cosine), and, with a safety probe, the refusal loss itself.", "", table, ""]
    if facts.acted:
        listed = ", ".join(f"`{name}`" for name in facts.acted[:64])
        more = f" and {len(facts.acted) - 64} more" if len(facts.acted) > 64 else ""
        title = "Layers whose rank-one components were removed" if facts.components else "Layers acted on"
        parts += [f"## {title}", "", listed + more, ""]
    aligned = facts.aligned or "ALIGNED_MODEL"
    parts += ["## Load it", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM", "",
              f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{aligned}"), "THIS_FOLDER_OR_REPO")',
              "```", "",
              "Pruned layers are in `exclude_modules` of `adapter_config.json` (component repairs in "
              "`rank_pattern` / `alpha_pattern`): PEFT rebuilds exactly the repaired model.", "",
              "## Limits", "",
              "On this project's demo, the layers a geometric score (E-DIEM, cosine) picks did no better than a "
              "random choice of layers of the same module kinds; the probe's refusal loss is measured on its own "
              "prompts only. Evaluate refusals on held-out prompts before shipping.", *facts.notes, END]
    return "\n".join(parts)


UNPARSED_CARD = "README.unparsed.md"


def card_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder/README.md`` cannot be merged (its YAML front matter does not parse, or is not a
    mapping), or None (no card, or a good one). PEFT's ``save_pretrained`` (``trainer.save_model``)
    updates that card first and, on such a card, raises and saves nothing."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD
    if not path.is_file():
        return None
    try:
        ModelCard.load(path)
    except Exception as error:  # yaml's ParserError / ScannerError, the Hub's ValueError, a decode error
        return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    return None


def _move_aside(path: Path, problem: str) -> Path:
    """Rename an unmergeable card to ``README.unparsed.md`` (a free name; its bytes unchanged), warned."""
    target, number = path.with_name(UNPARSED_CARD), 1
    while target.exists():
        number += 1
        target = path.with_name(f"README.unparsed-{number}.md")
    os.replace(path, target)
    logger.warning("SPLoRA: %s could not be merged (%s); it was moved, unchanged, to %s, and a new card written, "
                   "so that save_pretrained (which fails on such a card, saving nothing) can save the adapter. "
                   "Copy what you need from it into the new card.", path, problem, target.name)
    return target


def write_model_card(folder: str | os.PathLike, facts: CardFacts) -> Path:
    """Write (or update) ``folder/README.md`` with the SPLoRA block; keep any other card content.

    Metadata is merged: ``base_model`` (the aligned model) and ``library_name`` are set when absent,
    :data:`TAGS` added. A previous SPLoRA block is replaced, never duplicated. Atomic. A card whose
    front matter does not parse is never worth the adapter: it is moved aside (:data:`UNPARSED_CARD`,
    its bytes unchanged, warned) and a new card written.
    """
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD
    problem = card_problem(folder)
    if problem is not None:
        _move_aside(path, problem)
    existing = ModelCard.load(path) if path.is_file() else None
    data = existing.data.to_dict() if existing is not None else {}
    body = existing.text if existing is not None else ""
    body = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n*", "", body, flags=re.DOTALL).strip()
    if facts.aligned and not data.get("base_model"):
        data["base_model"] = facts.aligned
    if data.get("library_name") in (None, "transformers"):  # TRL's card says transformers: this is a PEFT adapter
        data["library_name"] = "peft"
    data.setdefault("pipeline_tag", PIPELINE_TAG)
    adapter_tag = [f"base_model:adapter:{facts.aligned}"] if facts.aligned else []
    data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *TAGS, *adapter_tag]))
    import yaml

    front = yaml.safe_dump(data, sort_keys=False).strip()
    text = f"---\n{front}\n---\n\n{card_block(facts)}\n" + (f"\n{body}\n" if body else "")
    atomic_write_text(path, text)
    return path


def push_adapter_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str = "Upload LoRA adapter checked with SPLoRA") -> str:
    """Upload an adapter folder (adapter, model card, report, tokenizer files) to a Hub model repo.

    What ``huggingface_hub.HfApi.upload_folder`` does, restricted to :data:`UPLOAD_PATTERNS` (a
    Trainer's ``output_dir`` also holds checkpoints, logs and ``training_args.bin``). The repo is
    created if missing. Returns the commit URL.

    Raises:
        FileNotFoundError: ``folder`` holds no adapter (run ``trainer.save_model()`` first) or no card.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    for name, hint in (("adapter_config.json", "run trainer.save_model() (or model.save_pretrained) first"),
                       (CARD, "the SPLoRA card is written at the end of training and by `splora prune`")):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"push_adapter_to_hub: {folder / name} not found: {hint}.")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=str(folder),
                               allow_patterns=UPLOAD_PATTERNS, commit_message=commit_message, revision=revision)
    return str(getattr(commit, "commit_url", commit))


def calling_trainer() -> Any | None:
    """The ``transformers.Trainer`` whose method is running up the call stack (a callback's event is
    called from the trainer's own methods), or None. A callback is never handed its trainer."""
    import sys

    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def keep_card_through(trainer: Any, card: Any) -> None:
    """Make ``trainer.create_model_card()`` (``push_to_hub`` calls it) keep the SPLoRA card.

    The trainer's method writes ``output_dir/README.md`` anew; the wrapper calls it, then merges the
    SPLoRA block and metadata back (:func:`write_model_card`: the trainer's text stays, below ours).
    ``card``: a function giving ``(folder, CardFacts)`` of the card written, or None before the end
    of training. Wrapping twice is a no-op.
    """
    import functools

    original = trainer.create_model_card
    if getattr(original, "_splora_keeps_card", False):
        return

    @functools.wraps(original)
    def create_model_card(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        written = card()
        if written is not None and trainer.is_world_process_zero():
            folder, facts = written
            if Path(folder).resolve() == Path(trainer.args.output_dir).resolve():
                write_model_card(folder, facts)
        return result

    create_model_card._splora_keeps_card = True
    trainer.create_model_card = create_model_card


def facts_from_cli(*, aligned: str, base: str, metric: str, selection: str, action: str, scores: Any,
                   chosen: list[str], adapter: str, version: str) -> CardFacts:
    """The card of ``splora prune --output``: the CLI's rule, what it removed, where it came from."""
    removed = sum((sum(scores[name].shape)) * scores[name].rank for name in chosen) if action == "prune" else None
    return CardFacts(
        aligned=aligned, base=base, rule=f"metric `{metric}`, {selection}, granularity `layer`", action=action,
        acted=list(chosen), total_layers=len(scores), parameters_removed=removed,
        made_by=f"`splora prune` (splora-callback {version}) from the adapter `{adapter}`",
        notes=["", "No probe ran here: the card states what was removed, not a measured effect. Score the "
               "repaired adapter with `splora score` and evaluate refusals before shipping."],
    )
