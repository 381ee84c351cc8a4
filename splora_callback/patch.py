"""The safety patch: a few optimizer steps of a trained LoRA on the safety probe's own refusal pairs.

A candidate beyond removal (issue 27, "Safety at One Shot", ICLR 2026): instead of taking parts of
the update away, train the LoRA itself a little on the probe's (harmful request, refusal) pairs.

    pairs = anchor_pairs(model, tokenizer, benign_requests, max_new_tokens=64)
    record = safety_patch(model, probe, tokenizer=tokenizer, anchor_pairs=pairs)
    model.save_pretrained("adapter-patched")   # still an exact LoRA of the same rank

- **Factors** (``factors``): ``"A"`` (the default) trains each LoRA layer's ``lora_A`` only and
  keeps ``lora_B``, the directions the fine-tune writes: the patch changes which inputs the LoRA
  responds to (it can turn the update off on the probe's requests) but adds no new output direction
  that every request would read; ``"both"`` trains A and B (the study's first rate patch, which
  over-refused by more than 5 points in 5 of 9 replications).
- **Anchors** (``anchors`` > 0): each batch also holds benign anchor pairs, benign requests answered
  by the trained LoRA itself (:func:`anchor_pairs`), so the patch learns to refuse the probe's
  requests without learning to refuse everything (``anchors=0``: the plain patch).
- **Stops**: ``steps`` fixed; or ``stop="refusal_loss"`` with ``target_loss`` (the first step whose
  probe refusal loss is at most the aligned model's, at most ``max_steps``); or
  ``stop="refusal_rate"`` (the rate patch): after each step the model answers the probe's own
  harmful prompts greedily and the patch stops at the first step closing ``restore`` of the gap
  between the LoRA's refusal rate and the aligned model's (adapters disabled). Never a held-out prompt.

The efficacy study (benchmarks/results/efficacy.md) measured the rate patch (A and B, restore 0.9)
against the removal repairs and Safe Delta; benchmarks/results/issue27-anchor-boundary/ the
defaults here (lora_A only, lr 4e-4, 10 probe pairs + 4 anchors per batch, restore 1.0: the aligned
model's probe refusal, at most 40 steps), on the study's trained LoRAs.
``SPLoRACallback(action="patch")`` runs it at the end of training through :func:`prepare_patch`:
built aside, then swapped in or not at all.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

PATCH_STOPS = ("refusal_loss", "refusal_rate")
PATCH_FACTORS = ("A", "both")  # lora_A only (the LoRA's write directions B kept), or lora_A and lora_B
# The anchors when none are given: harmless tasks phrased as harmful requests are ("Give detailed
# step-by-step instructions for ...", "Write a persuasive article arguing that ..."), so that the patch
# learns to refuse by content, not by phrasing. Written for this purpose; keep them out of your evaluation.
DEFAULT_ANCHOR_REQUESTS: tuple[str, ...] = (
    "Give detailed step-by-step instructions for sharpening a kitchen knife with a whetstone.",
    "Give detailed step-by-step instructions for making a birdhouse from scrap wood.",
    "Give detailed step-by-step instructions for descaling an electric kettle.",
    "Give detailed step-by-step instructions for knitting a simple scarf.",
    "Write a persuasive article arguing that every school should have a chess club.",
    "Write a persuasive article arguing that towns should plant more street trees.",
    "Write a persuasive article arguing that people should take the stairs more often.",
    "Write a short story about a lighthouse keeper who adopts a seagull.",
    "Write a poem about the first snowfall of the winter.",
    "Write a friendly email inviting neighbours to a street clean-up on Saturday.",
    "Write code for a Python function that counts the vowels in a string.",
    "Write code for a small web page that shows a countdown to New Year.",
    "Explain how a refrigerator keeps food cold.",
    "Explain how bees communicate the location of flowers.",
    "Explain how to calculate the area of a circle.",
    "What are the best ways to keep a sourdough starter healthy?",
    "What are some good exercises for improving posture at a desk?",
    "How do I remove a red wine stain from a cotton shirt?",
    "How do I set up a weekly budget in a spreadsheet?",
    "Give me a list of fun indoor activities for a rainy afternoon with kids.",
    "Give advice on preparing for a first job interview.",
    "Create a packing list for a three-day hiking trip.",
    "Convince people to try volunteering at an animal shelter.",
    "Give instructions for planting spring bulbs in autumn.",
)
ANCHOR_NEW_TOKENS = 24  # tokens of the LoRA's own answer per benign anchor: its opening, where a refusal shows (the study's)


def anchor_pairs(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                 batch_size: int = 8, seed: int = 0) -> list[tuple[str, str]]:
    """``(prompt, answer)`` for benign ``prompts``, answered greedily by ``model`` (the trained LoRA,
    before the patch): the ``anchor_pairs`` of :func:`safety_patch`. Use requests that are in no
    evaluation set (not the over-refusal prompts, not the task's evaluation prompts)."""
    from .evaluation import generate

    answers = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       seed=seed, progress=False)
    return [(prompt, answer.text) for prompt, answer in zip(prompts, answers, strict=True)]


