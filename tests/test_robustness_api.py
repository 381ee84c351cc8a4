"""Issue #13, the Python API: nothing lost, nothing silently wrong, every refusal in words.

QLoRA without bitsandbytes (not installable on a CPU-only CI machine): the live model's LoRA
layers are given the types PEFT uses for quantized bases (``peft.tuners.lora.bnb.Linear4bit``
and friends, same names and modules), or a base weight of the class PEFT dequantizes by name
(``Params4bit``); the detection is also checked on every class name PEFT defines for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file, save_file
from tiny import ATTENTION, add_lora, plant_updates, tiny_llama
from transformers import AutoModelForCausalLM

from splora_callback import (
    AlignmentSubspace,
    SPLoRACallback,
    SPLoRAConfig,
    UnsupportedAdapterError,
    apply_action,
    save_acted_adapter,
    score_layers,
    select_layers,
)
from splora_callback._io import UnsafeOutputError, atomic_write_text, recover_leftovers
from splora_callback.alignment import AlignmentCacheError
from splora_callback.checkpoint import SafetensorsCheckpoint
from splora_callback.dashboard import render_html
from splora_callback.layer_names import NothingLeftError, UnknownLayerError
from splora_callback.layers import QUANTIZED_LORA_MODULES, QuantizedBaseError, quantization_of, unwrap_peft
from splora_callback.report import build_report

Q_PROJ = "model.layers.0.self_attn.q_proj"


def digest(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def lora_names(model) -> list[str]:
    return [name for name, module in unwrap_peft(model).named_modules() if isinstance(module, LoraLayer)]


@pytest.fixture
def copied_pair(llama_pair, tmp_path):
    """base/ and aligned/ copies this test may rewrite, and a LoRA model loaded from aligned/."""
    base_dir, aligned_dir, bases = llama_pair
    shutil.copytree(base_dir, tmp_path / "base")
    shutil.copytree(aligned_dir, tmp_path / "aligned")
    model = add_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "aligned"))
    plant_updates(model, bases, orthogonal={Q_PROJ})
    return tmp_path / "base", tmp_path / "aligned", model


# --- data loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model_dir", "its_parent", "base_dir"])
def test_save_acted_adapter_never_writes_onto_an_input(copied_pair, where):
    base_dir, aligned_dir, model = copied_pair
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    chosen = select_layers(score_layers(model, alignment), "top_k", k=1)
    root = aligned_dir.parent
    before = digest(root)
    target = {"model_dir": aligned_dir, "its_parent": root, "base_dir": base_dir}[where]
    with pytest.raises(UnsafeOutputError, match="writing it could overwrite or delete the input"):
        save_acted_adapter(model, target, chosen, alignment=alignment, overwrite=True)
    assert digest(root) == before


def test_pruning_every_layer_is_refused_on_the_live_model_and_on_save(copied_pair, tmp_path):
    _, _, model = copied_pair
    every = lora_names(model)
    with pytest.raises(NothingLeftError, match="Pruning all 8 LoRA layers would leave nothing of the fine-tune"):
        save_acted_adapter(model, tmp_path / "out", every)
    assert not (tmp_path / "out").exists()
    with pytest.raises(NothingLeftError, match="Use the aligned model itself"):
        apply_action(model, None, every, "prune")
    assert lora_names(model) == every  # refused before anything was removed
    apply_action(model, None, every[:-1], "prune")  # all but one: fine


# --- QLoRA: never build V from dequantized weights ---------------------------------------------


def _stand_in(module: str, name: str) -> type:
    """A LoRA layer type as PEFT names it for a quantized base (e.g. peft.tuners.lora.bnb.Linear4bit)."""
    return type(name, (LoraLinear,), {"__module__": f"peft.tuners.lora.{module}"})


def test_quantized_lora_layer_types_are_detected_by_the_names_peft_uses():
    names = {"bnb": ["Linear8bitLt", "Linear4bit"], "gptq": ["GPTQLoraLinear"], "awq": ["AwqLoraLinear"],
             "aqlm": ["AqlmLoraLinear"], "eetq": ["EetqLoraLinear"], "hqq": ["HqqLoraLinear"],
             "torchao": ["TorchaoLoraLinear"], "inc": ["IncLoraLinear"]}
    assert set(names) == set(QUANTIZED_LORA_MODULES)
    model = add_lora(tiny_llama())
    layer = unwrap_peft(model).get_submodule(Q_PROJ)
    assert quantization_of(layer) is None
    for module, classes in names.items():
        for name in classes:
            layer.__class__ = _stand_in(module, name)
            assert quantization_of(layer) == f"{module} {name}"
    try:  # the real classes, where bitsandbytes is installed
        from peft.tuners.lora import bnb
    except ImportError:
        return
    for name in ("Linear8bitLt", "Linear4bit"):
        if hasattr(bnb, name):
            layer.__class__ = getattr(bnb, name)
            assert quantization_of(layer) is not None


def test_4bit_live_model_without_aligned_model_is_refused(copied_pair):
    base_dir, aligned_dir, model = copied_pair
    expected = AlignmentSubspace.from_pretrained(base_dir, aligned=aligned_dir, target_modules=ATTENTION, progress=False)
    layer = unwrap_peft(model).get_submodule(Q_PROJ)
    layer.__class__ = _stand_in("bnb", "Linear4bit")
    with pytest.raises(QuantizedBaseError, match=r"q_proj: the base layer is quantized \(bnb Linear4bit\).*aligned_model="):
        AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    callback = SPLoRACallback(SPLoRAConfig(base_model=str(base_dir), k=2))
    from transformers import TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(aligned_dir.parent / "run"), report_to=[], use_cpu=True)
    with pytest.raises(QuantizedBaseError, match="SPLoRAConfig\\(aligned_model=...\\)"):
        callback.on_train_begin(args, TrainerState(), None, model=model)
    # the fix the message gives: V streamed from the full-precision checkpoints
    fixed = AlignmentSubspace.from_pretrained(base_dir, model=model, aligned=aligned_dir, progress=False)
    for name in expected.names:
        assert torch.equal(fixed.directions[name], expected.directions[name])


def test_bnb_weight_class_and_quantization_config_are_refused(copied_pair):
    base_dir, _, model = copied_pair

    class Params4bit(torch.nn.Parameter):  # the class name PEFT's dequantize_module_weight looks for
        pass

    base = unwrap_peft(model).get_submodule(Q_PROJ).get_base_layer()
    original = base.weight
    base.weight = Params4bit(original.data, requires_grad=False)
    with pytest.raises(QuantizedBaseError, match=r"bitsandbytes Params4bit"):
        AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    base.weight = original
    unwrap_peft(model).config.quantization_config = {"load_in_4bit": True}
    with pytest.raises(QuantizedBaseError, match="quantization_config"):
        AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)


# --- the alignment cache: reused only while its contents match --------------------------------


def _rewrite(directory: Path, name: str, change, keep_mtime: bool = False) -> None:
    file = directory / "model.safetensors"
    stat = file.stat()
    tensors = load_file(file)
    tensors[f"{name}.weight"] = change(tensors[f"{name}.weight"].clone())
    save_file(tensors, file, metadata={"format": "pt"})
    if keep_mtime:
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("change", ["new_file_same_path", "same_size_and_mtime", "other_aligned_live_model"])
def test_stale_cache_is_rebuilt(copied_pair, tmp_path, caplog, change):
    base_dir, aligned_dir, model = copied_pair
    cache = tmp_path / "alignment.safetensors"
    first = AlignmentSubspace.from_pretrained(base_dir, model=model, cache_file=cache, progress=False)
    if change == "new_file_same_path":  # rows past the hashed ones: the file's mtime tells
        _rewrite(base_dir, Q_PROJ, lambda w: w.index_add_(0, torch.tensor([40]), torch.ones(1, w.shape[1])))
    elif change == "same_size_and_mtime":  # a copy that kept the old time: the hashed rows tell
        _rewrite(base_dir, Q_PROJ, lambda w: w.index_add_(0, torch.tensor([0]), torch.ones(1, w.shape[1])), True)
    else:
        with torch.no_grad():
            unwrap_peft(model).get_submodule(Q_PROJ).get_base_layer().weight[0] += 1.0
    with caplog.at_level(logging.WARNING, "splora_callback"):
        second = AlignmentSubspace.from_pretrained(base_dir, model=model, cache_file=cache, progress=False)
    assert "was built from other inputs" in caplog.text and "rebuilding it" in caplog.text
    fresh = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    assert torch.equal(second.directions[Q_PROJ], fresh.directions[Q_PROJ])
    assert not torch.equal(second.directions[Q_PROJ], first.directions[Q_PROJ])
    caplog.clear()
    again = AlignmentSubspace.from_pretrained(base_dir, model=model, cache_file=cache, progress=False)
    assert "rebuilding" not in caplog.text and torch.equal(again.directions[Q_PROJ], fresh.directions[Q_PROJ])


def test_corrupt_cache_is_rebuilt_and_a_folder_or_foreign_file_refused_before_the_build(copied_pair, tmp_path,
                                                                                          caplog, monkeypatch):
    base_dir, _, model = copied_pair
    cache = tmp_path / "alignment.safetensors"
    AlignmentSubspace.from_pretrained(base_dir, model=model, cache_file=cache, progress=False)
    cache.write_bytes(cache.read_bytes()[:200])  # cut short by a crash or a full disk
    with caplog.at_level(logging.WARNING, "splora_callback"):
        rebuilt = AlignmentSubspace.from_pretrained(base_dir, model=model, cache_file=cache, progress=False)
    assert "is unreadable" in caplog.text and set(AlignmentSubspace.load(cache).names) == set(rebuilt.names)

    def no_build(*args, **kwargs):
        raise AssertionError("the alignment was built before the cache path was checked")

    monkeypatch.setattr(SafetensorsCheckpoint, "module_weight", no_build)
    (tmp_path / "folder").mkdir()
    with pytest.raises(AlignmentCacheError, match="is a directory; give a file path"):
        AlignmentSubspace.from_pretrained(base_dir, model=model, cache_file=tmp_path / "folder", progress=False)
    foreign = tmp_path / "weights.safetensors"
    shutil.copy(base_dir / "model.safetensors", foreign)
    with pytest.raises(AlignmentCacheError, match="not an alignment cache; it would be overwritten"):
        AlignmentSubspace.from_pretrained(base_dir, model=model, cache_file=foreign, progress=False)
    assert foreign.read_bytes() == (base_dir / "model.safetensors").read_bytes()
    with pytest.raises(UnsafeOutputError, match="lies inside the base model"):
        AlignmentSubspace.from_pretrained(base_dir, model=model, cache_file=base_dir / "cache.safetensors",
                                          progress=False)


# --- plausibility, unscored layers, config ---------------------------------------------------


def test_unrelated_base_with_the_right_shapes_is_warned_about(llama_pair, tmp_path, caplog):
    base_dir, aligned_dir, _ = llama_pair
    tiny_llama(seed=7).save_pretrained(tmp_path / "unrelated")
    with caplog.at_level(logging.WARNING, "splora_callback"):
        AlignmentSubspace.from_pretrained(base_dir, aligned=aligned_dir, target_modules=ATTENTION, progress=False)
    assert "look unrelated" not in caplog.text  # the real pair: ||V|| is ~5 % of the weight
    with caplog.at_level(logging.WARNING, "splora_callback"):
        AlignmentSubspace.from_pretrained(tmp_path / "unrelated", aligned=aligned_dir, target_modules=ATTENTION,
                                          progress=False)
    assert "look unrelated in 8 of 8 modules" in caplog.text and "Is the base the model" in caplog.text


def test_lora_on_embeddings_is_refused_not_skipped(llama_pair):
    base_dir, aligned_dir, _ = llama_pair
    model = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir), targets=["q_proj", "embed_tokens"])
    with pytest.raises(UnsupportedAdapterError, match=r"model.embed_tokens: LoRA on Embedding .*target_modules"):
        score_layers(model, None, "probe", probe=object())
    with pytest.raises(UnsupportedAdapterError, match="embed_tokens"):
        AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)


def test_selection_option_without_select_is_inferred_or_refused():
    assert SPLoRAConfig(base_model="b", k=10).select == "top_k"
    assert SPLoRAConfig(base_model="b", threshold=1.5).select == "threshold"
    assert SPLoRAConfig(base_model="b").rule.fraction == 0.25
    with pytest.raises(ValueError, match=r"k=3 and threshold=1.0 are both set; pass select="):
        SPLoRAConfig(base_model="b", k=3, threshold=1.0)
    with pytest.raises(ValueError, match=r"SPLoRAConfig.k=10 is set but select='fraction' ignores it"):
        SPLoRAConfig(base_model="b", select="fraction", k=10)


# --- API misuse: say what is wrong ---------------------------------------------------------------


MISUSE = {
    "unknown_layer": (UnknownLayerError, r"'model.layers.0.self_attn.q_prj' is not a LoRA layer.*did you mean",
                      lambda m, a, s, b: apply_action(m, a, ["model.layers.0.self_attn.q_prj"], "prune")),
    "one_string": (TypeError, r"is one string; pass a list of layer names: \['model",
                   lambda m, a, s, b: apply_action(m, a, Q_PROJ, "none")),
    "k_not_integer": (ValueError, r"k >= 0 \(an integer\), got k=2.5", lambda m, a, s, b: select_layers(s, "top_k", k=2.5)),
    "adapter_name_scores": (ValueError, r"adapter_name='lora' is not an adapter of this model; its adapters are \['default'\]",
                            lambda m, a, s, b: score_layers(m, a, adapter_name="lora")),
    "adapter_name_alignment": (ValueError, r"adapter_name='lora' is not an adapter of this model",
                               lambda m, a, s, b: AlignmentSubspace.from_pretrained(b, model=m, adapter_name="lora",
                                                                                    progress=False)),
    "adapter_name_action": (ValueError, r"adapter_name='lora' is not an adapter of this model",
                            lambda m, a, s, b: apply_action(m, a, [Q_PROJ], "prune", adapter_name="lora")),
    "callback_path": (TypeError, r"SPLoRACallback takes an SPLoRAConfig, got str 'path'",
                      lambda m, a, s, b: SPLoRACallback("path")),
}


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_api_misuse_is_named(copied_pair, case):
    base_dir, _, model = copied_pair
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    scores = score_layers(model, alignment)
    error, match, call = MISUSE[case]
    with pytest.raises(error, match=match):
        call(model, alignment, scores, base_dir)
    assert len(lora_names(model)) == 8  # nothing was pruned on the way


# --- report, leftovers ---------------------------------------------------------------------------


def test_html_report_escapes_every_value_from_the_json():
    attack = "<script>alert(1)</script>"
    layers = [{"name": f"model.layers.0.self_attn.{attack}", "kind": attack, "shape": [4, 4], "rank": 2,
               "status": "active", "update_norm": 1.0, "relative_distance": 0.5, "cosine": 0.1, "ediem": 1.0,
               "ediem_scaled": True, "signed_alignment": 0.0, "probe": None}]
    history = [{"step": attack, "seconds": 0.1, "selected": [], "scores": {"metric": "ediem", "null": "layers",
                                                                            "layers": layers}}]
    report = build_report({"metric": attack, "select": attack}, history, selected=[], action=None,
                          status=attack, step=attack)
    page = render_html(json.loads(json.dumps(report)))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, caplog):
    host = socket.gethostname()
    dead = tmp_path / f".scores.json.splora-999999999@{host}.abcdefgh.tmp"
    live = tmp_path / f".scores.json.splora-{os.getpid()}@{host}.ijklmnop.tmp"
    legacy = tmp_path / ".scores.json.qrstuvwx.tmp"  # 0.1.0's name, no writer recorded, recent
    for path in (dead, live, legacy):
        path.write_text("partial")
    with caplog.at_level(logging.WARNING, "splora_callback"):
        atomic_write_text(tmp_path / "scores.json", "{}")
    assert not dead.exists() and live.exists() and legacy.exists()
    assert f"removed {dead}: an unfinished copy left by a killed run" in caplog.text
    old = time.time() - 2 * 86400
    os.utime(legacy, (old, old))
    assert recover_leftovers(tmp_path, "scores.json") == [f"removed {legacy}: an unfinished copy left by a killed run"]


def test_real_nf4_model_is_refused_and_aligned_checkpoint_is_exact(llama_pair):
    """With bitsandbytes installed (CPU NF4 works from 0.46 on): the real PEFT Linear4bit layers."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    base_dir, aligned_dir, _ = llama_pair
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(aligned_dir, quantization_config=nf4, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=ATTENTION))
    with pytest.raises(QuantizedBaseError, match=r"q_proj: the base layer is quantized \(bnb Linear4bit\)"):
        AlignmentSubspace.from_pretrained(base_dir, model=model, progress=False)
    expected = AlignmentSubspace.from_pretrained(base_dir, aligned=aligned_dir, target_modules=ATTENTION, progress=False)
    fixed = AlignmentSubspace.from_pretrained(base_dir, model=model, aligned=aligned_dir, progress=False)
    assert all(torch.equal(fixed.directions[name], expected.directions[name]) for name in expected.names)
