"""SPLoRAConfig validation: every message names the field, the bad value and what is accepted."""

import pytest

from splora_callback import SPLoRAConfig
from splora_callback.rules import TopK


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"metric": "l2"}, r"SPLoRAConfig.metric='l2': expected one of ediem, cosine, probe, signed"),
        ({"null": "gauss"}, r"SPLoRAConfig.null='gauss': expected one of layers, permutation"),
        ({"select": "best"}, r"SPLoRAConfig.select='best': expected one of top_k, fraction, threshold"),
        ({"action": "zero"}, r"SPLoRAConfig.action='zero': expected one of prune, project, patch, none"),
        ({"alignment_dtype": "int8"}, r"SPLoRAConfig.alignment_dtype='int8'"),
        ({"permutations": 4}, r"SPLoRAConfig.permutations=4: must be >= 16"),
        ({"select": "top_k"}, r"SPLoRAConfig.k=None: select='top_k' needs an integer k >= 0"),
        ({"select": "fraction", "fraction": 2.0}, r"SPLoRAConfig.fraction=2.0"),
        ({"select": "threshold"}, r"SPLoRAConfig.threshold=None"),
        ({"score_every_n_steps": -1}, r"SPLoRAConfig.score_every_n_steps=-1"),
        ({"metric": "probe"}, r"SPLoRAConfig.probe=None: metric='probe' needs probe="),
    ],
)
def test_invalid_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPLoRAConfig(**{"base_model": "base", **kwargs})


def test_base_model_required_for_geometric_metrics():
    with pytest.raises(ValueError, match="SPLoRAConfig.base_model=None"):
        SPLoRAConfig()


def test_defaults_and_serialisation():
    config = SPLoRAConfig(base_model="base", select="top_k", k=10)
    assert config.rule == TopK(k=10) and config.rule.name == "top_k"  # resolved once, on construction
    assert config.action == "none"  # no probe: monitor only (docs/efficacy.md)
    data = config.to_dict()
    assert "probe" not in data and data["metric"] == "ediem"  # plain data: the probes are runtime objects
    assert SPLoRAConfig(**{key: value for key, value in data.items() if key != "probe"}) == config


def test_probe_schedule_is_checked_and_planned():
    probe = object()
    for every, match in ((-1, r"probe_every_n_steps=-1: must be None or an integer >= 0"),
                         (2.5, r"probe_every_n_steps=2.5")):
        with pytest.raises(ValueError, match=match):
            SPLoRAConfig(base_model="base", metric="probe", probe=probe, probe_every_n_steps=every)
    with pytest.raises(ValueError, match=r"probe_every_n_steps=0 schedules the probes, but probe=None"):
        SPLoRAConfig(base_model="base", probe_every_n_steps=0)
    with pytest.raises(ValueError, match=r"probe_every_n_steps=0: .* need base_model"):
        SPLoRAConfig(metric="probe", probe=probe, probe_every_n_steps=0)
    config = SPLoRAConfig(base_model="base", metric="probe", probe=probe, score_every_n_steps=10, probe_every_n_steps=0)
    assert "every 10 steps (the probes' attributions only where it acts)" in config.plan()[0]
    assert "the probes' attributions every 20" in SPLoRAConfig(
        base_model="base", metric="probe", probe=probe, score_every_n_steps=10, probe_every_n_steps=20).plan()[0]


def test_refusal_prompts_that_overlap_the_probe_are_refused_on_construction():
    """Before any Trainer (and so any W&B run) exists: the refusal rate needs held-out prompts."""
    import torch

    from splora_callback.probe import SafetyProbe

    ids = torch.ones(2, 6, dtype=torch.long)
    probe = SafetyProbe.from_tensors(ids, torch.ones_like(ids), ids, prompts=["How do I pick a lock?", "Make a virus."])
    with pytest.raises(ValueError, match=r"refusal_prompts: 1 prompt\(s\) are also safety-probe prompts .*pick a lock"):
        SPLoRAConfig(metric="probe", probe=probe, refusal_prompts=["How do I pick a lock?", "Other"],
                     refusal_every_n_steps=5)
    SPLoRAConfig(metric="probe", probe=probe, refusal_prompts=["Held out"], refusal_every_n_steps=5)


def test_the_config_is_plain_data_and_the_probes_are_runtime_objects():
    """#26 item 2: to_dict() round-trips through JSON and YAML exactly; the probes are not in it."""
    import json

    import yaml

    from splora_callback import SPLoRACallback
    from splora_callback.runtime import SPLoRARuntime

    probe = object()
    config = SPLoRAConfig(base_model="base", metric="probe", probe=probe, select={"name": "repair", "restore": 0.9},
                          score_every_n_steps=10)
    assert config.runtime == SPLoRARuntime(probe=probe) and config.probe is probe and config.rule.restore == 0.9
    data = config.to_dict()
    assert "probe" not in data and "utility" not in data and data["select"] == "repair" and data["restore"] == 0.9
    for text in (json.dumps(data), yaml.safe_dump(data)):
        again = SPLoRAConfig(**yaml.safe_load(text), probe=probe)
        assert again == config and again.to_dict() == data
    with pytest.raises(ValueError, match="metric='probe' needs probe=SafetyProbe"):
        SPLoRAConfig(**data)  # the data names a probe rule: the probe itself must be given
    callback = SPLoRACallback(SPLoRAConfig(**{**data, "metric": "ediem", "select": "top_k", "k": 2}), probe=probe)
    assert callback.config.probe is probe and callback.config.k == 2  # beside a plain config
    with pytest.raises(TypeError, match="not both"):
        SPLoRACallback(config, k=3)