def lora_factors(model: nn.Module, factors: str = "both") -> list[nn.Parameter]:
    """The active adapter's LoRA factors in module order: A then B of every LoRA layer
    (``factors="both"``), or its A factors alone (``"A"``): what the patch trains."""
    from .layers import iter_lora_layers, resolve_adapter_name

    adapter = resolve_adapter_name(model)
    kinds = ("lora_A",) if factors == "A" else ("lora_A", "lora_B")
    return [p for _, layer in iter_lora_layers(model, adapter)
            for kind in kinds for p in getattr(layer, kind)[adapter].parameters()]


def _padded(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """(b, T) right-padded with ``value`` to (b, width)."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _next_rows(order: list[int], rng: random.Random, size: int, count: int) -> torch.Tensor:
    """The next ``count`` rows of an epoch-shuffled order over ``size`` rows; ``order`` (the rows
    not yet drawn) is refilled with a fresh shuffle while shorter than ``count`` and consumed."""
    while len(order) < count:
        fresh = list(range(size))
        rng.shuffle(fresh)
        order += fresh
    rows = torch.tensor(order[:count])
    del order[:count]
    return rows


def _mixed_batch(probe: Any, rows: torch.Tensor, anchor: Any, anchor_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Probe rows then anchor rows, right-padded to one width (padding: mask 0, label -100)."""
    from .data import IGNORE_INDEX

    width = max(probe.input_ids.shape[1], anchor.input_ids.shape[1])
    parts = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.cat([_padded(getattr(probe, key)[rows], width, pad),
                            _padded(getattr(anchor, key)[anchor_rows], width, pad)])
            for key, pad in parts.items()}


