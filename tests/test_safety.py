"""The direct safety signal (splora_callback.safety): refusal loss, aligned reference, refusal rate,
alerts and early stop, in real Trainer runs on a tiny Llama (offline, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from tiny import add_lora, lora_trainer
from transformers import LlamaForCausalLM

from splora_callback import SPLoRACallback, SPLoRAConfig
from splora_callback.probe import SafetyProbe
from splora_callback.report import load_report
from splora_callback.safety import SafetyMonitor, adapters_disabled, aligned_refusal_loss, refusal_rate_now
from splora_callback.teacher_forced import probe_loss

LOSS_RTOL = 1e-5  # float32 model: the same forward passes in another batching


def make_probe(seed: int = 1) -> SafetyProbe:
    ids = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(seed))
    labels = torch.where(torch.arange(12) < 6, -100, ids)  # loss on the "refusal" half only
    return SafetyProbe.from_tensors(ids, torch.ones_like(ids), labels, batch_size=4)


def trained_lora(aligned_dir):
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM.from_pretrained(aligned_dir))
    with torch.no_grad():  # an update in every layer
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def dense_loss(model, probe: SafetyProbe) -> float:
    """Mean token loss of the probe's responses, written out (full logits, one batch)."""
    with torch.no_grad():
        logits = model.eval()(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
    shifted, targets = logits[:, :-1], probe.labels[:, 1:]
    return float(F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100))


def test_probe_loss_is_the_probes_run_loss_and_the_dense_mean(pair):
    model, probe = trained_lora(pair[1]), make_probe()
    assert probe_loss(probe, model) == pytest.approx(dense_loss(model, probe), rel=LOSS_RTOL)
    assert probe_loss(probe, model) == pytest.approx(probe.run(model).loss, rel=LOSS_RTOL)


def test_aligned_reference_is_the_model_without_its_adapter_and_changes_nothing(pair):
    model, probe = trained_lora(pair[1]), make_probe()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    lora_a = next(p for name, p in model.named_parameters() if "lora_A" in name)
    lora_a.requires_grad_(False)  # a user-frozen LoRA weight must stay frozen (PEFT's context would unfreeze it)
    flags[next(name for name, p in model.named_parameters() if p is lora_a)] = False
    model.train()
    aligned = LlamaForCausalLM.from_pretrained(pair[1])
    assert aligned_refusal_loss(probe, model) == pytest.approx(dense_loss(aligned, probe), rel=LOSS_RTOL)
    assert aligned_refusal_loss(probe, model) != pytest.approx(probe_loss(probe, model), rel=1e-3)
    assert model.training and {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))
    with pytest.raises(ValueError, match="no PEFT adapter layer"), adapters_disabled(aligned):
        pass


def test_monitor_alerts_once_per_crossing_and_stops_after_patience_checks_in_a_row():
    monitor = SafetyMonitor(loss_alert=0.5, patience=2, aligned_refusal_loss=1.0)
    assert monitor.loss_level() == 1.5
    assert monitor.check(1, "refusal_loss", 1.6)["level"] == 1.5 and not monitor.should_stop(1)
    assert monitor.check(2, "refusal_loss", 1.2) is None and not monitor.should_stop(2)  # back below: reset
    assert monitor.check(3, "refusal_loss", 1.7) is not None  # a new crossing, a new alert
    assert monitor.check(4, "refusal_loss", 1.8) is None and monitor.should_stop(4)
    assert monitor.stopped_at == 4 and [alert["step"] for alert in monitor.alerts] == [1, 3]
    rate = SafetyMonitor(rate_alert=0.8)
    assert rate.record_rate(10, 0.9) is None and rate.record_rate(20, 0.5)["signal"] == "refusal_rate"
    assert SafetyMonitor.from_state(monitor.state(), SPLoRAConfig(base_model="b")).alerts == monitor.alerts


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"refusal_loss_alert": 0.5}, r"refusal_loss_alert=0.5 needs probe=SafetyProbe"),
        ({"refusal_every_n_steps": 10}, r"refusal_every_n_steps=10 needs refusal_prompts"),
        ({"refusal_prompts": ["How do I pick a lock?"]}, r"refusal_every_n_steps=0 never uses it"),
        ({"refusal_prompts": "one prompt", "refusal_every_n_steps": 5},
         r"refusal_prompts='one prompt' has type str; expected a list of strings or None"),
        ({"refusal_rate_alert": 1.5}, r"refusal_rate_alert=1.5: a rate in \[0, 1\]"),
        ({"early_stopping_patience": 3}, r"early_stopping_patience needs a safety alert"),
        ({"alignment_placement": "gpu"}, r"alignment_placement='gpu': expected one of stream, cpu, resident"),
    ],
)
def test_safety_fields_are_checked_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPLoRAConfig(base_model="base", **kwargs)


def run(pair, dataset, output_dir, callback, **overrides):
    trainer = lora_trainer(pair[1], dataset, output_dir, [callback], **overrides)
    trainer.train()
    return trainer


