"""Issue #13, the callback in real Trainer runs: fail before step 1, or finish with something that loads.

Permissions: the tests run as root, which ignores file modes, so a read-only ``output_dir`` is made
immutable (``chattr +i``, ``faults.read_only``; ``chmod 0555`` when not root). (An ``output_dir``
under a regular file is refused by the Trainer itself, in its constructor.)
"""

from __future__ import annotations

import json
import logging

import pytest
from faults import read_only
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from tiny import lora_trainer
from transformers import LlamaForCausalLM

from splora_callback import SPLoRACallback, SPLoRAConfig, UnsupportedAdapterError
from splora_callback._io import OutputNotWritableError
from splora_callback.layer_names import NothingLeftError
from splora_callback.report import REPORT_HTML, REPORT_JSON, load_report

LORA_LAYERS = 8


def make_trainer(pair, dataset, output_dir, callbacks, targets=("q_proj", "k_proj", "v_proj", "o_proj"), **overrides):
    return lora_trainer(pair[1], dataset, output_dir, callbacks, targets=list(targets),
                        **{"max_steps": 6, "logging_steps": 3, **overrides})


def config(pair, **overrides) -> SPLoRAConfig:
    return SPLoRAConfig(**{"base_model": str(pair[0]), "k": 3, "action": "prune", "score_every_n_steps": 3, **overrides})


def lora_count(model) -> int:
    return sum(isinstance(module, LoraLayer) for module in model.modules())


def test_wandb_disabled_still_writes_the_html_report(pair, dataset, tmp_path, monkeypatch, caplog):
    import wandb

    if wandb.run is not None:  # a run another test left open would be reused by WandbCallback
        wandb.finish()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = make_trainer(pair, dataset, tmp_path / "out", [SPLoRACallback(config(pair))], report_to=["wandb"])
    try:
        with caplog.at_level(logging.WARNING, "splora_callback"):
            run.train()
    finally:
        wandb.finish()
        wandb.teardown()  # wandb's process-wide settings would keep mode "disabled" for later tests
    assert (tmp_path / "out" / REPORT_HTML).is_file()
    assert "W&B is disabled" in caplog.text and "HTML report" in caplog.text  # said, not silent


def test_read_only_output_dir_fails_before_the_first_step(pair, dataset, tmp_path):
    (tmp_path / "ro").mkdir()
    run = make_trainer(pair, dataset, tmp_path / "ro", [SPLoRACallback(config(pair))])
    with read_only(tmp_path / "ro") as reason:
        with pytest.raises(OutputNotWritableError, match=rf"output_dir .*ro cannot be written: .*{reason}"):
            run.train()
    assert run.state.global_step == 0 and lora_count(run.model) == LORA_LAYERS  # nothing trained, nothing pruned


def test_resume_from_a_checkpoint_saved_without_the_callback(pair, dataset, tmp_path, caplog):
    common = {"max_steps": 10, "save_strategy": "steps", "save_steps": 5, "restore_callback_states_from_checkpoint": True}
    make_trainer(pair, dataset, tmp_path / "plain", [], **common).train()  # no SPLoRA state in its checkpoints
    callback = SPLoRACallback(config(pair, score_every_n_steps=2))
    resumed = make_trainer(pair, dataset, tmp_path / "plain", [callback], **common)
    with caplog.at_level(logging.WARNING, "splora_callback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-5"))
    assert caplog.text.count("saved without SPLoRACallback") == 1
    state = json.loads((tmp_path / "plain" / "checkpoint-10" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["SPLoRACallback"]["attributes"]["history"]
    assert [entry["step"] for entry in saved] == [6, 8, 10]  # a fresh history from the resume on
    assert load_report(tmp_path / "plain")["status"] == "finished"


def test_a_config_that_prunes_every_layer_fails_before_the_first_step(pair, dataset, tmp_path):
    for options in ({"k": LORA_LAYERS}, {"k": None, "select": "fraction", "fraction": 1.0}):
        run = make_trainer(pair, dataset, tmp_path / "out", [SPLoRACallback(config(pair, **options))])
        with pytest.raises(NothingLeftError, match="selects all 8 LoRA layers: pruning them would leave nothing"):
            run.train()
        assert run.state.global_step == 0


def test_a_threshold_past_every_layer_leaves_a_model_that_saves_and_loads(pair, dataset, tmp_path, caplog):
    callback = SPLoRACallback(config(pair, k=None, threshold=-1e9))
    run = make_trainer(pair, dataset, tmp_path / "out", [callback])
    with caplog.at_level(logging.ERROR, "splora_callback"):
        run.train()
    assert "leave nothing of the fine-tune" in caplog.text
    assert callback.action_report["action"] == "none" and "refused" in callback.action_report
    assert lora_count(run.model) == LORA_LAYERS
    run.save_model(str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pair[1]), tmp_path / "final")
    assert lora_count(reloaded) == LORA_LAYERS
    assert "refused" in load_report(tmp_path / "out")["action"]
    assert (tmp_path / "out" / REPORT_JSON).is_file()


def test_lora_on_embeddings_fails_before_the_first_step(pair, dataset, tmp_path):
    run = make_trainer(pair, dataset, tmp_path / "out", [SPLoRACallback(config(pair, k=1))],
                       targets=("q_proj", "embed_tokens"))
    with pytest.raises(UnsupportedAdapterError, match="embed_tokens"):
        run.train()
    assert run.state.global_step == 0
