"""The study's one-shot safety patches ("Safety at One Shot", ICLR 2026): ``splora_callback.patch``'s
``safety_patch`` run on a copy of the trained LoRA with an ``evaluation.<patch>`` section's settings.
A baseline that reviewers ask for: if a few steps of refusal training restore refusals at less task
cost, pruning has to beat that, not only random choices.

- ``steps`` fixed once: with ``steps: null`` (and the loss stop) the patch runs up to ``max_steps``
  and takes the first step at which the probe's refusal loss is at most the aligned model's
  (calibration, on replication 0 of setting (a)); the efficacy driver passes that number to every
  other run, frozen.
- ``anchors: n`` > 0: each batch also holds n benign anchor pairs (the anchored patch).
- ``stop: refusal_rate`` (the rate patch, issue 27): no calibration, no frozen count; per model,
  the first step whose refusal rate on the probe's own prompts closes ``restore`` of the gap to the
  aligned model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from recipe_sections import OneShotPatchSection
from variants import lora_copy


def one_shot_patch(
    template: Any, probe: Any, spec: OneShotPatchSection, target: float, seed: int, *,
    anchor_pairs: Sequence[tuple[str, str]] | None = None, tokenizer: Any = None, anchor_max_length: int = 256,
    measure_rate: Callable[[Any], float] | None = None,
) -> tuple[Any, dict]:
    """The patched copy of the trained LoRA model (frozen, eval mode; ``template`` untouched) and
    the patch's record (``safety_patch``'s): ``spec.steps`` fixed, or None with ``spec.stop``, the
    loss stop at ``target`` (the aligned model's refusal loss: calibration) or the refusal-rate stop.
    ``spec.anchors`` = 0 is the plain patch (``anchor_pairs`` then ignored).

    Raises:
        ValueError: anchors without ``anchor_pairs`` or ``tokenizer``; the refusal-rate stop without
            a tokenizer or the probe's prompts (and no ``measure_rate``).
    """
    from splora_callback.patch import safety_patch

    model, trainable = lora_copy(template)
    record = safety_patch(
        model, probe, lr=spec.lr, batch_size=spec.batch_size, steps=spec.steps, max_steps=spec.max_steps,
        stop=spec.stop, restore=spec.restore, target_loss=target, anchor_pairs=anchor_pairs if spec.anchors else None,
        anchors=int(spec.anchors), factors=spec.factors, tokenizer=tokenizer, anchor_max_length=anchor_max_length,
        max_new_tokens=spec.max_new_tokens, measure_rate=measure_rate, seed=seed)
    for parameter in trainable:
        parameter.requires_grad_(False)
    model.eval()
    return model, record
