"""The one-shot safety patch baseline ("Safety at One Shot", ICLR 2026): a few optimizer steps of
the trained LoRA on the safety probe's own refusal pairs, the same data the probe-based repair
rules see. A baseline that reviewers ask for: if a few steps of refusal training restore refusals
at less task cost, pruning has to beat that, not only random choices.

``steps`` is fixed once: with ``steps: null`` the patch runs ``max_steps`` and takes the first step
at which the probe's refusal loss is at most the aligned model's (calibration, on replication 0
of setting (a)); the efficacy driver then passes that number to every other run, frozen.

Anchored patch (``anchors: n`` > 0): each batch also holds ``n`` benign anchor pairs, benign
requests answered by the trained LoRA model itself (:func:`lora_anchor_pairs`), so the patch learns
to refuse the probe's prompts without learning to refuse everything; ``anchors: 0`` is the plain
patch, step for step the same as before the option existed.

Refusal-rate stop (``stop: refusal_rate``, issue 27): no calibration, no frozen count. After each
step the patched model answers the probe's own harmful prompts greedily (the evaluation's
generation and keyword judge, never a held-out prompt) and the patch stops at the first step whose
refusal rate closes ``restore`` of the gap between the trained LoRA's rate and the aligned
model's (adapters disabled): the behavioural stop of the component repair, applied to the patch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from recipe_sections import OneShotPatchSection
from variants import lora_copy


def lora_anchor_pairs(template: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                      batch_size: int = 8, seed: int = 0) -> list[tuple[str, str]]:
    """``(prompt, answer)`` for benign ``prompts``, answered greedily by ``template`` (the trained LoRA
    model, untouched): the ``anchor_pairs`` of :func:`one_shot_patch`. Use prompts that are in no
    evaluation set (not the over-refusal ``benign_prompts``, not the task's evaluation prompts)."""
    from splora_callback.evaluation import generate

    answers = generate(template, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       seed=seed, progress=False)
    return [(prompt, answer.text) for prompt, answer in zip(prompts, answers, strict=True)]


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
    from splora_callback.data import IGNORE_INDEX

    width = max(probe.input_ids.shape[1], anchor.input_ids.shape[1])
    parts = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.cat([_padded(getattr(probe, key)[rows], width, pad),
                            _padded(getattr(anchor, key)[anchor_rows], width, pad)])
            for key, pad in parts.items()}


