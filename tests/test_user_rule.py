"""Issue #26 item 7: a selection rule written outside the library, end to end.

"Prune the layers whose probe score is above the median" is one class in a file of the user's
(written here to ``my_rules.py``) plus one ``register_rule`` call; the same rule then drives
``SPLoRACallback`` in a real ``Trainer`` run, appears in ``config.plan()``, the JSON report, the
HTML dashboard and the model card, and selects in the CLI (``--rule my_rules:AboveMedianProbe``).
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
import torch
from cli_process import CLI, run
from peft.tuners.lora import LoraLayer
from test_probe import make_tokenizer, random_probe
from tiny import add_lora, lora_trainer, tiny_llama

from splora_callback import SPLoRACallback, SPLoRAConfig
from splora_callback.dashboard import write_html_report
from splora_callback.report import REPORT_HTML, load_report
from splora_callback.rules import RULES, SelectionContext, register_rule
from splora_callback.scoring import LayerScores

MY_RULES = textwrap.dedent('''
    import statistics
    from dataclasses import dataclass
    from typing import ClassVar

    from splora_callback.rules import Rule
    from splora_callback.selection import rank_layers


    @dataclass(frozen=True)
    class AboveMedianProbe(Rule):
        name: ClassVar[str] = "above_median_probe"
        needs_probe: ClassVar[bool] = True

        def select(self, scores, context):
            suspicion = scores.suspicion()
            middle = statistics.median(suspicion.values())
            return [name for name in rank_layers(scores) if suspicion[name] > middle]

        def describe(self):
            return "the layers whose probe score is above the median"
''')


@pytest.fixture
def my_rules(tmp_path, monkeypatch):
    """``my_rules.py`` in a folder of the user's, imported, its rule registered (and unregistered after)."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "my_rules.py").write_text(MY_RULES)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("my_rules")
    register_rule(module.AboveMedianProbe.name, module.AboveMedianProbe)
    yield module, folder
    RULES.pop(module.AboveMedianProbe.name, None)
    sys.modules.pop("my_rules", None)


def test_a_user_rule_drives_the_callback_the_plan_the_report_and_the_dashboard(pair, dataset, tmp_path, my_rules):
    config = SPLoRAConfig(base_model=str(pair[0]), metric="probe", probe=random_probe(seed=9),
                          select="above_median_probe", score_every_n_steps=6)
    assert config.rule == my_rules[0].AboveMedianProbe() and config.granularity == "layer"
    assert "the layers whose probe score is above the median" in config.plan()[0]
    callback = SPLoRACallback(config)
    trainer = lora_trainer(pair[1], dataset, tmp_path / "out", [callback])
    trainer.train()

    final = LayerScores.from_dict(callback.history[-1]["scores"])
    suspicion = final.suspicion()
    middle = sorted(suspicion.values())[len(suspicion) // 2 - 1: len(suspicion) // 2 + 1]
    expected = {name for name, value in suspicion.items() if value > sum(middle) / 2}  # the median of 8
    assert set(callback.selected) == expected and len(expected) == 4
    assert sum(isinstance(module, LoraLayer) for module in trainer.model.modules()) == 8 - len(expected)
    report = load_report(tmp_path / "out")
    assert report["config"]["select"] == "above_median_probe" and set(report["action"]["layers"]) == expected
    assert "above_median_probe" in (tmp_path / "out" / REPORT_HTML).read_text()
    assert "above_median_probe" in (tmp_path / "out" / "README.md").read_text()  # the card's rule
    assert write_html_report(tmp_path / "out").is_file()


def test_a_function_is_a_rule_too(pair):
    def first_two(scores: LayerScores, context: SelectionContext) -> list[str]:
        return sorted(score.name for score in scores)[:2]

    config = SPLoRAConfig(base_model=str(pair[0]), select=first_two, action="prune")
    assert config.select == "first_two" and "first_two()" in config.plan()[0]


def test_the_cli_selects_by_a_user_rule_from_module_attr(tmp_path, my_rules):
    _, folder = my_rules
    aligned_dir, adapter_dir, output = tmp_path / "aligned", tmp_path / "adapter", tmp_path / "pruned"
    tiny_llama(seed=5).save_pretrained(aligned_dir)
    make_tokenizer().save_pretrained(aligned_dir)
    model = add_lora(tiny_llama(seed=5), r=4, alpha=8)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.2)
    model.peft_config["default"].base_model_name_or_path = str(aligned_dir)
    model.save_pretrained(adapter_dir)
    words = [f"w{i}" for i in range(40)]
    (tmp_path / "probe.jsonl").write_text("\n".join(json.dumps({"prompt": " ".join(words[i:i + 5])})
                                                    for i in range(0, 30, 3)))
    done = run(CLI, ["prune", str(adapter_dir), "--probe-prompts", str(tmp_path / "probe.jsonl"),
                     "--rule", "my_rules:AboveMedianProbe", "--output", str(output)], timeout=300, cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    kept = json.loads((output / "adapter_config.json").read_text())["exclude_modules"]
    assert len(kept) == 4  # half of the 8 LoRA layers are above the median
    unknown = run(CLI, ["prune", str(adapter_dir), "--probe-prompts", str(tmp_path / "probe.jsonl"), "--rule",
                        "my_rules:AboveMedianProbe", "--select", "above_median", "--output", str(tmp_path / "x")],
                  timeout=300, cwd=folder)
    assert unknown.returncode == 2 and "did you mean 'above_median_probe'" in unknown.stderr
    assert not (tmp_path / "x").exists()
