"""SPLoRACallback inside real Trainer runs: W&B offline, pruning, checkpoints, resume, determinism, TRL."""

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny import add_lora, llama_attention_names, lora_trainer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from wandb_offline import logged_table, offline_run_dirs, read_offline_run

from splora_callback.alignment import AlignmentMismatchError
from splora_callback.callback import SPLoRACallback
from splora_callback.config import SPLoRAConfig
from splora_callback.probe import SafetyProbe
from splora_callback.pruning import prune_layers
from splora_callback.report import REPORT_HTML, REPORT_JSON, load_report

LORA_LAYERS = 8  # tiny Llama: 2 layers x q/k/v/o


def lora_model(aligned_dir, dropout: float = 0.0):
    torch.manual_seed(0)  # LoRA A's init draws from the global RNG
    model = LlamaForCausalLM.from_pretrained(aligned_dir)
    if dropout:
        return get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                lora_dropout=dropout,
            ),
        )
    return add_lora(model)


def config(base_dir, **overrides) -> SPLoRAConfig:
    return SPLoRAConfig(
        **{"base_model": str(base_dir), "select": "top_k", "k": 3, "action": "prune", "score_every_n_steps": 4,
           **overrides}
    )


def trainer(pair, dataset, output_dir, callbacks, report_to=(), dropout=0.0, **overrides):
    return lora_trainer(pair[1], dataset, output_dir, callbacks, model=lora_model(pair[1], dropout),
                        report_to=list(report_to), **overrides)


def lora_layer_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def logits(model) -> torch.Tensor:
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def live_callback(trainer) -> SPLoRACallback:
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SPLoRACallback)]
    return callback


def test_wandb_offline_run_holds_series_on_trainer_steps(pair, dataset, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    callback = SPLoRACallback(config(pair[0], alert_threshold=0.5))
    run = trainer(pair, dataset, tmp_path / "out", [callback], report_to=["wandb"])
    try:
        run.train()
    finally:
        wandb.finish()
        wandb.teardown()  # finish() can return before wandb-core wrote the last records of the .wandb file
    (run_dir,) = offline_run_dirs(tmp_path)  # one run: the callback never opened a second one
    logged = read_offline_run(run_dir)
    assert logged.runs == 1

    rows = [row for row in logged.history if "splora/summary/ediem_max" in row]
    assert [row["train/global_step"] for row in rows] == [4, 8, 12] == [h["step"] for h in callback.history]
    # per-layer scalars at every scoring step (8 layers, within trackers.WANDB_LAYER_SERIES), and one line
    # chart per module kind at the end
    for row, entry in zip(rows, callback.history, strict=True):
        logged_layers = {key.removeprefix("splora/ediem/"): value for key, value in row.items()
                         if key.startswith("splora/ediem/") and not key.endswith("_table")}
        assert logged_layers == pytest.approx({item["name"]: item["ediem"] for item in entry["scores"]["layers"]})
    lines = {}
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
        table = logged_table(run_dir, logged.summary, f"splora/ediem/{kind}_table")
        lines.update({(step, layer): value for step, layer, value in table["data"]})
    for row, entry in zip(rows, callback.history, strict=True):
        ediem = {item["name"]: item["ediem"] for item in entry["scores"]["layers"]}
        assert {
            f"model.layers.{layer}": value for (step, layer), value in lines.items() if step == entry["step"]
        } == pytest.approx(ediem)
        assert row["splora/summary/ediem_max"] == pytest.approx(max(ediem.values()))
        for key in (
            "ediem_mean",
            "ediem_over_threshold",
            "cosine_min",
            "cosine_mean",
            "signed_min",
            "active_layers",
        ):
            assert f"splora/summary/{key}" in row
        assert {f"splora/kind/{kind}/ediem_mean" for kind in ("q_proj", "k_proj", "v_proj", "o_proj")} <= set(
            row
        )
    # the Trainer's own loss rows share the step axis
    assert [row["train/global_step"] for row in logged.history if "train/loss" in row] == [4, 8, 12]

    pruned = callback.action_report["layers"]
    assert len(pruned) == 3 and logged.summary["splora/pruned_layers"] == pruned
    assert logged.summary["splora/ediem_heatmap/_type"] == "image-file"
    assert logged.summary["splora/final/scores/_type"] == "table-file"
    assert logged.summary["splora/final/ediem_by_layer_table/nrows"] == LORA_LAYERS
    crossed = {
        item["name"]
        for entry in callback.history
        for item in entry["scores"]["layers"]
        if item["ediem"] is not None and item["ediem"] > 0.5
    }
    assert crossed and set(callback.alerted) == crossed
    assert {alert["level"] for alert in logged.alerts} == {"WARN"}
    assert all(any(name in alert["text"] for alert in logged.alerts) for name in crossed)
    assert (tmp_path / "out" / REPORT_JSON).is_file() and (tmp_path / "out" / REPORT_HTML).is_file()


def test_pruned_at_end_and_save_model_writes_the_pruned_adapter(pair, dataset, tmp_path):
    callback = SPLoRACallback(config(pair[0]))
    run = trainer(pair, dataset, tmp_path / "out", [callback], save_strategy="steps", save_steps=12)
    run.train()
    run.save_model(str(tmp_path / "final"))

    pruned = callback.action_report["layers"]
    assert len(pruned) == 3 and pruned == callback.history[-1]["selected"]
    assert sorted(lora_layer_names(run.model.base_model.model)) == sorted(
        set(llama_attention_names(run.model.base_model.model)) - set(pruned)
    )
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pair[1]), tmp_path / "final")
    assert len(lora_layer_names(reloaded)) == LORA_LAYERS - 3
    torch.testing.assert_close(logits(reloaded), logits(run.model), rtol=0, atol=0)
    # on_train_end runs after the last checkpoint: it keeps every LoRA layer, so resuming from it is exact
    last = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(pair[1]), tmp_path / "out" / "checkpoint-12"
    )
    assert len(lora_layer_names(last)) == LORA_LAYERS

    report = load_report(tmp_path / "out")
    assert report["status"] == "finished" and report["action"]["layers"] == pruned
    assert [entry["step"] for entry in report["history"]] == [4, 8, 12]
    assert report["config"]["k"] == 3 and "torch" in report["versions"]
    assert (tmp_path / "out" / REPORT_HTML).is_file()  # no W&B: the local report