def one_shot_patch(
    template: Any, probe: Any, spec: OneShotPatchSection, target: float, seed: int, *,
    anchor_pairs: Sequence[tuple[str, str]] | None = None, tokenizer: Any = None, anchor_max_length: int = 256,
    measure_rate: Callable[[Any], float] | None = None,
) -> tuple[Any, dict]:
    """The patched LoRA model and a record of the patch (steps, refusal loss after each step).

    AdamW at ``spec.lr``, batches of ``spec.batch_size`` probe pairs (a seeded reshuffle per
    epoch), gradient norm clipped at 1, LoRA dropout on (train mode). ``spec.steps``: a fixed
    number of steps; None: calibrate, i.e. run up to ``spec.max_steps`` and keep the first step
    whose refusal loss (eval mode) is at most ``target``, or all of them if none is.

    Args:
        anchor_pairs: with ``spec.anchors`` = n > 0, the benign anchor pairs ``(benign request,
            the trained LoRA model's own answer)`` (:func:`lora_anchor_pairs`); each batch then adds
            n of them (their own seeded reshuffle per epoch, so the probe rows drawn are those of
            the plain patch) and the step's loss is the mean token loss over the responses of both.
            Ignored with ``spec.anchors`` = 0 (the plain patch, unchanged).
        tokenizer: tokenizes ``anchor_pairs`` (``ProbeSet.from_pairs``: the chat template, the
            probe's own rendering); needed with anchors.
        anchor_max_length: token cap of an anchor pair (the probe's ``max_length``).
        measure_rate: ``model -> share of the probe's prompts refused`` for ``spec.stop`` =
            ``"refusal_rate"`` (default: greedy ``spec.max_new_tokens`` tokens of every
            ``probe.prompts``, keyword judge, with ``tokenizer``).

    The record gains ``anchors``, ``anchor_pairs`` and ``anchor_loss`` (before / after, nats, eval
    mode) only with anchors, and ``stop``, ``restore``, ``aligned_refusal_rate``,
    ``target_refusal_rate`` and ``refusal_rate_by_step`` (step 0 = the trained LoRA) only with the
    refusal-rate stop: the plain patch's record is as before.

    Raises:
        ValueError: ``spec.anchors`` > 0 without ``anchor_pairs`` or ``tokenizer``; the refusal-rate
            stop without a tokenizer or the probe's prompts (and no ``measure_rate``).
    """
    from splora_callback.probe import ProbeSet
    from splora_callback.teacher_forced import probe_loss

    anchors = int(getattr(spec, "anchors", 0) or 0)
    anchor = None
    if anchors:
        if not anchor_pairs or tokenizer is None:
            raise ValueError(f"one_shot_patch: anchors={anchors} needs anchor_pairs (benign requests with the trained "
                             "LoRA model's answers: lora_anchor_pairs) and the tokenizer.")
        anchor = ProbeSet.from_pairs(tokenizer, list(anchor_pairs), max_length=int(anchor_max_length),
                                     batch_size=probe.batch_size)
    fixed = spec.steps
    limit = int(fixed if fixed is not None else spec.max_steps)
    by_rate = spec.stop == "refusal_rate"
    if by_rate and measure_rate is None:
        if tokenizer is None or not getattr(probe, "prompts", None):
            raise ValueError("one_shot_patch: stop=refusal_rate answers the probe's own prompts: it needs the tokenizer "
                             "and a probe with prompts (SafetyProbe.from_prompts).")
        from splora_callback.safety import refusal_rate_now

        def measure_rate(model: Any) -> float:
            return refusal_rate_now(model, tokenizer, probe.prompts, int(spec.max_new_tokens),
                                    batch_size=len(probe.prompts))
    model, trainable = lora_copy(template)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=float(spec.lr), weight_decay=0.0)
    order_rng, order = random.Random(seed), []
    batch_size = int(spec.batch_size)
    anchor_rng, anchor_order = random.Random(f"anchors-{seed}"), []
    losses = [probe_loss(probe, model)]
    anchor_losses = [probe_loss(anchor, model)] if anchor is not None else []
    steps = limit
    rates: list[float] = []
    if by_rate:
        from splora_callback.repair import rate_target
        from splora_callback.safety import adapters_disabled

        model.eval()
        with adapters_disabled(model):
            aligned_rate = measure_rate(model)
        rates.append(measure_rate(model))
        target_rate = rate_target(rates[0], aligned_rate, float(spec.restore))
        limit = 0 if rates[0] >= target_rate - 1e-9 else limit  # nothing to restore: the LoRA as trained
        steps = limit
    torch.manual_seed(seed)
    for step in range(1, limit + 1):
        rows = _next_rows(order, order_rng, len(probe), batch_size)
        if anchor is None:
            batch = {"input_ids": probe.input_ids[rows], "attention_mask": probe.attention_mask[rows],
                     "labels": probe.labels[rows]}
        else:
            batch = _mixed_batch(probe, rows, anchor, _next_rows(anchor_order, anchor_rng, len(anchor), anchors))
        model.train()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        if by_rate:  # the refusal-rate stop: the first step whose probe refusal rate reaches the target
            rates.append(measure_rate(model))
            if rates[-1] >= target_rate - 1e-9:
                steps = step
                break
        elif fixed is None:  # calibration: measure every step, stop at the first that reaches the target
            losses.append(probe_loss(probe, model))
            if losses[-1] <= target:
                steps = step
                break
    if fixed is not None or by_rate:
        losses.append(probe_loss(probe, model))
    for parameter in trainable:
        parameter.requires_grad_(False)
    model.eval()
    record = {
        "steps": steps,
        "calibrated": fixed is None,
        "reached_target": losses[-1] <= target,
        "target_refusal_loss": target,
        "refusal_loss": {"before": losses[0], "after": losses[-1]},
        "refusal_loss_by_step": losses if fixed is None and not by_rate else None,  # measured only when calibrating
        "lr": float(spec.lr),
        "batch_size": batch_size,
        "pairs": len(probe),
    }
    if by_rate:
        record.update(calibrated=False, reached_target=rates[-1] >= target_rate - 1e-9, stop="refusal_rate",
                      restore=float(spec.restore), aligned_refusal_rate=aligned_rate, target_refusal_rate=target_rate,
                      refusal_rate_by_step=rates)
    if anchor is not None:
        anchor_losses.append(probe_loss(anchor, model))
        record.update(anchors=anchors, anchor_pairs=len(anchor),
                      anchor_loss={"before": anchor_losses[0], "after": anchor_losses[-1]})
    return model, record
