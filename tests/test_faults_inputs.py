"""Issue #25, items 11-13: bad input files, each refused in one sentence before any work.

11. Two shards with the same tensor names and no index: refused, naming both files.
12. An adapter folder with a second adapter in a sub-folder: the pruned copy carries it unchanged
    (and says so); an invalid regex in ``exclude_modules``: refused up front, naming the field and
    the regex error; factors x1e30: the non-finite scores are named (layer.field=value) before any
    selection, table or JSON.
13. Unclear or raw errors: a killed checkpoint copy's ``.splora.*.tmp`` never looks like an adapter
    to the Trainer's resume and ``remove_stale_temporaries`` removes it; a symlink loop as
    ``--output`` / ``--json`` / ``--cache``; an invalid regex in ``rank_pattern``; crafted report
    values; Latin-1 JSONL; an aligned folder without tokenizer; ``lora_alpha=0`` (the scaling is
    zero, not lora_B); ``--output`` a symlink with ``--overwrite`` (its target replaced, said so);
    VeRA / LoHa adapters; a shard index naming ``/etc/passwd`` or ``../x``.

Every CLI case runs the entry point in a forked process (``cli_process``) and checks the exit
status, the one ``splora <command>: error: ...`` line (no traceback) naming the file or field, that
nothing was written, and that every input is byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import test_robustness_cli as cli_cases
from cli_process import run
from peft import LoHaConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_robustness_cli import digest, error_line, prune_args, splora_many
from tiny import add_lora, lora_trainer
from transformers import AutoModelForCausalLM

from splora_callback._io import remove_stale_temporaries
from splora_callback.adapter_files import InvalidAdapterError, read_adapter_config
from splora_callback.checkpoint import CheckpointError, SafetensorsCheckpoint

pristine, work = cli_cases.pristine, cli_cases.work  # base/, aligned/, adapter/: a fresh copy per test
NOT_STARTED = "SPLoRA alignment subspace"  # the progress bar of the first real work (reading weights)


def score_args(work: Path, *extra, adapter: str = "adapter", base: str = "base") -> list:
    return ["score", work / adapter, "--base", work / base, "--aligned", work / "aligned", *extra]


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))


def refused(result: dict, command: str) -> str:
    """The error line of a refused run (exit 2, no traceback)."""
    assert result["escaped"] is None, result["escaped"]
    assert result["code"] == 2, result["stderr"][-2000:]
    return error_line(result["stderr"], command)


# --- 11 ----------------------------------------------------------------------------------------------


def test_11_duplicate_shards_without_index_refused_naming_both(work):
    shutil.copy(work / "aligned" / "model.safetensors", work / "base" / "zz-stray.safetensors")
    before = digest(work)
    results = splora_many(score_args(work), prune_args(work, work / "pruned", "--top-k", "1"),
                          score_args(work, "--json", work / "scores.json"))
    for result, command in zip(results, ("score", "prune", "score"), strict=True):
        line = refused(result, command)
        assert f"{work / 'base' / 'model.safetensors'} and {work / 'base' / 'zz-stray.safetensors'} both hold" in line
        assert "Move the stray file out of the folder" in line
    assert digest(work) == before and not (work / "pruned").exists() and not (work / "scores.json").exists()
    with pytest.raises(CheckpointError, match="zz-stray.safetensors both hold"):
        SafetensorsCheckpoint.open(work / "base")
    # with an index the folder says which shard is the model's: the stray file is not read
    keys = load_file(work / "base" / "model.safetensors")
    (work / "base" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, "model.safetensors")}))
    assert set(SafetensorsCheckpoint.open(work / "base").weight_map.values()) == {"model.safetensors"}


# --- 12 ----------------------------------------------------------------------------------------------


def test_12_second_adapter_in_subfolder_is_carried_unchanged_into_the_pruned_copy(work, llama_pair):
    model = add_lora(AutoModelForCausalLM.from_pretrained(llama_pair[1]), r=2, alpha=4, targets=["q_proj"])
    model.save_pretrained(work / "second")
    shutil.copytree(work / "second", work / "adapter" / "other")  # PEFT's layout for adapter "other"
    shutil.copytree(work / "second", work / "adapter" / "splora")  # a checkpoint's pruned copy: not another adapter
    before = digest(work / "adapter")
    (result,) = splora_many(prune_args(work, work / "pruned", "--top-k", "1"))
    assert result["code"] == 0, result["stderr"][-2000:]
    assert "Carried unchanged (other adapters of" in result["stdout"] and "other/" in result["stdout"]
    assert digest(work / "pruned" / "other") == digest(work / "adapter" / "other")
    assert not (work / "pruned" / "splora").exists() and "splora/" not in result["stdout"]
    assert digest(work / "adapter") == before
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_pair[1]), work / "pruned")
    loaded.load_adapter(str(work / "pruned" / "other"), adapter_name="other")
    assert set(loaded.peft_config) == {"default", "other"}
    assert len(json.loads((work / "pruned" / "adapter_config.json").read_text())["exclude_modules"]) == 1


def test_12_invalid_exclude_modules_regex_refused_before_any_work(work):
    edit_config(work / "adapter", exclude_modules="model.(layers")
    before = digest(work)
    results = splora_many(prune_args(work, work / "pruned", "--top-k", "1"), score_args(work))
    for result, command in zip(results, ("prune", "score"), strict=True):
        line = refused(result, command)
        assert f"{work / 'adapter' / 'adapter_config.json'}: adapter config exclude_modules 'model.(layers' is not " \
               "a valid regular expression (missing ), unterminated subpattern" in line
        assert "PEFT could not load" in line and NOT_STARTED not in result["stderr"]
    assert digest(work) == before and not (work / "pruned").exists()


def test_12_factors_x1e30_refused_naming_the_non_finite_scores_before_selecting(work):
    weights = work / "adapter" / "adapter_model.safetensors"
    save_file({key: value * 1e30 if "lora_B" in key else value for key, value in load_file(weights).items()}, weights)
    before = digest(work)
    results = splora_many(prune_args(work, work / "pruned", "--top-k", "1"),
                          score_args(work, "--json", work / "scores.json"), score_args(work, "--json", "-"))
    for result, command in zip(results, ("prune", "score", "score"), strict=True):
        line = refused(result, command)
        assert "Scores are not finite in 8 layer(s), e.g. model.layers.0.self_attn." in line
        assert ".update_norm=nan" in line and "largest LoRA factor entry" in line
        assert "nothing was selected or written" in line
        assert "LoRA layers:" not in result["stdout"] + result["stderr"]  # no table, no JSON
    assert digest(work) == before and not (work / "pruned").exists() and not (work / "scores.json").exists()


# --- 13 ----------------------------------------------------------------------------------------------


def _gone_pid() -> int:
    """The pid of a process that has exited (a killed writer)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_13_killed_checkpoint_copy_never_breaks_resume_and_stale_temporaries_are_removed(work, llama_pair, dataset):
    output = work / "run"
    checkpoint = output / "checkpoint-4"
    model = add_lora(AutoModelForCausalLM.from_pretrained(llama_pair[1]))
    model.save_pretrained(checkpoint)
    saved = digest(checkpoint)
    kill_while_writing = (  # SIGKILL (as a SIGTERM without handler) while checkpoint-4/splora is written
        "import os, signal, sys, splora_callback.pruning as pruning\n"
        "from splora_callback.adapter_files import lora_updates_from_adapter\n"
        "def save_file(tensors, path, metadata=None):\n"
        "    open(path, 'wb').write(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "pruning.save_file = save_file\n"
        "_, config, tensors = lora_updates_from_adapter(sys.argv[1])\n"
        "pruning.write_adapter(sys.argv[2], tensors, config)\n"
    )
    assert run(kill_while_writing, [work / "adapter", checkpoint / "splora"]).returncode == -9
    (left,) = checkpoint.glob(".splora.splora-*.tmp")
    trainer = lora_trainer(llama_pair[1], dataset, output, model=model)
    trainer._load_from_checkpoint(str(checkpoint))  # the Trainer's resume: the leftover is no adapter folder
    # an older version's leftover held the weights directly: the resume loaded it as an adapter and failed
    older = checkpoint / f".splora.splora-{_gone_pid()}@{socket.gethostname()}.a1b2c3d4.tmp"
    shutil.copytree(work / "adapter", older)
    with pytest.raises(KeyError, match="module name can"):
        trainer._load_from_checkpoint(str(checkpoint))
    done = remove_stale_temporaries(output)
    assert sorted(done) == sorted(f"removed {path}: an unfinished copy left by a killed run" for path in (left, older))
    assert digest(checkpoint) == saved and not list(checkpoint.glob(".*"))
    trainer._load_from_checkpoint(str(checkpoint))
    alive = checkpoint / f".splora.splora-{os.getpid()}@{socket.gethostname()}.e5f6a7b8.tmp"
    alive.mkdir()  # a live writer's temporary is kept
    assert remove_stale_temporaries(output) == [] and alive.is_dir()
    assert remove_stale_temporaries(work / "missing") == []


