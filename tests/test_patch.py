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


@pytest.mark.parametrize("factors", ["A", "both"])
def test_safety_patch_trains_the_factors_asked_for(patch_setup, factors, tmp_path):  # noqa: F811
    """factors='A' (the default) moves every lora_A and leaves every lora_B bit for bit, so the LoRA's
    output directions are the trained ones (B's column space); 'both' moves both; the record says
    which; the patched adapter reloads to 1e-6."""
    import copy

    template, tokenizer, probe, benign = patch_setup
    model = copy.deepcopy(template)
    before = _weights(model)
    record = safety_patch(model, probe, lr=1e-2, batch_size=2, steps=3, anchors=2, anchor_pairs=benign,
                          tokenizer=tokenizer, anchor_max_length=64, seed=1, factors=factors)
    after = _weights(model)
    a_names = [name for name in after if "lora_A" in name]
    b_names = [name for name in after if "lora_B" in name]
    assert a_names and b_names and record["factors"] == factors
    assert all(not torch.equal(after[name], before[name]) for name in a_names)
    assert all(torch.equal(after[name], before[name]) for name in b_names) == (factors == "A")
    assert record["refusal_loss"]["after"] < record["refusal_loss"]["before"]
    model.save_pretrained(tmp_path / "patched")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(template).unload(), tmp_path / "patched")
    for (name, p), (_, q) in zip(sorted(after.items()), sorted(_weights(reloaded).items()), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    assert [name for name, _ in model.named_parameters() if "lora_" in name and "lora_A" in name] == a_names
    assert len(lora_factors(model, "A")) == len(a_names) and len(lora_factors(model)) == len(a_names) + len(b_names)


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
                       ({"stop": "loss"}, "stop='loss'"), ({"factors": "B"}, "factors='B'; expected 'A'")]:
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


def _patch_run(tmp_path, callback, out: str = "run"):
    """A tiny Llama LoRA trained 6 steps (lr 1e-2) with ``callback``; returns (trainer, the adapter
    as trained: the last checkpoint's weights)."""
    from peft import LoraConfig, get_peft_model
    from test_components import _rows
    from test_safety import tokenizer
    from tiny import ATTENTION, tiny_llama
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, lora_dropout=0.1))
    args = TrainingArguments(output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, save_strategy="steps", save_steps=6, report_to=[], seed=0,
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(), callbacks=[callback], processing_class=tokenizer())
    trainer.train()
    return trainer


BENIGN = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]


def test_callback_patch_is_the_live_model_and_the_saved_adapter(tmp_path):
    """action='patch' at the end of training: the loss stop reached in >= 1 step, the live model's
    probe loss is the record's, only LoRA factors moved (the last checkpoint keeps the adapter as
    trained), save_model writes the patched adapter, and every surface says 'patch'."""
    import json

    from safetensors.torch import load_file
    from test_probe import random_probe

    from splora_callback import SPLoRACallback
    from splora_callback.safety import adapters_disabled

    probe = random_probe(seed=9)
    callback = SPLoRACallback(metric="probe", probe=probe, action="patch", patch_stop="refusal_loss", patch_lr=1e-2,
                              patch_anchors=2, benign_prompts=BENIGN, score_every_n_steps=0)
    trainer = _patch_run(tmp_path, callback)
    model = trainer.model
    record = callback.action_report["patch"]
    with adapters_disabled(model):
        aligned = probe_loss(probe, model)
    assert callback.action_report["action"] == "patch" and callback.action_report["layers"] == []
    assert record["refusal_loss"]["before"] > aligned, "the LoRA as trained already refuses: nothing to test"
    assert record["steps"] >= 1 and record["reached_target"] and record["target_refusal_loss"] == pytest.approx(aligned)
    assert probe_loss(probe, model) == pytest.approx(record["refusal_loss"]["after"], abs=1e-6)
    assert record["refusal_loss"]["after"] <= aligned
    assert record["anchors"] == 2 and record["anchor_requests"] == len(BENIGN)
    trained = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert saved.keys() == trained.keys() and any(not torch.equal(saved[k], trained[k]) for k in saved)
    live = {name.replace(".default", ""): p for name, p in model.named_parameters() if "lora_" in name}
    for key, tensor in saved.items():
        assert torch.equal(tensor, live[key].detach()), key
    report = json.loads((tmp_path / "run" / "splora_report.json").read_text())
    assert report["action"]["patch"]["steps"] == record["steps"]
    assert report["safety"]["after_action"]["refusal_loss"] == pytest.approx(record["refusal_loss"]["after"], abs=1e-6)
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"`patch`: patched the LoRA (lora_A): {record['steps']} step" in card and "every LoRA layer and rank kept" in card
    html = (tmp_path / "run" / "splora_report.html").read_text()
    assert "Patched the LoRA" in html and "no LoRA layer or component removed" in html


