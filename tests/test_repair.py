"""Measured repair (splora_callback/repair.py): masking equals pruning, and the stop is the shortest
prefix that reaches the target, checked against every prefix measured by pruned copies."""

from __future__ import annotations

import copy

import pytest
import torch
from test_components import _plant_two_components, task_probe
from test_probe import llama_model, random_probe, reference_loss

from splora_callback.layer_names import NothingLeftError
from splora_callback.pruning import apply_action, prune_components
from splora_callback.repair import masked_units, measured_stop
from splora_callback.safety import adapters_disabled, aligned_refusal_loss
from splora_callback.scoring import score_layers
from splora_callback.selection import as_selection, budget_order, rank_layers
from splora_callback.teacher_forced import probe_loss


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("units", [
    [("model.layers.0.self_attn.q_proj", 0), ("model.layers.0.self_attn.q_proj", 2), ("model.layers.1.self_attn.v_proj", 1)],
    ["model.layers.1.self_attn.o_proj", ("model.layers.0.self_attn.k_proj", 3)],
])
def test_masked_units_equal_pruned_model_and_restore_weights(units):
    model = llama_model(seed=3, r=4)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pruned = copy.deepcopy(model)
    components = {u[0]: [] for u in units if isinstance(u, tuple)}
    for unit in units:
        if isinstance(unit, tuple):
            components[unit[0]].append(unit[1])
    if components:
        prune_components(pruned, components)
    layers = [u for u in units if isinstance(u, str)]
    if layers:
        apply_action(pruned, None, layers, "prune")
    with masked_units(model, units):
        masked = _logits(model, ids)
    assert torch.allclose(masked, _logits(pruned, ids), rtol=0, atol=1e-10)  # float64
    assert not torch.allclose(masked, _logits(model, ids), atol=1e-6)  # the mask did something
    for name, parameter in model.named_parameters():  # restored exactly
        assert torch.equal(parameter, before[name]), name


def _prefix_loss(model, order, count, probe) -> float:
    """The loss with the first ``count`` units pruned from a copy (all of them: the adapter disabled)."""
    pruned = copy.deepcopy(model)
    try:
        if count:
            apply_action(pruned, None, as_selection(order[:count], "component"), "prune")
    except NothingLeftError:  # every unit removed: the aligned model
        with adapters_disabled(model), torch.no_grad():
            return float(reference_loss(model, probe))
    with torch.no_grad():
        return float(reference_loss(pruned, probe))


def _planted():
    """A tiny float64 Llama whose last o_proj holds an unsafe and a task component (test_components)."""
    model = llama_model(seed=12, a_scale=0.05, b_scale=0.03, r=2, alpha=4)
    safety, utility = random_probe(seed=12, n=6), task_probe(seed=13)
    _plant_two_components(model, "model.layers.1.self_attn.o_proj", safety, utility, size=2.0)
    scores = score_layers(model, None, metric="probe", probe=safety, utility=utility, granularity="component")
    return model, safety, utility, scores


def test_measured_stop_is_the_shortest_prefix_reaching_the_target():
    model, safety, utility, scores = _planted()
    order = budget_order(scores)
    assert len(order) >= 3
    losses = [_prefix_loss(model, order, k, safety) for k in range(len(order) + 1)]  # the dense reference
    target = (losses[0] + min(losses)) / 2  # reachable, not at once
    chosen, trace = measured_stop(model, order, safety, target)
    count = trace.chosen
    assert trace.reason == "refusal restored"
    assert losses[count] <= target + 1e-9 and losses[count - 1] > target  # reached, and not one unit earlier
    assert chosen == as_selection(order[:count], "component")
    for measured in trace.measurements:
        assert measured["probe"] == "refusal"
        assert measured["loss"] == pytest.approx(losses[measured["count"]], rel=1e-9)  # masking = pruning
    assert probe_loss(safety, model) == pytest.approx(losses[0], rel=1e-12)  # the model is left as it was
    if count < len(order):  # a shorter prefix reached the target: the whole order was never measured
        assert len(order) not in {measured["count"] for measured in trace.measurements}
    # the unpruned loss already known (the scores'): the same stop, one forward pass fewer
    known, known_trace = measured_stop(model, order, safety, target, start_loss=scores.losses["refusal"])
    assert known == chosen and known_trace.chosen == count
    assert known_trace.passes == trace.passes - 1 == len(known_trace.measurements) - 1
    assert known_trace.measurements[0] == {"probe": "refusal", "count": 0, "loss": scores.losses["refusal"],
                                           "from": "scores"}

    unreachable, trace = measured_stop(model, order, safety, min(losses) - 1.0)
    assert trace.reason == "order exhausted" and trace.chosen == len(order)
    assert trace.measurements[-1]["count"] == len(order)  # measured, to say it was not enough
    nothing, trace = measured_stop(model, order, safety, losses[0] + 1.0)
    assert trace.chosen == 0 and nothing == {}