def test_checkpoint_gets_an_acted_adapter_while_training_goes_on_unpruned(pair, dataset, tmp_path):
    callback = SPLoRACallback(
        config(pair[0], prune_at_checkpoints=True, prune_at_end=False, score_every_n_steps=0)
    )
    run = trainer(
        pair, dataset, tmp_path / "out", [callback], max_steps=10, save_strategy="steps", save_steps=5
    )
    run.train()

    checkpoint = tmp_path / "out" / "checkpoint-5"
    chosen = load_report(checkpoint / "splora")["action"]["layers"]
    assert len(chosen) == 3 and [entry["step"] for entry in callback.history] == [5, 10]
    acted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pair[1]), checkpoint / "splora")
    expected = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pair[1]), checkpoint)
    prune_layers(expected, chosen)
    assert sorted(lora_layer_names(acted)) == sorted(lora_layer_names(expected))
    torch.testing.assert_close(logits(acted), logits(expected), rtol=0, atol=0)
    # the scores were taken before the save, so the checkpoint's callback state holds them
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"][
        "SPLoRACallback"
    ]
    assert [entry["step"] for entry in saved["attributes"]["history"]] == [5]
    assert len(lora_layer_names(run.model)) == LORA_LAYERS and callback.action_report is None
    assert load_report(tmp_path / "out")["checkpoints"] == [
        {"step": 5, "path": "checkpoint-5/splora", "layers": chosen},
        {"step": 10, "path": "checkpoint-10/splora", "layers": callback.history[-1]["selected"]},
    ]


