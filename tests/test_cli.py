"""`splora score|prune` end to end on temporary checkpoints, and their error messages."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from splora_callback import AlignmentSubspace, apply_action, score_layers
from splora_callback.cli import main


def digest(directory) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


@pytest.fixture
def saved_adapter(planted_llama, tmp_path):
    model, base_dir, aligned_dir, orthogonal = planted_llama
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter", base_dir, aligned_dir, orthogonal


def test_score_prints_table_and_json_matching_the_library(saved_adapter, tmp_path, capsys):
    model, adapter, base_dir, aligned_dir, orthogonal = saved_adapter
    code = main(["score", str(adapter), "--base", str(base_dir), "--aligned", str(aligned_dir),
                 "--top-k", "3", "--json", str(tmp_path / "scores.json")])
    output = capsys.readouterr().out
    assert code == 0
    assert output.splitlines()[0].split()[:6] == ["layer", "kind", "E-DIEM", "cosine", "rel.dist", "signed"]
    selected = {line.split()[0] for line in output.splitlines() if "SELECTED" in line}
    assert selected == orthogonal
    written = json.loads((tmp_path / "scores.json").read_text())
    live = score_layers(model, AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False))
    for item in written["layers"]:
        assert item["ediem"] == pytest.approx(live[item["name"]].ediem, abs=1e-6)
        assert item["cosine"] == pytest.approx(live[item["name"]].cosine, abs=1e-6)
    assert set(written["selected"]) == orthogonal


def test_prune_writes_a_new_adapter_and_never_touches_the_input(saved_adapter, tmp_path):
    model, adapter, base_dir, aligned_dir, orthogonal = saved_adapter
    before = digest(adapter)
    args = ["prune", str(adapter), "--base", str(base_dir), "--aligned", str(aligned_dir), "--top-k", "3",
            "--output", str(tmp_path / "pruned")]
    assert main(args) == 0
    assert digest(adapter) == before
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir), tmp_path / "pruned")
    apply_action(model, None, sorted(orthogonal), "prune")
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, model(input_ids=tokens).logits, rtol=0, atol=1e-6)

    assert main(args) == 2  # refuses the existing output
    assert main([*args, "--overwrite"]) == 0


def test_errors_are_reported_not_raised(saved_adapter, tmp_path, capsys):
    _, adapter, base_dir, aligned_dir, _ = saved_adapter
    assert main(["score", str(tmp_path / "none"), "--base", str(base_dir), "--aligned", str(aligned_dir)]) == 2
    assert "adapter_config.json not found" in capsys.readouterr().err
    assert main(["prune", str(adapter), "--base", str(base_dir), "--aligned", str(aligned_dir),
                 "--output", str(tmp_path / "x")]) == 2
    assert "No layer selected" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["prune", str(adapter), "--base", str(base_dir), "--aligned", str(aligned_dir), "--top-k", "1",
                 "--output", str(adapter), "--overwrite"]) == 2
    assert f"--output {adapter} is the adapter {adapter}" in capsys.readouterr().err


def test_console_script_is_installed(saved_adapter):
    _, adapter, base_dir, aligned_dir, _ = saved_adapter
    result = subprocess.run(
        [sys.executable, "-m", "splora_callback.cli", "score", str(adapter), "--base", str(base_dir),
         "--aligned", str(aligned_dir), "--metric", "cosine"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "model.layers.1.self_attn.o_proj" in result.stdout
