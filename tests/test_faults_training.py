"""Issue #25, the training side: whatever goes wrong in the callback, the training is never lost,
and what is saved is what runs.

Each test is one numbered item of the issue, in a real ``Trainer`` on the tiny Llama; faults that
cannot be provoked for real are injected with ``monkeypatch`` at one stage of ``on_train_end``.
After every run: ``trainer.save_model()`` writes an adapter PEFT loads, and its logits equal the
live model's (to 1e-6): :func:`assert_live_equals_saved`.

1. wrong-typed fields refused on construction
2. a README.md whose front matter does not parse: moved aside, the adapter saves
3. a finite but huge update: non-finite scores named, nothing acted on, the report written
4. an interrupt inside the live component swap: every layer old or new, consistent
5. a shadowing rank_pattern key or an invalid regex: refused before step 1
6. two adapters: only the scored one is touched, the active set unchanged
7. resume never loads checkpoint-N/splora as an adapter
8. resume with a changed config: the difference logged, the new config used
9. the report lists the acted copies that exist (resumed-from included, rotated ones gone)
10. train() twice: both actions recorded
13. resume with base_model="auto" and a probe
and the rule behind all: a fault at any stage of on_train_end leaves the model as trained
(strict=True raises).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from test_probe import random_probe
from tiny import add_lora, lora_trainer
from transformers import LlamaForCausalLM, TrainerCallback

from splora_callback import SPLoRACallback, SPLoRAConfig
from splora_callback.config import ConfigTypeError
from splora_callback.pruning import prepare_prune_components
from splora_callback.report import REPORT_JSON, load_report
from splora_callback.transaction import Edit

LORA_LAYERS = 8
IDS = torch.arange(16).unsqueeze(0)


def layer_config(pair, **overrides) -> SPLoRAConfig:
    return SPLoRAConfig(**{"base_model": str(pair[0]), "select": "top_k", "k": 3, "action": "prune",
                           "score_every_n_steps": 0, **overrides})


def repair_config(pair, **overrides) -> SPLoRAConfig:
    return SPLoRAConfig(**{"base_model": str(pair[0]), "metric": "probe", "probe": random_probe(seed=9),
                           "select": "repair", "restore": 0.5, "score_every_n_steps": 0, "utility_examples": 6,
                           **overrides})


def lora_state(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items() if "lora_" in name}


def lora_layer_count(model) -> int:
    return sum(isinstance(module, LoraLayer) for module in model.modules())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def assert_live_equals_saved(trainer, folder, aligned_dir) -> PeftModel:
    """``trainer.save_model(folder)`` loads with PEFT and gives the live model's logits (1e-6)."""
    trainer.save_model(str(folder))
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(aligned_dir), str(folder))
    assert torch.allclose(logits(trainer.model), logits(reloaded), rtol=0, atol=1e-6)
    return reloaded


def test_01_wrong_typed_fields_refused_on_construction(pair):
    cases = {"threshold": "0.5", "alert_threshold": "2", "permutations": 16.5, "k": True, "prune_at_end": 1,
             "refusal_prompts": ["how do I", 3], "score_every_n_steps": "50", "restore": "0.8"}
    for field_name, value in cases.items():
        with pytest.raises(ConfigTypeError) as caught:
            SPLoRAConfig(base_model=str(pair[0]), **{field_name: value})
        message = str(caught.value)
        assert f"SPLoRAConfig.{field_name}={value!r}" in message and type(value).__name__ in message
        assert "expected " in message
    assert isinstance(ConfigTypeError("x"), ValueError)  # one except ValueError catches every bad value
    assert SPLoRAConfig(base_model="b", select="threshold", threshold=1).threshold == 1  # an int is a number


