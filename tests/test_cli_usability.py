"""`splora` from a user's seat: help that explains BASE and ALIGNED, a fast --help, --aligned from the
adapter config, --sort, --json - with a format version and provenance, and a model card on prune."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM

from splora_callback.cli import main
from splora_callback.provenance import SCORES_FORMAT


@pytest.fixture
def saved(planted_llama, tmp_path):
    model, base_dir, aligned_dir, orthogonal = planted_llama
    model.save_pretrained(tmp_path / "adapter")  # PEFT records base_model_name_or_path = aligned_dir
    return tmp_path / "adapter", base_dir, aligned_dir, orthogonal


def test_help_says_what_base_and_aligned_are_with_examples(capsys):
    for argv in (["--help"], ["score", "--help"], ["prune", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "ALIGNED  the aligned (chat / instruct) model the LoRA adapter was trained on" in text
        assert "BASE     the unaligned model ALIGNED was aligned from" in text
        assert "examples:" in text and "splora score out/adapter --base meta-llama/Llama-2-7b-hf" in text
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out
    assert "--sort {module,name,suspicion,ediem,cosine,signed,distance}" in text and "'-' writes them to stdout" in text


def test_help_loads_neither_torch_nor_transformers():
    code = ("import sys; from splora_callback.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"  # what keeps `splora --help` under a second (benchmarks/cli_startup.py)


def test_aligned_defaults_to_the_adapter_configs_base_model(saved, capsys):
    adapter, base_dir, aligned_dir, _ = saved
    assert main(["score", str(adapter), "--base", str(base_dir), "--json", "-"]) == 0
    implicit = json.loads(capsys.readouterr().out)
    assert main(["score", str(adapter), "--base", str(base_dir), "--aligned", str(aligned_dir), "--json", "-"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert implicit["layers"] == explicit["layers"]
    assert implicit["provenance"]["aligned"]["given"] == str(aligned_dir)
    assert implicit["provenance"]["aligned_source"] == "adapter_config.json base_model_name_or_path"
    assert explicit["provenance"]["aligned_source"] == "--aligned"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["score", str(adapter), "--base", str(base_dir)]) == 2
    assert "records no base_model_name_or_path; pass --aligned" in capsys.readouterr().err


def test_json_to_stdout_has_a_format_version_and_provenance(saved, capsys):
    adapter, base_dir, aligned_dir, orthogonal = saved
    assert main(["score", str(adapter), "--base", str(base_dir), "--top-k", "3", "--json", "-"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # stdout is the JSON alone
    assert any(line.split()[:3] == ["layer", "kind", "E-DIEM"] for line in captured.err.splitlines())  # table
    assert document["format"] == SCORES_FORMAT and set(document["selected"]) == orthogonal
    provenance = document["provenance"]
    assert provenance["command"].startswith(f"splora score {adapter} --base {base_dir}")
    files = {entry["name"]: entry for entry in provenance["adapter"]["files"]}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert files[name]["sha256"] == hashlib.sha256((adapter / name).read_bytes()).hexdigest()
    for role, folder in (("base", base_dir), ("aligned", aligned_dir)):
        entries = {entry["name"]: entry for entry in provenance[role]["files"]}
        assert provenance[role]["path"] == str(folder.resolve()) and "config.json" in entries
        shard = entries["model.safetensors"]
        assert shard["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert shard["bytes"] == (folder / "model.safetensors").stat().st_size


def test_sort_orders_the_table_most_suspect_first(saved, capsys):
    adapter, base_dir, _, orthogonal = saved
    assert main(["score", str(adapter), "--base", str(base_dir), "--sort", "ediem", "--json", "-"]) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.err.splitlines() if line.startswith("model.")]
    ediem = {item["name"]: item["ediem"] for item in json.loads(captured.out)["layers"]}
    assert [row[0] for row in rows] == sorted(ediem, key=lambda name: -ediem[name])
    assert {row[0] for row in rows[:3]} == orthogonal  # the planted orthogonal updates lead
    assert main(["score", str(adapter), "--base", str(base_dir), "--sort", "cosine"]) == 0
    cosines = [float(line.split()[3]) for line in capsys.readouterr().out.splitlines() if line.startswith("model.")]
    assert cosines == sorted(cosines)


def test_prune_writes_a_model_card_next_to_the_pruned_adapter(saved, capsys):
    adapter, base_dir, aligned_dir, orthogonal = saved
    output = adapter.parent / "pruned"
    assert main(["prune", str(adapter), "--base", str(base_dir), "--top-k", "3", "--output", str(output)]) == 0
    assert "(model card: README.md)" in capsys.readouterr().out
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == str(aligned_dir) and "splora" in card.data.tags
    assert "3 of 8 LoRA layers removed" in card.text and all(f"`{name}`" in card.text for name in orthogonal)
    assert f"`{base_dir}`" in card.text and "`--top-k 3`" in card.text and "No probe ran here" in card.text
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir), output)
    assert sorted(reloaded.peft_config["default"].exclude_modules) == sorted(orthogonal)
