"""splora_callback.patch: the safety patch on a live LoRA model, in place."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_gates import _weights, patch_setup  # noqa: F401  (the tiny Llama, tokenizer, probe, benign pairs)

from splora_callback import safety_patch
from splora_callback.patch import anchor_pairs, lora_factors
from splora_callback.teacher_forced import probe_loss


def test_safety_patch_trains_only_the_lora_in_place_and_leaves_flags_and_mode(patch_setup, tmp_path):  # noqa: F811
    """Only the active adapter's factors move and get gradients; requires_grad and train mode are as
    before; the patched model saves and reloads as the same LoRA; the refusal loss falls."""
    import copy

    template, tokenizer, probe, benign = patch_setup
    model = copy.deepcopy(template)
    model.train()
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)  # a trainable non-LoRA parameter (modules_to_save-like): left alone, no gradient
    factors = lora_factors(model)
    flags = [True if i % 2 else False for i in range(len(factors))]
    for parameter, flag in zip(factors, flags, strict=True):
        parameter.requires_grad_(flag)
    before = _weights(model)
    record = safety_patch(model, probe, lr=1e-2, batch_size=2, steps=3, anchors=2, anchor_pairs=benign,
                          tokenizer=tokenizer, anchor_max_length=64, seed=1)
    assert record["steps"] == 3 and not record["calibrated"]
    assert record["refusal_loss"]["after"] < record["refusal_loss"]["before"]
    assert record["refusal_loss"]["after"] == pytest.approx(probe_loss(probe, model), abs=1e-6)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all("lora_A" in name or "lora_B" in name for name in moved)
    assert head.grad is None and [p.requires_grad for p in factors] == flags and model.training
    model.save_pretrained(tmp_path / "patched")
    base = copy.deepcopy(template).unload()  # the base model without its LoRA layers
    reloaded = PeftModel.from_pretrained(base, tmp_path / "patched")
    for (name, p), (_, q) in zip(sorted(_weights(model).items()), sorted(_weights(reloaded).items()), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_safety_patch_stops_and_errors(patch_setup):  # noqa: F811
    """The loss stop at target_loss (calibration); the errors name what is missing."""
    import copy

    template, tokenizer, probe, benign = patch_setup
    start = probe_loss(probe, template)
    model = copy.deepcopy(template)
    record = safety_patch(model, probe, lr=1e-2, batch_size=2, stop="refusal_loss", max_steps=8,
                          target_loss=start - 0.05, anchors=0, seed=1)
    assert record["calibrated"] and record["reached_target"] and 1 <= record["steps"] <= 8
    losses = record["refusal_loss_by_step"]
    assert len(losses) == record["steps"] + 1 and losses[-1] <= start - 0.05 < min(losses[:-1])
    with pytest.raises(ValueError, match="needs target_loss"):
        safety_patch(copy.deepcopy(template), probe, stop="refusal_loss", anchors=0)
    with pytest.raises(ValueError, match="anchor_pairs"):
        safety_patch(copy.deepcopy(template), probe, tokenizer=tokenizer)  # the default: 4 anchors
    with pytest.raises(ValueError, match="stop='refusal_rate' chooses the step count"):
        safety_patch(copy.deepcopy(template), probe, max_steps=None, anchors=0, tokenizer=tokenizer)
    for bad, match in [({"lr": 0}, "lr=0"), ({"anchors": -1}, "anchors=-1"), ({"restore": 1.5}, "restore=1.5"),
                       ({"stop": "loss"}, "stop='loss'")]:
        with pytest.raises(ValueError, match=match):
            safety_patch(copy.deepcopy(template), probe, **{"anchors": 0, **bad})
    pairs = anchor_pairs(template, tokenizer, [prompt for prompt, _ in benign], max_new_tokens=4)
    assert [prompt for prompt, _ in pairs] == [prompt for prompt, _ in benign] and all(isinstance(a, str) for _, a in pairs)


def test_a_failed_patch_leaves_the_lora_as_trained(patch_setup):  # noqa: F811
    """A step that raises (here the rate measurement after step 2) puts every factor back."""
    import copy

    template, tokenizer, probe, benign = patch_setup
    model = copy.deepcopy(template)
    before = _weights(model)
    readings = iter([1.0, 0.0, 0.1])  # aligned, the LoRA, after step 1; step 2's reading fails

    def measure(_):
        value = next(readings, None)
        if value is None:
            raise RuntimeError("generation failed")
        return value

    with pytest.raises(RuntimeError, match="generation failed"):
        safety_patch(model, probe, lr=1e-2, batch_size=2, anchors=0, measure_rate=measure, seed=1)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