def test_measured_stop_shortens_to_the_task_budget():
    model, safety, utility, scores = _planted()
    order = rank_layers(scores)  # every component, the task one included (budget_order leaves it out)
    refusal = [_prefix_loss(model, order, k, safety) for k in range(len(order) + 1)]
    task = [_prefix_loss(model, order, k, utility) for k in range(len(order) + 1)]
    _, free = measured_stop(model, order, safety, min(refusal) - 1.0)  # everything taken without a budget
    rises = [k for k in range(1, len(task)) if task[k] > task[0]]
    assert rises, "the planted task component must cost task loss when removed"
    budget = (task[rises[0]] / task[0] - 1) / 2  # the first rise is past the budget
    _, trace = measured_stop(model, order, safety, min(refusal) - 1.0, utility=utility, budget=budget)
    limit = (1 + budget) * task[0]
    assert trace.task_limit == pytest.approx(limit, rel=1e-12)
    assert trace.reason == "task budget" and trace.chosen < free.chosen
    assert task[trace.chosen] <= limit and task[trace.chosen + 1] > limit


def test_measured_stop_errors_name_the_problem():
    model = llama_model(seed=1)
    safety = random_probe(seed=1)
    with pytest.raises(ValueError, match="budget=0.05 needs a UtilityProbe"):
        measured_stop(model, [], safety, 1.0, budget=0.05)
    with pytest.raises(ValueError, match="target=nan"):
        measured_stop(model, [], safety, float("nan"))
    assert aligned_refusal_loss(safety, model) > 0  # the usual target, with the adapter disabled


def test_callback_repairs_by_measured_stop_and_reports_it(tmp_path):
    """select='repair' at the end of training: the selection is the measured stop on the trained
    weights (recomputed here on a copy kept before the action), the pruned model reaches the target."""
    import json

    from test_components import _rows, _train

    from splora_callback.callback import SPLoRACallback
    from splora_callback.config import SPLoRAConfig

    probe = random_probe(seed=9)
    config = SPLoRAConfig(metric="probe", probe=probe, utility=task_probe(seed=3), select="repair", restore=0.5,
                          granularity="component", score_every_n_steps=0)
    callback = SPLoRACallback(config)
    model = _train(tmp_path, "run", [callback], _rows())
    report = json.loads((tmp_path / "run" / "splora_report.json").read_text())
    trace = report["repair"]["measured_stop"]
    aligned, before = report["safety"]["aligned_refusal_loss"], trace["measurements"][0]["loss"]
    assert trace["target"] == pytest.approx(aligned + 0.5 * (before - aligned), rel=1e-6)  # float32 passes
    assert trace["reason"] == "refusal restored" and trace["chosen"] >= 1
    assert sum(map(len, callback.selected.values())) == trace["chosen"]
    after = probe_loss(probe, model)  # the live model, pruned by the callback
    assert after <= trace["target"] + 1e-5
    assert report["safety"]["after_action"]["refusal_loss"] == pytest.approx(after, rel=1e-5)
    # the measured effect is the stop's own pass at the chosen prefix (masking = pruning), not a new one
    at_chosen = [m["loss"] for m in trace["measurements"] if m["count"] == trace["chosen"]]
    assert report["safety"]["after_action"]["refusal_loss"] == at_chosen[0]