def test_13_symlink_loop_as_output_json_or_cache_refused(work):
    (work / "loop").symlink_to(work / "loop")
    before = digest(work)
    results = splora_many(prune_args(work, work / "loop", "--top-k", "1", "--overwrite"),
                          score_args(work, "--json", work / "loop"), score_args(work, "--cache", work / "loop"),
                          [*prune_args(work, work / "pruned", "--top-k", "1"), "--cache", work / "loop"])
    for result, (command, flag) in zip(results, [("prune", "--output"), ("score", "--json"), ("score", "--cache"),
                                                 ("prune", "the alignment cache")], strict=True):
        line = refused(result, command)
        assert f"{flag} {work / 'loop'} is a symbolic link loop" in line and f"rm {work / 'loop'}" in line
        assert NOT_STARTED not in result["stderr"]
    assert digest(work) == before and (work / "loop").is_symlink() and not (work / "pruned").exists()


def test_13_invalid_rank_pattern_regex_refused(work):
    edit_config(work / "adapter", rank_pattern={"q_proj(": 2})
    before = digest(work)
    (result,) = splora_many(prune_args(work, work / "pruned", "--top-k", "1"))
    line = refused(result, "prune")
    assert "adapter_config.json: adapter config rank_pattern 'q_proj(' is not a valid regular expression (missing )" in line
    assert digest(work) == before and not (work / "pruned").exists()
    with pytest.raises(InvalidAdapterError, match="rank_pattern 'q_proj\\('"):
        read_adapter_config(work / "adapter")


