"""The one-shot safety patch baseline ("Safety at One Shot", ICLR 2026): a few optimizer steps of
the trained LoRA on the safety probe's own refusal pairs, the same data the probe-based repair
rules see. A baseline that reviewers ask for: if a few steps of refusal training restore refusals
at less task cost, pruning has to beat that, not only random choices.

``steps`` is fixed once: with ``steps: null`` the patch runs ``max_steps`` and takes the first step
at which the probe's refusal loss is at most the aligned model's (calibration, on replication 0
of setting (a)); the efficacy driver then passes that number to every other run, frozen.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from recipe_sections import OneShotPatchSection
from variants import lora_copy


def one_shot_patch(template: Any, probe: Any, spec: OneShotPatchSection, target: float, seed: int) -> tuple[Any, dict]:
    """The patched LoRA model and a record of the patch (steps, refusal loss after each step).

    AdamW at ``spec.lr``, batches of ``spec.batch_size`` probe pairs (a seeded reshuffle per
    epoch), gradient norm clipped at 1, LoRA dropout on (train mode). ``spec.steps``: a fixed
    number of steps; None: calibrate, i.e. run up to ``spec.max_steps`` and keep the first step
    whose refusal loss (eval mode) is at most ``target``, or all of them if none is.
    """
    from splora_callback.teacher_forced import probe_loss

    fixed = spec.steps
    limit = int(fixed if fixed is not None else spec.max_steps)
    model, trainable = lora_copy(template)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=float(spec.lr), weight_decay=0.0)
    order_rng, order = random.Random(seed), []
    batch_size = int(spec.batch_size)
    losses = [probe_loss(probe, model)]
    steps = limit
    torch.manual_seed(seed)
    for step in range(1, limit + 1):
        if len(order) < batch_size:
            fresh = list(range(len(probe)))
            order_rng.shuffle(fresh)
            order += fresh
        rows = torch.tensor(order[:batch_size])
        del order[:batch_size]
        model.train()
        loss = model(input_ids=probe.input_ids[rows], attention_mask=probe.attention_mask[rows],
                     labels=probe.labels[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        if fixed is None:  # calibration: measure every step, stop at the first that reaches the target
            losses.append(probe_loss(probe, model))
            if losses[-1] <= target:
                steps = step
                break
    if fixed is not None:
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
        "refusal_loss_by_step": losses if fixed is None else None,  # measured only when calibrating
        "lr": float(spec.lr),
        "batch_size": batch_size,
        "pairs": len(probe),
    }
    return model, record