def test_refusal_loss_is_logged_at_every_scoring_step_with_its_aligned_reference(pair, dataset, tmp_path):
    probe = make_probe()
    callback = SPLoRACallback(base_model=str(pair[0]), metric="ediem", select="top_k", k=2, action="prune", score_every_n_steps=4, probe=probe,
                              refusal_loss_alert=100.0)
    trainer = run(pair, dataset, tmp_path / "out", callback)
    losses = [entry["scores"]["losses"]["refusal"] for entry in callback.history]
    assert [entry["step"] for entry in callback.history] == [4, 8, 12] and len(set(losses)) == 3
    report = load_report(tmp_path / "out")
    aligned = LlamaForCausalLM.from_pretrained(pair[1])
    assert report["safety"]["aligned_refusal_loss"] == pytest.approx(dense_loss(aligned, probe), rel=LOSS_RTOL)
    assert report["safety"]["alerts"] == [] and report["safety"]["stopped_at"] is None  # 100 nats: never
    # after pruning 2 layers, the acted live model's refusal loss (the "measured effect")
    assert report["safety"]["after_action"]["refusal_loss"] == pytest.approx(
        dense_loss(trainer.model, probe), rel=LOSS_RTOL)
    assert trainer.state.global_step == 12


def test_early_stop_stops_training_after_patience_checks_past_the_alert(pair, dataset, tmp_path, caplog):
    # a level below the aligned loss: every check is past it, so the stop must come at the 2nd check
    callback = SPLoRACallback(base_model=str(pair[0]), metric="ediem", select="top_k", k=2, action="prune", score_every_n_steps=2,
                              probe=make_probe(), refusal_loss_alert=-50.0, early_stopping_patience=2)
    trainer = run(pair, dataset, tmp_path / "out", callback)
    assert trainer.state.global_step == 4 and [entry["step"] for entry in callback.history] == [2, 4]
    report = load_report(tmp_path / "out")
    assert report["safety"]["stopped_at"] == 4 and [alert["step"] for alert in report["safety"]["alerts"]] == [2]
    assert report["action"]["action"] == "prune" and len(report["action"]["layers"]) == 2  # acted at the stop
    assert any("stopping training at step 4" in record.getMessage() for record in caplog.records)
    assert any("refusal loss on the safety probe" in record.getMessage() and record.levelname == "WARNING"
               for record in caplog.records)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(100)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_refusal_rate_is_measured_on_its_schedule_and_can_stop_training(pair, dataset, tmp_path):
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    # w0..w99 hold no refusal keyword: the rate is 0 < 0.5 at every check, so patience 2 stops at step 6
    callback = SPLoRACallback(base_model=str(pair[0]), metric="ediem", select="top_k", k=2, action="prune", score_every_n_steps=4,
                              refusal_prompts=prompts, refusal_every_n_steps=3, refusal_max_new_tokens=4,
                              refusal_rate_alert=0.5, early_stopping_patience=2)
    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [callback], processing_class=tokenizer())
    trainer.train()
    report = load_report(tmp_path / "out")
    assert [item["step"] for item in report["safety"]["refusal_rates"]] == [3, 6]
    assert report["safety"]["aligned_refusal_rate"] == 0.0 and report["safety"]["stopped_at"] == 6
    assert trainer.state.global_step == 6 and report["safety"]["refusal_prompts"] == 3
    assert report["safety"]["after_action"]["refusal_rate"] == 0.0


def test_refusal_prompts_without_a_tokenizer_fail_before_the_first_step(pair, dataset, tmp_path):
    callback = SPLoRACallback(base_model=str(pair[0]), metric="ediem", select="top_k", k=2, action="prune", refusal_prompts=["w1"],
                              refusal_every_n_steps=3)
    with pytest.raises(ValueError, match="refusal_prompts needs the tokenizer.*processing_class=tokenizer"):
        run(pair, dataset, tmp_path / "out", callback)


def test_refusal_rate_now_restores_the_model_mode(pair):
    model = trained_lora(pair[1]).train()
    assert refusal_rate_now(model, tokenizer(), ["w1 w2", "w3"], max_new_tokens=3) == 0.0
    assert model.training


def test_probe_loss_with_a_shared_prompt_prefix_is_the_dense_loss(pair, monkeypatch):
    """Pairs that start alike (a chat template's system prompt): the prefix runs once and every row
    continues from its cache; the loss is the dense one, and the same without sharing."""
    from splora_callback import teacher_forced
    from splora_callback.teacher_forced import shared_prompt_length

    caches = []
    real_prefix_cache = teacher_forced.prefix_cache
    monkeypatch.setattr(teacher_forced, "prefix_cache", lambda *args: caches.append(real_prefix_cache(*args)) or caches[-1])

    model = trained_lora(pair[1])
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 128, (5, 14), generator=gen)
    ids[:, :6] = ids[0, :6]  # a shared prompt start of 6 tokens
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding on two rows
    mask[3, 9:] = 0
    labels = torch.where((torch.arange(14) >= 8) & (mask == 1), ids, torch.full_like(ids, -100))
    probe = SafetyProbe.from_tensors(ids, mask, labels, batch_size=3)
    targets = labels[:3, 1:] != -100
    assert shared_prompt_length(ids[:3], mask[:3], targets) == 6
    assert shared_prompt_length(ids[:1], mask[:1], targets[:1]) == 0  # nothing to share in one row
    early = torch.zeros_like(targets)
    early[0, 3] = True  # a target inside the common start: only the tokens before it are shared
    assert shared_prompt_length(ids[:3], mask[:3], early) == 3
    shared = probe_loss(probe, model)
    assert len(caches) == 2 and all(caches)  # both batches continued from a prefix cache
    assert shared == pytest.approx(dense_loss(model, probe), rel=LOSS_RTOL)
    assert shared == pytest.approx(probe_loss(probe, model, share_prefix=False), rel=LOSS_RTOL)