def test_a_failing_patch_leaves_the_live_model_as_trained(tmp_path, monkeypatch):
    """The patch raises on its third step: the live model is the adapter as trained (bit for bit),
    the report records the failure, the training is not lost."""
    from safetensors.torch import load_file
    from test_probe import random_probe

    import splora_callback.patch as patch_module
    from splora_callback import SPLoRACallback

    real = patch_module._patch_steps

    def failing(model, *args, **kwargs):
        steps = {"n": 0}

        def step(module, grad_input, grad_output):
            steps["n"] += 1
            if steps["n"] > 2:
                raise RuntimeError("planted failure in the patch")

        handle = model.get_output_embeddings().register_full_backward_hook(step)
        try:
            return real(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(patch_module, "_patch_steps", failing)
    callback = SPLoRACallback(metric="probe", probe=random_probe(seed=9), action="patch", patch_stop="refusal_loss",
                              patch_lr=1e-5, patch_anchors=0, score_every_n_steps=0)  # small steps: > 2 needed
    trainer = _patch_run(tmp_path, callback)
    assert "planted failure" in callback.action_report["failed"]
    trained = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    live = {name.replace(".default", ""): p for name, p in trainer.model.named_parameters() if "lora_" in name}
    for key, tensor in trained.items():
        assert torch.equal(tensor, live[key].detach()), key


def test_patch_config_and_needs_are_checked_before_step_one(tmp_path):
    from test_probe import random_probe

    from splora_callback import SPLoRACallback, SPLoRAConfig

    probe = random_probe(seed=9)
    default = SPLoRAConfig(metric="probe", probe=probe)  # the study's pick: the patch, the library's anchors
    assert default.action == "patch" and default.benign_prompts is None and "24 default requests" in default.plan()[0]
    assert SPLoRAConfig(metric="probe", probe=probe, select="repair").action == "prune"  # a rule named: prune by it
    assert SPLoRAConfig(metric="probe", probe=probe, k=3).action == "prune"
    with pytest.raises(ValueError, match="action='patch' trains the LoRA on the safety probe"):
        SPLoRAConfig(action="patch", base_model="b", patch_anchors=0)
    with pytest.raises(ValueError, match=r"SPLoRAConfig.patch_restore=1.5 must be in \(0, 1\]"):
        SPLoRAConfig(probe=probe, action="patch", patch_anchors=0, patch_restore=1.5)
    with pytest.raises(ValueError, match=r"SPLoRAConfig.patch_factors='B'; expected 'A'"):
        SPLoRAConfig(probe=probe, action="patch", patch_anchors=0, patch_factors="B")
    with pytest.raises(ValueError, match="acts at the end of training only"):
        SPLoRAConfig(probe=probe, action="patch", patch_anchors=0, prune_at_checkpoints=True)
    config = SPLoRAConfig(probe=probe, action="patch", benign_prompts=BENIGN)
    assert config.select == "fraction" and "patch the LoRA (its lora_A factors): up to 40 steps" in config.plan()[0]
    callback = SPLoRACallback(metric="probe", probe=probe, action="patch", benign_prompts=BENIGN)  # rate stop: prompts
    with pytest.raises(ValueError, match="patch_stop='refusal_rate' answers the safety probe's prompts"):
        _patch_run(tmp_path, callback)
    assert not (tmp_path / "run" / "checkpoint-6").exists()


def test_the_rate_stop_with_nothing_to_restore_changes_nothing_and_says_so(tmp_path, caplog):
    """The rate stop on the probe's own prompts: a LoRA that refuses as often as the aligned model
    (here: never; no refusal word in the vocabulary) gets 0 steps, and the card and the end line say
    nothing changed."""
    import logging

    from safetensors.torch import load_file
    from test_safety import tokenizer

    from splora_callback import SafetyProbe, SPLoRACallback

    probe = SafetyProbe.from_pairs(tokenizer(), [("w1 w2 w3", "w9 w8"), ("w4 w5", "w9 w7"), ("w6 w7", "w9 w6")],
                                   max_length=16, batch_size=3)
    callback = SPLoRACallback(metric="probe", probe=probe, action="patch", benign_prompts=BENIGN,
                              score_every_n_steps=0)
    with caplog.at_level(logging.INFO, logger="splora_callback.console"):
        trainer = _patch_run(tmp_path, callback)
    record = callback.action_report["patch"]
    assert record["steps"] == 0 and record["refusal_rate_by_step"] == [0.0] and record["aligned_refusal_rate"] == 0.0
    trained = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    live = {name.replace(".default", ""): p for name, p in trainer.model.named_parameters() if "lora_" in name}
    assert all(torch.equal(tensor, live[key].detach()) for key, tensor in trained.items())
    assert "nothing changed (the patch found the probe's refusal already at its target)" in caplog.text
    assert "`patch`: nothing changed" in (tmp_path / "run" / "README.md").read_text()


def test_the_demo_evaluates_the_callbacks_own_patch_only_with_its_settings(patch_setup, tmp_path):  # noqa: F811
    """evaluation.rate_patch.rebuild: false loads adapter/ (the callback's patch) into a copy of the
    trained LoRA, the template untouched, with the callback's record; other settings or no patch: an
    error that names the field."""
    import copy

    from evaluation_run import callback_patch_model
    from recipe_sections import OneShotPatchSection

    template, tokenizer, probe, benign = patch_setup
    patched = copy.deepcopy(template)
    record = safety_patch(patched, probe, lr=1e-2, batch_size=2, steps=2, anchors=2, anchor_pairs=benign,
                          tokenizer=tokenizer, anchor_max_length=64, seed=1)
    patched.save_pretrained(tmp_path / "adapter")
    before = _weights(template)
    spec = OneShotPatchSection(lr=4e-4, batch_size=10, max_steps=40, anchors=4, stop="refusal_rate", restore=1.0,
                               factors="A", rebuild=False)
    settings = {"patch_lr": 4e-4, "patch_max_steps": 40, "patch_anchors": 4, "patch_stop": "refusal_rate",
                "patch_restore": 1.0, "patch_factors": "A"}
    report = {"action": {"action": "patch", "patch": record}, "config": settings}
    model, loaded = callback_patch_model(template, spec, report, tmp_path / "adapter")
    assert loaded["from_callback_adapter"] and loaded["steps"] == 2
    for (name, p), (_, q) in zip(sorted(_weights(model).items()), sorted(_weights(patched).items()), strict=True):
        assert torch.equal(p, q), name
    assert all(torch.equal(p, before[name]) for name, p in template.named_parameters())
    with pytest.raises(ValueError, match=r"restore: 1.0 vs splora.patch_restore: 0.9"):
        callback_patch_model(template, spec, {**report, "config": {**settings, "patch_restore": 0.9}}, tmp_path / "adapter")
    with pytest.raises(ValueError, match="callback ran action 'prune'"):
        callback_patch_model(template, spec, {"action": {"action": "prune"}}, tmp_path / "adapter")