def check_patch_options(*, lr: float, batch_size: int, steps: int | None, max_steps: int | None, stop: str | None,
                        restore: float, anchors: int, factors: str = "both", where: str = "safety_patch") -> None:
    """Raises ValueError naming the option (``where``: the caller's name for them) and the accepted values."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{where}: lr={lr!r} must be a number > 0 (e.g. 4e-4).")
    for key, value in {"batch_size": batch_size, "steps": steps, "max_steps": max_steps}.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {key}={value!r} must be an integer >= 1.")
    if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 0:
        raise ValueError(f"{where}: anchors={anchors!r} must be an integer >= 0 (benign anchor pairs per batch).")
    if factors not in PATCH_FACTORS:
        raise ValueError(f"{where}: factors={factors!r}; expected 'A' (lora_A only, the LoRA's output directions "
                         "kept) or 'both' (lora_A and lora_B).")
    if stop is not None and stop not in PATCH_STOPS:
        raise ValueError(f"{where}: stop={stop!r}; expected one of {', '.join(PATCH_STOPS)}.")
    if stop == "refusal_rate" and (steps is not None or max_steps is None):
        raise ValueError(f"{where}: stop='refusal_rate' chooses the step count; set max_steps and steps: null.")
    if isinstance(restore, bool) or not isinstance(restore, (int, float)) or not 0 < restore <= 1:
        raise ValueError(f"{where}: restore={restore!r} must be in (0, 1] (the share of the refusal-rate gap).")
    if steps is None and max_steps is None:
        raise ValueError(f"{where}: needs steps (fixed) or max_steps (steps: null calibrates)")


def safety_patch(
    model: nn.Module, probe: Any, *, lr: float = 4e-4, batch_size: int = 10, steps: int | None = None,
    max_steps: int | None = 40, stop: str | None = "refusal_rate", restore: float = 1.0, factors: str = "A",
    target_loss: float | None = None, anchor_pairs: Sequence[tuple[str, str]] | None = None, anchors: int = 4,
    tokenizer: Any = None, anchor_max_length: int = 256, max_new_tokens: int = 8,
    measure_rate: Callable[[nn.Module], float] | None = None, seed: int = 0, progress: bool = False,
) -> dict[str, Any]:
    """Train the active adapter's LoRA factors of ``model`` in place on ``probe``'s refusal pairs;
    returns the patch's record (steps, refusal loss before / after in nats, the stop's readings).

    ``factors="A"`` (the default) trains each LoRA layer's ``lora_A`` only: the patch changes which
    inputs the LoRA responds to, never the directions it writes (``lora_B``), so it can turn the
    fine-tune's update off on the probe's requests without adding a refusal everywhere; ``"both"``
    trains A and B (the study's first rate patch, which over-refused).

    AdamW at ``lr``, batches of ``batch_size`` probe pairs (a seeded reshuffle per epoch) plus
    ``anchors`` anchor pairs (their own seeded reshuffle), the mean token loss over the responses of
    both, gradient norm clipped at 1, LoRA dropout on (train mode). Only those LoRA factors are
    trained and get gradients; their ``requires_grad`` flags and the model's train/eval mode are as
    before afterwards, and a patch that fails or is interrupted puts the factors back as trained. A fixed ``steps`` runs that many; else up to ``max_steps`` with ``stop``:
    ``"refusal_loss"``, the first step whose probe refusal loss (eval mode) is at most
    ``target_loss`` (the aligned model's, ``safety.aligned_refusal_loss``); ``"refusal_rate"``, the
    first step whose probe refusal rate reaches ``repair.rate_target`` (``measure_rate``: model ->
    share of the probe's prompts refused; default greedy ``max_new_tokens`` tokens of every
    ``probe.prompts`` with ``tokenizer``, keyword judge). ``progress``: a tqdm bar of the steps
    (with the probe refusal rate after each, under the rate stop).

    The record has ``anchors``, ``anchor_pairs``, ``anchor_loss`` only with anchors, and ``stop``,
    ``restore``, ``aligned_refusal_rate``, ``target_refusal_rate``, ``refusal_rate_by_step`` (step 0:
    the LoRA as trained) only with the refusal-rate stop.

    Raises:
        ValueError: an option out of range (:func:`check_patch_options`); anchors without
            ``anchor_pairs`` or ``tokenizer``; the loss stop without ``target_loss``; the rate stop
            without a tokenizer or the probe's prompts (and no ``measure_rate``).
    """
    from .probe import ProbeSet

    by_rate = stop == "refusal_rate" and steps is None
    calibrating = steps is None and not by_rate
    check_patch_options(lr=lr, batch_size=batch_size, steps=steps, max_steps=max_steps,
                        stop=stop if steps is None else None, restore=restore, anchors=anchors, factors=factors)
    if calibrating and target_loss is None:
        raise ValueError("safety_patch: stop='refusal_loss' needs target_loss, the aligned model's refusal loss on the "
                         "probe (splora_callback.safety.aligned_refusal_loss(probe, model)).")
    anchor = None
    if anchors:
        if not anchor_pairs or tokenizer is None:
            raise ValueError(f"safety_patch: anchors={anchors} needs anchor_pairs (benign requests with the trained "
                             "LoRA model's answers: anchor_pairs) and the tokenizer.")
        anchor = ProbeSet.from_pairs(tokenizer, list(anchor_pairs), max_length=int(anchor_max_length),
                                     batch_size=probe.batch_size)
    if by_rate and measure_rate is None:
        if tokenizer is None or not getattr(probe, "prompts", None):
            raise ValueError("safety_patch: stop='refusal_rate' answers the probe's own prompts: it needs the "
                             "tokenizer and a probe with prompts (SafetyProbe.from_pairs).")
        from .safety import refusal_rate_now

        def measure_rate(patched: nn.Module) -> float:
            return refusal_rate_now(patched, tokenizer, probe.prompts, int(max_new_tokens), batch_size=len(probe.prompts))
    trainable = lora_factors(model, factors)
    flags, was_training = [p.requires_grad for p in trainable], model.training
    limit = int(steps if steps is not None else max_steps)
    trained = [p.detach().clone() for p in trainable]  # the LoRA factors only: put back if a step fails
    try:
        for parameter in trainable:
            parameter.requires_grad_(True)
        record = _patch_steps(model, probe, anchor, trainable, lr=float(lr), batch_size=int(batch_size), limit=limit,
                              calibrating=calibrating, target_loss=target_loss, measure_rate=measure_rate if by_rate
                              else None, restore=float(restore), anchors=int(anchors), seed=seed, progress=progress)
        record["factors"] = factors
    except BaseException:  # all or nothing: a failed or interrupted patch leaves the LoRA as trained
        with torch.no_grad():
            for parameter, original in zip(trainable, trained, strict=True):
                parameter.copy_(original)
        raise
    finally:
        for parameter, flag in zip(trainable, flags, strict=True):
            parameter.requires_grad_(flag)
        model.train(was_training)
    return record


def _patch_steps(model: nn.Module, probe: Any, anchor: Any, trainable: list[nn.Parameter], *, lr: float,
                 batch_size: int, limit: int, calibrating: bool, target_loss: float | None,
                 measure_rate: Callable[[nn.Module], float] | None, restore: float, anchors: int,
                 seed: int, progress: bool = False) -> dict[str, Any]:
    """The optimizer loop of :func:`safety_patch` and its record."""
    from .teacher_forced import probe_loss

    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order_rng, order = random.Random(seed), []
    anchor_rng, anchor_order = random.Random(f"anchors-{seed}"), []
    losses = [probe_loss(probe, model)]
    anchor_losses = [probe_loss(anchor, model)] if anchor is not None else []
    steps, rates = limit, []
    if measure_rate is not None:
        from .repair import rate_target
        from .safety import adapters_disabled

        model.eval()
        with adapters_disabled(model):
            aligned_rate = measure_rate(model)
        rates.append(measure_rate(model))
        target_rate = rate_target(rates[0], aligned_rate, restore)
        limit = steps = 0 if rates[0] >= target_rate - 1e-9 else limit  # nothing to restore: the LoRA as trained
    torch.manual_seed(seed)
    bar = tqdm(total=limit, desc="SPLoRA safety patch", unit="step", disable=not progress or not limit, leave=False)
    for step in range(1, limit + 1):
        rows = _next_rows(order, order_rng, len(probe), batch_size)
        if anchor is None:
            batch = {"input_ids": probe.input_ids[rows], "attention_mask": probe.attention_mask[rows],
                     "labels": probe.labels[rows]}
        else:
            batch = _mixed_batch(probe, rows, anchor, _next_rows(anchor_order, anchor_rng, len(anchor), anchors))
        model.train()
        loss = model(**batch).loss
        loss.backward(inputs=trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        bar.update()
        if measure_rate is not None:  # the refusal-rate stop: the first step whose probe refusal rate reaches the target
            rates.append(measure_rate(model))
            bar.set_postfix(probe_refusal=f"{rates[-1]:.2f}", target=f"{target_rate:.2f}")
            if rates[-1] >= target_rate - 1e-9:
                steps = step
                break
        elif calibrating:  # the loss stop: measure every step, stop at the first that reaches the target
            losses.append(probe_loss(probe, model))
            if losses[-1] <= target_loss:
                steps = step
                break
    bar.close()
    if not calibrating:
        losses.append(probe_loss(probe, model))
    target = target_loss if target_loss is not None else float("nan")
    record: dict[str, Any] = {
        "steps": steps,
        "calibrated": calibrating,
        "reached_target": losses[-1] <= target,
        "target_refusal_loss": target_loss,
        "refusal_loss": {"before": losses[0], "after": losses[-1]},
        "refusal_loss_by_step": losses if calibrating else None,  # measured only when calibrating
        "lr": lr,
        "batch_size": batch_size,
        "pairs": len(probe),
    }
    if measure_rate is not None:
        record.update(reached_target=rates[-1] >= target_rate - 1e-9, stop="refusal_rate", restore=restore,
                      aligned_refusal_rate=aligned_rate, target_refusal_rate=target_rate, refusal_rate_by_step=rates)
    if anchor is not None:
        anchor_losses.append(probe_loss(anchor, model))
        record.update(anchors=anchors, anchor_pairs=len(anchor),
                      anchor_loss={"before": anchor_losses[0], "after": anchor_losses[-1]})
    return record


def patched_factors(
    model: nn.Module, probe: Any, *, tokenizer: Any, benign_prompts: Sequence[str] | None, anchors: int = 4,
    **options: Any,
) -> tuple[list[nn.Parameter], list[torch.Tensor], dict[str, Any]]:
    """:func:`safety_patch` run on clones of the LoRA factors, the model left as trained.

    Anchors: ``benign_prompts`` (None: :data:`DEFAULT_ANCHOR_REQUESTS`) answered greedily by the
    model as trained (:func:`anchor_pairs`, :data:`ANCHOR_NEW_TOKENS` tokens). ``options``:
    :func:`safety_patch`'s.

    Returns:
        ``(factors, patched, record)``: the live factors (:func:`lora_factors`), their patched
        values (same shapes, new tensors) and the patch's record (``anchor_requests`` added).
    """
    pairs = None
    if anchors:
        if benign_prompts is not None and not len(benign_prompts):
            raise ValueError(f"safety_patch: anchors={anchors} with an empty benign_prompts: pass benign requests "
                             "(never used in alignment or evaluation), None for DEFAULT_ANCHOR_REQUESTS, or anchors=0.")
        benign_prompts = DEFAULT_ANCHOR_REQUESTS if benign_prompts is None else benign_prompts
        pairs = anchor_pairs(model, tokenizer, list(benign_prompts), max_new_tokens=ANCHOR_NEW_TOKENS,
                             batch_size=len(benign_prompts))
    live = lora_factors(model)  # every factor, A and B: what the action swaps in, whichever the patch trains
    trained = [parameter.data for parameter in live]
    try:
        for parameter in live:  # the patch steps write into clones: the trained tensors stay as they are
            parameter.data = parameter.data.clone()
        record = safety_patch(model, probe, tokenizer=tokenizer, anchor_pairs=pairs, anchors=anchors, **options)
        patched = [parameter.data for parameter in live]
    finally:
        for parameter, tensor in zip(live, trained, strict=True):
            parameter.data = tensor
    record["anchor_requests"] = len(pairs or ())
    return live, patched, record


def patch_action(model: nn.Module, factors: Sequence[nn.Parameter], patched: Sequence[torch.Tensor],
                 record: dict[str, Any], adapter_name: str | None = None) -> Any:
    """The :class:`~splora_callback.pruning.PreparedAction` that swaps ``patched`` into ``factors``
    (reference swaps: ``commit`` all at once, ``rollback`` back to the trained tensors); its report
    is ``action="patch"``, no layer removed, ``patch`` = ``record``."""
    from .layers import resolve_adapter_name
    from .pruning import ActionReport, PreparedAction
    from .transaction import set_attribute

    prepared = PreparedAction(ActionReport("patch", [], resolve_adapter_name(model, adapter_name), patch=record))
    for parameter, tensor in zip(factors, patched, strict=True):
        prepared.edits.add(set_attribute(parameter, "data", tensor))
    return prepared


def prepare_patch(model: nn.Module, probe: Any, *, tokenizer: Any, benign_prompts: Sequence[str] | None,
                  anchors: int = 4, adapter_name: str | None = None, **options: Any) -> Any:
    """The safety patch built aside (:func:`patched_factors`, then :func:`patch_action`): nothing
    of the live model changes until the returned action's ``commit()``."""
    factors, patched, record = patched_factors(model, probe, tokenizer=tokenizer, benign_prompts=benign_prompts,
                                               anchors=anchors, **options)
    return patch_action(model, factors, patched, record, adapter_name)
