"""The repair's behavioural stop, its guard and its trim pass (splora_callback/repair.py), on real
masking of a tiny float64 Llama: a planted "refusal" that comes back as planted layers are removed,
checked against every prefix."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from test_probe import llama_model

from splora_callback.layers import get_lora_layer, iter_lora_layers
from splora_callback.repair import RepairTrace, Signal, behavioural_stop, masked_units, search_removals
from splora_callback.rules import Repair, resolve_rule, rule_from_options
from splora_callback.selection import difference_order, repair_order


def _layers(model) -> list[str]:
    return [name for name, _ in iter_lora_layers(model, "default")]


def _removed(model, names) -> float:
    """Share of ``names`` whose LoRA update is gone (masked to zero, or the adapter disabled)."""
    layers = [get_lora_layer(model, name, "default") for name in names]
    gone = [bool(layer._disable_adapters) or not layer.lora_B["default"].weight.any() for layer in layers]
    return sum(gone) / len(names)


def _setting():
    model = llama_model(seed=3, r=4)
    names = _layers(model)
    planted, fragile = names[1::3][:3], [names[2]]  # "refusal" layers, and one whose removal over-refuses
    order = [names[0], planted[0], names[2], names[3], planted[1], names[5], planted[2], *names[8:]]
    assert len(set(order)) == len(order) and set(planted) <= set(order)
    return model, names, planted, fragile, order


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_the_search_stops_at_the_first_prefix_reaching_the_rate_and_the_trim_returns_only_harmless_units():
    model, names, planted, fragile, order = _setting()
    before = _weights(model)
    rate = Signal("refusal_rate", lambda m: _removed(m, planted), 2 / 3, at_least=True)
    reference = []  # the dense reference: every prefix measured
    for count in range(len(order) + 1):
        with masked_units(model, order[:count]):
            reference.append(_removed(model, planted))
    first = next(k for k, value in enumerate(reference) if value >= 2 / 3)

    trace = RepairTrace(target=2 / 3, task_limit=None, available=len(order), stop="refusal_rate")
    removed = search_removals(model, order, rate, trace=trace)
    assert trace.chosen == first == 5 and trace.reason == "refusal restored" and removed == order[:5]
    for measured in trace.measurements:
        assert measured["rate"] == reference[measured["count"]]

    trace = RepairTrace(target=2 / 3, task_limit=None, available=len(order), stop="refusal_rate")
    removed = search_removals(model, order, rate, trim=10, trim_order=list(reversed(order)), trace=trace)
    assert removed == planted[:2]  # every put-back of a non-planted layer keeps the rate; a planted one does not
    assert sorted(trace.returned) == sorted(set(order[:5]) - set(planted))
    for measured in trace.measurements:
        if "returned" in measured and measured["returned"] in trace.returned:
            assert measured["rate"] >= 2 / 3
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # left as it was

    trace = RepairTrace(target=2 / 3, task_limit=None, available=len(order), stop="refusal_rate")
    guard = Signal("over_refusal", lambda m: _removed(m, fragile), 0.0, reason="over-refusal guard")
    removed = search_removals(model, order, rate, [guard], trace=trace)
    assert removed == order[: order.index(fragile[0])] and trace.reason == "over-refusal guard"


def test_behavioural_stop_closes_the_share_of_the_gap_to_the_aligned_rate():
    model, names, planted, fragile, order = _setting()
    before = _weights(model)

    def measure(m, prompts):  # "refuses" prompt i when planted layer i is removed (the aligned model: all)
        return _removed(m, planted[: len(prompts)])

    harmful = ["w1 w2", "w3", "w4 w5"]
    chosen, trace = behavioural_stop(model, order, None, harmful, restore=0.6, measure_rate=measure,
                                     granularity="layer")
    assert trace.aligned == {"refusal_rate": 1.0} and trace.stop == "refusal_rate"
    assert trace.target == pytest.approx(0.6)  # 0 + 0.6 (1 - 0)
    assert trace.chosen == 5 and list(chosen) == order[:5]  # 2 of 3 planted layers gone: 0.67 >= 0.6
    assert trace.measurements[0]["from"] == "before the search" and trace.passes == len(trace.measurements)
    json.dumps(trace.to_dict())  # the report's JSON
    chosen, trace = behavioural_stop(model, order, None, harmful, restore=1.0, measure_rate=measure,
                                     granularity="layer", trim=20)
    assert sorted(chosen) == sorted(planted) and trace.chosen == 7
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not any(layer._disable_adapters for layer in model.modules() if isinstance(layer, BaseTunerLayer))
    with pytest.raises(ValueError, match="over_refusal_margin needs benign_prompts"):
        behavioural_stop(model, order, None, harmful, 0.8, over_refusal_margin=0.05)
    with pytest.raises(ValueError, match="harmful prompts"):
        behavioural_stop(model, order, None, [], 0.8)


def test_behavioural_stop_generates_with_a_real_tokenizer():
    from test_safety import tokenizer

    model, names, planted, fragile, order = _setting()
    chosen, trace = behavioural_stop(model.float(), order, tokenizer(), ["w1 w2", "w3"], 0.8, max_new_tokens=2,
                                     benign_prompts=["w4"], over_refusal_margin=0.05, granularity="layer")
    # no refusal keyword in this vocabulary: the rates are 0, nothing to restore
    assert trace.aligned == {"refusal_rate": 0.0, "over_refusal": 0.0} and trace.over_refusal_limit == 0.05
    assert trace.chosen == 0 and chosen == []


def test_repair_orders_against_a_reference():
    from test_repair import _planted

    _, _, _, scores = _planted()
    from splora_callback.selection import attributions, budget_order

    pairs = attributions(scores)
    positive = [unit for unit, (a, _) in pairs.items() if a > 0]
    for weight in (0.0, 1.0, 3.0):
        expected = sorted(positive, key=lambda u: (-(pairs[u][0] - weight * pairs[u][1]), u))
        assert difference_order(scores, weight) == expected
    assert repair_order(scores, "safety") == difference_order(scores, 0.0)
    assert repair_order(scores, "ratio") == budget_order(scores)
    with pytest.raises(ValueError, match="order='best'"):
        repair_order(scores, "best")


def test_repair_rule_parameters_are_checked_and_round_trip():
    rule = resolve_rule({"name": "repair", "stop": "refusal_rate", "order": "difference", "trim": 8}, {})
    assert rule == Repair(stop="refusal_rate", order="difference", trim=8)
    rule.check("probe")
    assert "refusal rate" in rule.describe() and "8 put back" in rule.describe()
    arguments = rule.cli_arguments()
    assert arguments[arguments.index("--restore") + 1] == "0.8"
    options = [arguments[i + 1] for i, flag in enumerate(arguments) if flag == "--rule-option"]
    assert options == ["stop=refusal_rate", "order=difference", "trim=8"]
    from splora_callback.cli import rule_options

    assert rule_from_options(None, {"restore": 0.8, **rule_options(options)}) == rule
    for bad, match in [({"stop": "loss"}, "stop='loss'"), ({"order": "x"}, "order='x'"), ({"trim": -1}, "trim=-1"),
                       ({"over_refusal_margin": 0.05}, "guards the refusal-rate stop"),
                       ({"utility_weight": float("nan")}, "utility_weight=nan")]:
        with pytest.raises(ValueError, match=match):
            Repair(**bad).check("probe")


def test_config_takes_the_rate_repair_and_benign_prompts():
    from test_probe import random_probe

    from splora_callback import SPLoRAConfig

    select = {"name": "repair", "stop": "refusal_rate", "over_refusal_margin": 0.05}
    config = SPLoRAConfig(probe=random_probe(), select=select, benign_prompts=["How do I bake bread?"])
    assert config.rule.stop == "refusal_rate" and config.to_dict()["select"]["over_refusal_margin"] == 0.05
    with pytest.raises(ValueError, match="benign_prompts is set but no rule uses them"):
        SPLoRAConfig(probe=random_probe(), select="repair", benign_prompts=["How do I bake bread?"])


def test_callback_trims_the_stop_and_the_live_model_is_the_trace_s_final_set(tmp_path):
    """A loss stop with a trim pass at the end of training: the acted selection is the stop's prefix
    less the units put back, and the live model's refusal loss is the trace's final value."""
    from test_components import _rows, _train
    from test_probe import random_probe
    from test_repair import task_probe

    from splora_callback import SPLoRACallback, SPLoRAConfig
    from splora_callback.teacher_forced import probe_loss

    probe = random_probe(seed=9)
    config = SPLoRAConfig(metric="probe", probe=probe, utility=task_probe(seed=3), score_every_n_steps=0,
                          select={"name": "repair", "restore": 0.8, "order": "difference", "trim": 6})
    callback = SPLoRACallback(config)
    model = _train(tmp_path, "run", [callback], _rows())
    report = json.loads((tmp_path / "run" / "splora_report.json").read_text())
    trace = report["repair"]["measured_stop"]
    assert trace["reason"] == "refusal restored" and trace["chosen"] >= 1
    assert trace["returned"], "the trim put nothing back: the test would not test it"
    assert sum(map(len, callback.selected.values())) == trace["chosen"] - len(trace["returned"])
    assert probe_loss(probe, model) == pytest.approx(trace["final"]["refusal"], rel=1e-5) and \
        trace["final"]["refusal"] <= trace["target"]
    assert report["safety"]["after_action"]["refusal_loss"] == trace["final"]["refusal"]
    returned = {tuple(unit) for unit in trace["returned"]}
    assert not returned & {(name, index) for name, indices in callback.selected.items() for index in indices}


def test_the_rate_stop_without_a_tokenizer_fails_before_step_one(tmp_path):
    from test_components import _rows, _train
    from test_probe import random_probe
    from test_repair import task_probe

    from splora_callback import SPLoRACallback

    callback = SPLoRACallback(metric="probe", probe=random_probe(seed=9), utility=task_probe(seed=3),
                              select={"name": "repair", "stop": "refusal_rate"})
    with pytest.raises(ValueError, match="refusal-rate stop generates answers.*processing_class=tokenizer"):
        _train(tmp_path, "run", [callback], _rows())
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_a_guard_without_benign_prompts_is_refused_on_construction_and_where_it_selects():
    from test_probe import random_probe

    from splora_callback import SPLoRAConfig
    from splora_callback.rules import SelectionContext

    select = {"name": "repair", "stop": "refusal_rate", "over_refusal_margin": 0.05}
    with pytest.raises(ValueError, match="over_refusal_margin guards.*pass benign_prompts"):
        SPLoRAConfig(probe=random_probe(), select=select)
    rule = resolve_rule(select, {})
    with pytest.raises(ValueError, match="over_refusal_margin needs benign requests.*--benign-prompts"):
        rule.select(None, SelectionContext(model=object(), acts=True))


def test_the_rate_stop_with_a_probe_without_prompts_fails_before_step_one(tmp_path):
    from peft import LoraConfig, get_peft_model
    from test_components import _rows
    from test_repair import task_probe
    from test_safety import tokenizer
    from tiny import ATTENTION, tiny_llama
    from transformers import Trainer, TrainingArguments

    from splora_callback import SafetyProbe, SPLoRACallback

    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    probe = SafetyProbe.from_tensors(ids, torch.ones_like(ids), ids.clone())
    callback = SPLoRACallback(metric="probe", probe=probe, utility=task_probe(seed=3),
                              select={"name": "repair", "stop": "refusal_rate"})
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(), callbacks=[callback], processing_class=tokenizer())
    with pytest.raises(ValueError, match="this probe has none.*SafetyProbe.from_pairs"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_flat_restore_and_a_select_dict_make_one_rule_and_round_trip():
    from splora_callback import SPLoRAConfig

    config = SPLoRAConfig(probe=object(), restore=0.9, select={"name": "repair", "stop": "refusal_rate"})
    assert config.rule == Repair(restore=0.9, stop="refusal_rate")  # the README's call: restore is not dropped
    again = SPLoRAConfig(probe=object(), **{k: v for k, v in config.to_dict().items() if k != "select"},
                         select=config.to_dict()["select"])
    assert again.rule == config.rule
    assert SPLoRAConfig(probe=object(), select={"name": "repair", "restore": 0.7}).rule.restore == 0.7
    with pytest.raises(ValueError, match="restore=0.9 and select's restore=0.7 disagree"):
        SPLoRAConfig(probe=object(), restore=0.9, select={"name": "repair", "restore": 0.7})