def test_repair_config_errors_name_the_field():
    from splora_callback.config import SPLoRAConfig

    with pytest.raises(ValueError, match="select='repair' trades"):
        SPLoRAConfig(base_model="b", select="repair")
    with pytest.raises(ValueError, match="SPLoRAConfig.restore=1.5"):
        SPLoRAConfig(metric="probe", probe=random_probe(seed=1), select="repair", restore=1.5)


def test_probes_only_where_the_callback_acts_changes_nothing_but_the_cost(pair, dataset, tmp_path):
    """probe_every_n_steps=0: the scoring steps before the end log E-DIEM and the refusal loss
    (forward passes) without attributions; training, the final scores and the repair are those of a
    run with the probes at every scoring step."""
    import json

    from tiny import lora_trainer

    from splora_callback.callback import SPLoRACallback
    from splora_callback.config import SPLoRAConfig
    from splora_callback.dashboard import write_html_report

    runs = {}
    for name, every in (("every", None), ("at_end", 0)):
        config = SPLoRAConfig(base_model=str(pair[0]), metric="probe", probe=random_probe(seed=9), select="repair",
                              restore=0.5, score_every_n_steps=4, probe_every_n_steps=every, utility_examples=6)
        callback = SPLoRACallback(config)
        trainer = lora_trainer(pair[1], dataset, tmp_path / name, [callback])
        trainer.train()
        runs[name] = (callback, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    (every, every_weights), (at_end, at_end_weights) = runs["every"], runs["at_end"]
    assert [entry["step"] for entry in at_end.history] == [4, 8, 12]
    for light, full in zip(at_end.history[:2], every.history[:2], strict=True):
        assert light["probes"] is False and light["selected"] is None
        assert all(layer["probe"] is None for layer in light["scores"]["layers"])
        assert set(light["scores"]["losses"]) == {"refusal"}
        assert light["scores"]["losses"]["refusal"] == pytest.approx(full["scores"]["losses"]["refusal"], rel=1e-5)
        assert [layer["ediem"] for layer in light["scores"]["layers"]] == [
            layer["ediem"] for layer in full["scores"]["layers"]]
    assert "probes" not in at_end.history[-1] and at_end.selected == every.selected and at_end.selected
    assert at_end.history[-1]["repair_trace"] == every.history[-1]["repair_trace"]
    for name, weight in every_weights.items():  # the same training, the same repair
        assert torch.equal(weight, at_end_weights[name]), name
    report = json.loads((tmp_path / "at_end" / "splora_report.json").read_text())
    assert [entry["scores"]["losses"]["refusal"] > 0 for entry in report["history"]] == [True] * 3  # the signal
    assert write_html_report(tmp_path / "at_end").is_file()


def test_the_measured_stop_shows_its_passes_done_and_planned(capsys):
    """#28 item 7: the end-of-training repair can take minutes on a real model: a tqdm bar counts
    the forward passes (done / planned by the bisection), and leaves the console when done."""
    model = llama_model(seed=3, r=4)
    probe = random_probe(seed=1)
    scores = score_layers(model, None, metric="probe", probe=probe, utility=task_probe(seed=2), granularity="component")
    order = budget_order(scores)
    _, trace = measured_stop(model, order, probe, target=-1.0, progress=True)  # unreachable: the whole bisection
    err = capsys.readouterr().err
    assert "SPLoRA measured stop" in err and "pass" in err
    assert f"{trace.passes}/" in err  # passes done / planned, as the bar last drew them
    _, quiet = measured_stop(model, order, probe, target=-1.0)
    assert "SPLoRA measured stop" not in capsys.readouterr().err and quiet.chosen == trace.chosen