def test_13_crafted_report_values_named(tmp_path):
    from test_report import report

    def crafted(name: str, change) -> Path:
        data = report()
        change(data)
        (tmp_path / name).mkdir()
        (tmp_path / name / "splora_report.json").write_text(json.dumps(data))
        return tmp_path / name

    folders = {
        "non_float": crafted("non_float", lambda r: r["history"][1]["scores"]["layers"][0].update(ediem="high")),
        "list": crafted("list", lambda r: r["history"][0]["scores"]["layers"][0].update(cosine=[1])),
        "no_metric": crafted("no_metric", lambda r: r["history"][1]["scores"].pop("metric")),  # was "error: metric"
        "empty_name": crafted("empty_name", lambda r: r["history"][1]["scores"]["layers"][2].update(name="")),
        "no_name": crafted("no_name", lambda r: r["history"][1]["scores"]["layers"][0].pop("name")),
        "action": crafted("action", lambda r: r["action"].pop("layers")),  # was "error: layers"
    }
    expected = {
        "non_float": "history[1].scores.layers[0] field 'ediem' must be a number or null, found str \"high\"",
        "list": "history[0].scores.layers[0] field 'cosine' must be a number or null, found list [1]",
        "no_metric": "history[1].scores.metric must be a string, found null",
        "empty_name": "history[1].scores.layers[2] field 'name' must be a non-empty string",
        "no_name": "history[1].scores.layers[0] lacks field 'name'",
        "action": "action.layers must be a list of layer names, found null",
    }
    before = {name: digest(folder) for name, folder in folders.items()}
    results = splora_many(*[["report", folder] for folder in folders.values()])
    for (name, folder), result in zip(folders.items(), results, strict=True):
        line = refused(result, "report")
        assert f"{folder / 'splora_report.json'}: {expected[name]}" in line, line
        assert "the report is damaged" in line
        assert digest(folder) == before[name]  # no page written, the report untouched


def test_13_latin1_jsonl_prompt_file_named_with_its_line(work):
    prompts = work / "probe.jsonl"
    prompts.write_bytes('{"prompt": "w1 w2"}\n{"prompt": "caf\xe9 w3"}\n'.encode("latin-1"))
    before = digest(work)
    (result,) = splora_many(["prune", work / "adapter", "--aligned", work / "aligned", "--probe-prompts", prompts,
                             "--top-k", "1", "--output", work / "pruned"])
    line = refused(result, "prune")
    assert f"{prompts}:2: not UTF-8 text (byte 0xe9" in line and "iconv -f latin1 -t utf-8" in line
    assert digest(work) == before and not (work / "pruned").exists()