def test_02_unparsable_card_is_moved_aside_and_the_adapter_saves(pair, dataset, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    original = b"---\nbase_model: [unclosed\n---\nMy notes.\n"
    (out / "README.md").write_bytes(original)
    trainer = lora_trainer(pair[1], dataset, out, [SPLoRACallback(layer_config(pair))])
    with caplog.at_level(logging.WARNING, "splora_callback"):
        trainer.train()
    assert f"{out / 'README.md'} has YAML front matter that does not parse (ParserError" in caplog.text  # before step 1
    assert (out / "README.unparsed.md").read_bytes() == original  # moved, unchanged
    assert "splora:begin" in (out / "README.md").read_text()
    assert lora_layer_count(trainer.model) == LORA_LAYERS - 3  # the action was not skipped
    assert_live_equals_saved(trainer, out, pair[1])  # PEFT's save_pretrained merges into the new card


class _BlowUp(TrainerCallback):
    """Before the last scoring: the LoRA update x1e20 (finite weights, overflowing activations)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == state.max_steps:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.mul_(1e20)


def test_03_huge_update_names_non_finite_scores_acts_on_nothing_and_saves(pair, dataset, tmp_path, caplog):
    callback = SPLoRACallback(repair_config(pair))
    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [_BlowUp(), callback])
    with caplog.at_level(logging.WARNING, "splora_callback"):
        trainer.train()
    before = lora_state(trainer.model)
    assert all(torch.isfinite(value).all() for value in before.values())  # finite, but huge
    assert "non-finite score(s)" in caplog.text and "nothing acted on" in caplog.text
    entry = callback.history[-1]
    assert entry["selected"] is None and any(item.startswith("model.layers.") for item in entry["non_finite"])
    assert callback.action_report["action"] == "none" and "non-finite scores" in callback.action_report["skipped"]
    assert lora_layer_count(trainer.model) == LORA_LAYERS
    report = json.loads((tmp_path / "out" / REPORT_JSON).read_text())  # strict JSON: NaN / inf written as null
    assert report["action"]["skipped"] and report["history"][-1]["non_finite"]
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pair[1]), str(tmp_path / "saved"))
    assert all(torch.equal(value, lora_state(reloaded)[name]) for name, value in before.items())


def _component_model(aligned_dir):
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM.from_pretrained(aligned_dir))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    names = [name for name, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)]
    return model, {names[0]: [0, 2], names[3]: [1], names[5]: [0, 1, 2, 3]}  # names[5] is emptied


def _saved_logits(model, folder, aligned_dir) -> torch.Tensor:
    model.save_pretrained(folder)
    return logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(aligned_dir), str(folder)))


def test_04_interrupt_inside_the_component_swap_leaves_every_layer_old_or_new(pair, tmp_path):
    model, chosen = _component_model(pair[1])
    old_logits, old_state = logits(model), lora_state(model)
    old_config = json.dumps(model.peft_config["default"].to_dict(), sort_keys=True, default=sorted)

    # an exception (KeyboardInterrupt) half-way through the swap: every change undone
    prepared = prepare_prune_components(model, chosen)
    assert lora_state(model).keys() == old_state.keys()  # built aside: nothing changed yet

    def interrupt():
        raise KeyboardInterrupt

    middle = len(prepared.edits.edits) // 2
    prepared.edits.edits.insert(middle, Edit(interrupt, lambda: None))
    with pytest.raises(KeyboardInterrupt):
        prepared.commit()
    assert json.dumps(model.peft_config["default"].to_dict(), sort_keys=True, default=sorted) == old_config
    assert all(torch.equal(value, lora_state(model)[name]) for name, value in old_state.items())
    assert torch.allclose(_saved_logits(model, tmp_path / "old", pair[1]), old_logits, rtol=0, atol=1e-6)

    # a real SIGINT half-way: held until the swap is done, then delivered to the program's handler
    # (Python's default here: an earlier test of the session may have left another one); every layer new
    prepared = prepare_prune_components(model, chosen)
    prepared.edits.edits.insert(middle, Edit(lambda: os.kill(os.getpid(), signal.SIGINT), lambda: None))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            prepared.commit()
    finally:
        signal.signal(signal.SIGINT, before)
    assert prepared.edits.committed and lora_layer_count(model) == LORA_LAYERS - 1
    new_logits = logits(model)
    assert not torch.allclose(new_logits, old_logits, atol=1e-4)
    assert torch.allclose(_saved_logits(model, tmp_path / "new", pair[1]), new_logits, rtol=0, atol=1e-6)


def test_04_interrupt_in_the_trainer_swap_keeps_the_trained_adapter(pair, dataset, tmp_path, monkeypatch):
    import splora_callback.pruning as pruning

    calls, real = [], pruning.set_item

    def set_item_interrupting(container, key, value):
        edit = real(container, key, value)
        calls.append(edit)
        if len(calls) == 4:  # the fourth change of the swap
            def interrupt():
                raise KeyboardInterrupt
            return Edit(interrupt, edit.undo)
        return edit

    monkeypatch.setattr(pruning, "set_item", set_item_interrupting)
    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [SPLoRACallback(repair_config(pair))])
    with pytest.raises(KeyboardInterrupt):  # the user's interrupt is not swallowed
        trainer.train()
    assert len(calls) >= 4 and lora_layer_count(trainer.model) == LORA_LAYERS
    assert {module.r["default"] for module in trainer.model.modules() if isinstance(module, LoraLayer)} == {4}
    assert not trainer.model.peft_config["default"].rank_pattern
    assert_live_equals_saved(trainer, tmp_path / "saved", pair[1])


@pytest.mark.parametrize("lora, match", [
    ({"rank_pattern": {"(.*)v_proj": 4}}, r"rank_pattern key '\(\.\*\)v_proj' would override"),
    ({"rank_pattern": {"v_proj[": 4}}, r"rank_pattern 'v_proj\[' is not a valid regular expression"),
    ({"exclude_modules": "(unclosed"}, r"exclude_modules '\(unclosed' is not a valid regular expression"),
])
def test_05_pattern_problems_refused_before_step_one(pair, dataset, tmp_path, lora, match):
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM.from_pretrained(pair[1]))
    for key, value in lora.items():  # set after get_peft_model, which refuses an invalid regex itself
        setattr(model.peft_config["default"], key, value)
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [SPLoRACallback(repair_config(pair)), Steps()],
                           model=model)
    with pytest.raises(ValueError, match=match) as caught:
        trainer.train()
    assert "before step 1" in str(caught.value) and steps == []


def test_06_two_adapters_only_the_scored_one_is_pruned_the_active_set_unchanged(pair, dataset, tmp_path):
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM.from_pretrained(pair[1]))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.other" in name:
                parameter.normal_(0, 0.5)
    model.set_adapter("default")
    other = {name: value for name, value in lora_state(model).items() if ".other." in name}
    callback = SPLoRACallback(layer_config(pair))
    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [callback], model=model)
    trainer.train()
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    pruned = [module for module in layers if "default" not in module.lora_A]
    assert len(pruned) == 3 and all("other" in module.lora_A for module in pruned)
    assert all(module.active_adapters == ["default"] for module in layers)
    assert all(torch.equal(value, lora_state(model)[name]) for name, value in other.items())  # untouched
    assert_live_equals_saved(trainer, tmp_path / "saved", pair[1])  # "other" stays off, as before


def _checkpointed(pair, dataset, output_dir, callback, **overrides):
    return lora_trainer(pair[1], dataset, output_dir, [callback],
                        **{"max_steps": 10, "save_strategy": "steps", "save_steps": 5,
                           "restore_callback_states_from_checkpoint": True, **overrides})


def test_07_resume_never_loads_the_acted_copy_as_an_adapter(pair, dataset, tmp_path, caplog):
    first = _checkpointed(pair, dataset, tmp_path / "a", SPLoRACallback(layer_config(pair, prune_at_checkpoints=True)))
    first.train()
    assert (tmp_path / "a" / "checkpoint-5" / "splora" / "adapter_model.safetensors").is_file()
    callback = SPLoRACallback(layer_config(pair, prune_at_checkpoints=True))
    resumed = _checkpointed(pair, dataset, tmp_path / "a", callback)
    with caplog.at_level(logging.WARNING, "splora_callback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    assert "as a second adapter 'splora'; it was removed" in caplog.text
    assert list(resumed.model.peft_config) == ["default"]
    assert lora_layer_count(resumed.model) == LORA_LAYERS - 3
    assert_live_equals_saved(resumed, tmp_path / "saved", pair[1])
    assert not (tmp_path / "saved" / "splora").exists()  # no stale copy saved beside


def test_08_resume_with_a_changed_config_logs_it_and_uses_the_new_one(pair, dataset, tmp_path, caplog):
    _checkpointed(pair, dataset, tmp_path / "a", SPLoRACallback(layer_config(pair, score_every_n_steps=5))).train()
    callback = SPLoRACallback(layer_config(pair, score_every_n_steps=5, k=2))
    resumed = _checkpointed(pair, dataset, tmp_path / "b", callback)
    with caplog.at_level(logging.WARNING, "splora_callback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    assert "differs from the checkpoint's: k: 3 -> 2" in caplog.text and "The new config is used" in caplog.text
    assert [entry["step"] for entry in callback.history] == [5, 10]  # the restored history continues
    assert len(callback.selected) == 2 and lora_layer_count(resumed.model) == LORA_LAYERS - 2


def test_09_the_report_lists_the_acted_copies_that_exist(pair, dataset, tmp_path):
    config = layer_config(pair, prune_at_checkpoints=True)
    _checkpointed(pair, dataset, tmp_path / "a", SPLoRACallback(config)).train()
    shutil.rmtree(tmp_path / "a" / "checkpoint-10")  # as if the run had stopped before it
    _checkpointed(pair, dataset, tmp_path / "a", SPLoRACallback(layer_config(pair, prune_at_checkpoints=True))).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    listed = load_report(tmp_path / "a")["checkpoints"]
    assert [entry["step"] for entry in listed] == [5, 10]  # the checkpoint resumed from is kept
    assert all((tmp_path / "a" / entry["path"]).is_dir() for entry in listed)

    _checkpointed(pair, dataset, tmp_path / "rotated", SPLoRACallback(layer_config(pair, prune_at_checkpoints=True)),
                  save_total_limit=1).train()
    assert not (tmp_path / "rotated" / "checkpoint-5").exists()
    assert [entry["step"] for entry in load_report(tmp_path / "rotated")["checkpoints"]] == [10]


def test_10_train_twice_records_both_actions(pair, dataset, tmp_path, caplog):
    callback = SPLoRACallback(layer_config(pair, k=2))
    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [callback], max_steps=4)
    trainer.train()
    first = list(callback.action_report["layers"])
    with caplog.at_level(logging.WARNING, "splora_callback"):
        trainer.train()
    assert "train() again on a callback that already acted" in caplog.text
    report = load_report(tmp_path / "out")
    assert report["previous_actions"][0]["layers"] == first
    assert report["action"]["layers"] and not set(report["action"]["layers"]) & set(first)
    assert lora_layer_count(trainer.model) == LORA_LAYERS - 4
    assert_live_equals_saved(trainer, tmp_path / "saved", pair[1])


def test_13_resume_with_base_model_auto_and_a_probe(pair, dataset, tmp_path):
    aligned = tmp_path / "aligned"
    shutil.copytree(pair[1], aligned)
    (aligned / "README.md").write_text(f"---\nbase_model: {pair[0]}\n---\n")  # the card names the base
    probe = random_probe(seed=9)

    def run(output_dir, **kwargs):
        callback = SPLoRACallback(SPLoRAConfig(base_model="auto", metric="probe", probe=probe, score_every_n_steps=5,
                                               utility_examples=6, select="repair"))
        trainer = _checkpointed((pair[0], aligned), dataset, output_dir, callback)
        trainer.train(**kwargs)
        return callback

    run(tmp_path / "a")
    callback = run(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    assert callback.config.base_model == str(pair[0]) and callback.base_model_source
    assert [entry["step"] for entry in callback.history] == [5, 10] and callback.action_report["action"] == "prune"


STAGES = {  # a stage of on_train_end -> what is patched to raise there
    "scoring": "splora_callback.callback.SPLoRACallback.compute_scores",
    "measured stop": "splora_callback.rules.repair_selection",
    "building the action": "splora_callback.pruning._linear_like",
    "swap": "splora_callback.pruning.set_item",  # the fourth change of the swap raises; the first three undone
    "measured effect": "splora_callback.safety.SafetyChecks.after_action",
    "JSON report": "splora_callback.callback.write_json_report",
    "HTML report": "splora_callback.callback.write_html_report",
    "model card": "splora_callback.callback.write_model_card",
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_fault_at_any_stage_of_the_end_leaves_the_model_as_trained(pair, dataset, tmp_path, monkeypatch, caplog, stage):
    import splora_callback.pruning as pruning

    class Reference(TrainerCallback):  # the trained LoRA, just before the callback's end of training
        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.state = lora_state(model)

    def fault(*args, **kwargs):
        raise RuntimeError(f"injected fault in the {stage}")

    edits, real_set_item = [], pruning.set_item

    def set_item_failing(container, key, value):  # the swap: an edit that raises when applied
        edits.append(real_set_item(container, key, value))
        return Edit(fault, edits[-1].undo) if len(edits) == 4 else edits[-1]

    monkeypatch.setattr(STAGES[stage], set_item_failing if stage == "swap" else fault)
    reference, callback = Reference(), SPLoRACallback(repair_config(pair))
    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [reference, callback])
    with caplog.at_level(logging.ERROR, "splora_callback"):
        trainer.train()  # not raised: the training is kept
    assert f"injected fault in the {stage}" in caplog.text
    assert "The live model is left as trained" in caplog.text and "splora prune" in caplog.text
    assert lora_layer_count(trainer.model) == LORA_LAYERS
    assert all(torch.equal(value, lora_state(trainer.model)[name]) for name, value in reference.state.items())
    assert callback.action_report["action"] == "none" and "injected fault" in callback.action_report["failed"]
    if stage not in ("JSON report", "model card"):  # the failure is in the report (when it can be written)
        assert "injected fault" in load_report(tmp_path / "out")["action"]["failed"]
    assert_live_equals_saved(trainer, tmp_path / "saved", pair[1])


def test_strict_raises_after_leaving_the_model_as_trained(pair, dataset, tmp_path, monkeypatch):
    import splora_callback.callback as callback_module

    def failing(*args, **kwargs):
        raise RuntimeError("injected fault in the HTML report")

    monkeypatch.setattr(callback_module, "write_html_report", failing)
    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [SPLoRACallback(layer_config(pair, strict=True))])
    with pytest.raises(RuntimeError, match="injected fault"):
        trainer.train()
    assert lora_layer_count(trainer.model) == LORA_LAYERS  # rolled back before raising
    assert_live_equals_saved(trainer, tmp_path / "saved", pair[1])


def test_live_equals_saved_after_each_action(pair, dataset, tmp_path):
    for name, config in (("layers", layer_config(pair)), ("components", repair_config(pair)),
                         ("project", layer_config(pair, action="project"))):
        trainer = lora_trainer(pair[1], dataset, tmp_path / name, [SPLoRACallback(config)])
        trainer.train()
        assert_live_equals_saved(trainer, tmp_path / f"{name}-saved", pair[1])