def test_resume_from_checkpoint_continues_the_history(pair, dataset, tmp_path):
    common = {
        "max_steps": 10,
        "save_strategy": "steps",
        "save_steps": 5,
        "restore_callback_states_from_checkpoint": True,
    }
    first = SPLoRACallback(config(pair[0], score_every_n_steps=2))
    trainer(pair, dataset, tmp_path / "a", [first], **common).train()

    passed = SPLoRACallback(config(pair[0], score_every_n_steps=2))
    resumed = trainer(pair, dataset, tmp_path / "b", [passed], **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    callback = live_callback(resumed)  # rebuilt from the checkpoint's JSON state: the callback passed, handed back
    assert callback is passed
    assert [entry["step"] for entry in callback.history] == [2, 4, 6, 8, 10]
    assert callback.history[:2] == json.loads(json.dumps(first.history[:2]))
    for ours, theirs in zip(callback.history[2:], first.history[2:], strict=True):
        assert ours["selected"] == theirs["selected"]
        assert [s["ediem"] for s in ours["scores"]["layers"]] == pytest.approx(
            [s["ediem"] for s in theirs["scores"]["layers"]], rel=1e-4, abs=1e-6
        )
    assert [entry["step"] for entry in load_report(tmp_path / "b")["history"]] == [2, 4, 6, 8, 10]


class _ConsumesGlobalRng(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        torch.rand(1)


def test_monitor_only_run_is_bit_identical_to_a_run_without_the_callback(pair, dataset, tmp_path):
    def final_weights(callbacks, name):
        run = trainer(pair, dataset, tmp_path / name, callbacks, dropout=0.1, max_steps=10)
        run.train()
        return {key: value.clone() for key, value in run.model.state_dict().items()}

    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.where(torch.arange(12) < 6, -100, ids)  # loss on the "refusal" half only
    probe = SafetyProbe.from_tensors(ids, torch.ones_like(ids), labels)
    monitor = SPLoRACallback(
        config(pair[0], action="none", score_every_n_steps=1, alert_threshold=0.5, probe=probe)
    )
    plain = final_weights([], "plain")
    monitored = final_weights([monitor], "monitored")
    assert len(monitor.history) == 10
    assert all(item["probe"] is not None for item in monitor.history[-1]["scores"]["layers"])
    assert plain.keys() == monitored.keys()
    assert all(torch.equal(plain[key], monitored[key]) for key in plain)
    # the comparison can fail: a callback that draws from the global RNG changes the dropout masks
    perturbed = final_weights([_ConsumesGlobalRng()], "perturbed")
    assert not all(torch.equal(plain[key], perturbed[key]) for key in plain)


def test_layers_at_zero_init_are_reported_inactive_and_never_pruned(pair, dataset, tmp_path):
    callback = SPLoRACallback(config(pair[0]))
    run = trainer(pair, dataset, tmp_path / "out", [callback], learning_rate=0.0, max_steps=2)
    run.train()
    statuses = {item["status"] for item in callback.history[-1]["scores"]["layers"]}
    assert statuses == {"inactive"} and callback.selected == [] and callback.action_report["layers"] == []
    assert len(lora_layer_names(run.model)) == LORA_LAYERS


def test_wrong_base_model_fails_before_the_first_step(pair, dataset, tmp_path):
    other = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
    )
    other.save_pretrained(tmp_path / "other")
    run = trainer(pair, dataset, tmp_path / "out", [SPLoRACallback(config(tmp_path / "other"))])
    with pytest.raises(AlignmentMismatchError, match="base_model=.*does not match the model being trained"):
        run.train()
    assert run.state.global_step == 0


def test_only_world_zero_writes_but_every_rank_scores_and_prunes(pair, tmp_path):
    callback = SPLoRACallback(config(pair[0], score_every_n_steps=1))
    model = lora_model(pair[1])
    with torch.no_grad():  # an update on every layer, so that all are active
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_(
                    0, 0.1, generator=torch.Generator().manual_seed(len(name))
                )
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    state = TrainerState(is_world_process_zero=False, max_steps=1)
    callback.on_train_begin(args, state, None, model=model)
    state.global_step = 1
    callback.on_step_end(args, state, None, model=model)
    callback.on_train_end(args, state, None, model=model)
    assert [entry["step"] for entry in callback.history] == [1] and len(callback.action_report["layers"]) == 3
    assert not (tmp_path / "out").exists()


class _Probe:
    """Stands in for a SafetyProbe: not JSON, so it must not be serialised."""


def test_state_round_trips_through_the_trainers_restore_without_the_probe():
    probe = _Probe()
    callback = SPLoRACallback(SPLoRAConfig(base_model="base", probe=probe, k=2, select="top_k"))
    callback.history.append(
        {
            "step": 3,
            "selected": [],
            "seconds": 0.1,
            "scores": {"metric": "ediem", "null": "layers", "layers": []},
        }
    )
    saved = json.loads(json.dumps(callback.state()))
    assert "probe" not in saved["args"]["config"]
    rebuilt = type(callback)(**saved["args"])  # what Trainer._load_callback_state does
    for attribute, value in saved["attributes"].items():
        setattr(rebuilt, attribute, value)
    assert rebuilt.config == callback.config and rebuilt.config.probe is probe
    assert rebuilt.history == callback.history

    unknown = {**saved["args"]["config"], "metric": "probe", "k": 5}
    with pytest.raises(ValueError, match="cannot rebuild a metric='probe' callback"):
        SPLoRACallback(unknown)


def test_trl_sft_trainer_runs_the_callback_unchanged(pair, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(100)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    generator = torch.Generator().manual_seed(0)
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (12,), generator=generator)) for _ in range(16)
    ]
    callback = SPLoRACallback(config(pair[0], score_every_n_steps=3))
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=32,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    sft = SFTTrainer(
        model=lora_model(pair[1]),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    sft.train()
    assert [entry["step"] for entry in callback.history] == [3, 6]
    assert len(callback.action_report["layers"]) == 3
    assert len(lora_layer_names(sft.model)) == LORA_LAYERS - 3
    assert os.path.isfile(tmp_path / "sft" / REPORT_HTML)