def test_13_aligned_folder_without_tokenizer_named(work):
    prompts = work / "probe.jsonl"
    prompts.write_text('{"prompt": "w1 w2"}\n')
    before = digest(work)
    (result,) = splora_many(["prune", work / "adapter", "--aligned", work / "aligned", "--probe-prompts", prompts,
                             "--top-k", "1", "--output", work / "pruned"])
    line = refused(result, "prune")
    assert f"ALIGNED {work / 'aligned'} (from --aligned) has no tokenizer" in line
    assert "save_pretrained" in line and "Couldn't instantiate" not in result["stderr"]
    assert digest(work) == before and not (work / "pruned").exists()


def test_13_lora_alpha_zero_says_the_scaling_is_zero_not_lora_b(work):
    edit_config(work / "adapter", lora_alpha=0)
    before = digest(work)
    results = splora_many(prune_args(work, work / "pruned", "--top-k", "1"), score_args(work))
    for result, command in zip(results, ("prune", "score"), strict=True):
        line = refused(result, command)
        assert f"{work / 'adapter' / 'adapter_config.json'}: lora_alpha=0 makes the LoRA scaling alpha / r zero" in line
        assert "lora_B is zero" not in line and NOT_STARTED not in result["stderr"]
    assert digest(work) == before and not (work / "pruned").exists()


def test_13_output_symlink_with_overwrite_replaces_its_target_and_says_so(work, llama_pair):
    target, link = work / "runs" / "pruned", work / "latest"
    (first,) = splora_many(prune_args(work, target, "--top-k", "1"))
    assert first["code"] == 0, first["stderr"][-2000:]
    old = digest(target)
    link.symlink_to(target, target_is_directory=True)
    (result,) = splora_many(prune_args(work, link, "--top-k", "2", "--overwrite"))
    assert result["code"] == 0 and result["escaped"] is None, result["stderr"][-2000:]
    assert f"{link} is a symbolic link: its target {target} was written, the link kept." in result["stdout"]
    assert "unchanged" not in result["stdout"] + result["stderr"]
    assert link.is_symlink() and link.resolve() == target and digest(target) != old
    assert len(json.loads((target / "adapter_config.json").read_text())["exclude_modules"]) == 2
    assert not list((work / "runs").glob(".*")) and not list(work.glob(".latest*"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_pair[1]), link)


@pytest.mark.parametrize("kind", ["VERA", "LOHA"])
def test_13_vera_and_loha_adapters_named(work, llama_pair, kind):
    config = {"VERA": VeraConfig(r=4, target_modules=["q_proj"]), "LOHA": LoHaConfig(r=4, target_modules=["q_proj"])}
    get_peft_model(AutoModelForCausalLM.from_pretrained(llama_pair[1]), config[kind]).save_pretrained(work / "other")
    before = digest(work)
    results = splora_many(score_args(work, adapter="other"),
                          ["prune", work / "other", "--base", work / "base", "--aligned", work / "aligned",
                           "--top-k", "1", "--output", work / "pruned"])
    for result, command in zip(results, ("score", "prune"), strict=True):
        line = refused(result, command)
        assert f"{work / 'other' / 'adapter_config.json'}: peft_type {kind!r} is not LORA" in line
        assert "train the adapter with peft.LoraConfig" in line
    assert digest(work) == before and not (work / "pruned").exists()


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors"])
def test_13_shard_index_naming_a_file_outside_the_model_folder_refused(work, shard):
    keys = list(load_file(work / "base" / "model.safetensors"))
    (work / "outside.safetensors").write_bytes((work / "base" / "model.safetensors").read_bytes())
    index = work / "base" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {key: shard if n == 0 else "model.safetensors"
                                                                for n, key in enumerate(keys)}}))
    before = digest(work)
    (result,) = splora_many(score_args(work, "--json", work / "scores.json"))
    line = refused(result, "score")
    assert f"{index}: weight_map[{keys[0]!r}] names the shard {shard!r}, which is not a file inside" in line
    assert NOT_STARTED not in result["stderr"]
    assert digest(work) == before and not (work / "scores.json").exists()
    with pytest.raises(CheckpointError, match="may only name files of its own folder"):
        SafetensorsCheckpoint.open(work / "base")
