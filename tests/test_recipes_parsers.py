"""SPLoRAConfig next to the trainer's arguments in one parser, as TRL and transformers scripts do it.

``HfArgumentParser((TrainingArguments, SPLoRAConfig))`` and ``TrlParser((SFTConfig, SPLoRAConfig))``
on a YAML file and on a command line: no field name clashes (``SPLoRAConfig.seed`` was renamed
``permutation_seed``), each value lands in its own class. And a recipe's ``training_args`` and
``splora`` sections, flattened into one such file, give the objects the recipe builds.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from transformers import HfArgumentParser, TrainingArguments

from splora_callback import SPLoRAConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import recipe_config  # noqa: E402

trl = pytest.importorskip("trl")  # make install: the [dev] extra

CPU = {"bf16": False, "use_cpu": True}  # SFTConfig turns bf16 on by default; this machine has no GPU


def field_names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls) if field.init}


def test_no_field_name_clashes_with_the_trainers_arguments():
    assert not field_names(SPLoRAConfig) & field_names(TrainingArguments)
    assert not field_names(SPLoRAConfig) & field_names(trl.SFTConfig)
    assert "permutation_seed" in field_names(SPLoRAConfig) and "seed" not in field_names(SPLoRAConfig)


def test_deprecated_seed_alias_still_sets_permutation_seed():
    with pytest.warns(FutureWarning, match="permutation_seed"):
        config = SPLoRAConfig(base_model="b", seed=3)
    assert config.permutation_seed == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SPLoRAConfig(base_model="b", permutation_seed=4).permutation_seed == 4


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


FLAT = {  # one flat file, as `trl sft --config x.yaml` reads: trainer fields and SPLoRA fields side by side
    "output_dir": "out",
    "seed": 7,
    "learning_rate": 3.0e-4,
    "max_steps": 20,
    "base_model": "meta-llama/Llama-2-7b-hf",
    "metric": "ediem",
    "null": "permutation",
    "select": "top_k",
    "k": 10,
    "permutation_seed": 5,
}


def test_hf_argument_parser_on_a_yaml_file(tmp_path):
    parser = HfArgumentParser((TrainingArguments, SPLoRAConfig))
    args, splora = parser.parse_yaml_file(write_yaml(tmp_path / "run.yaml", FLAT))
    assert (args.seed, args.learning_rate, args.max_steps, args.output_dir) == (7, 3e-4, 20, "out")
    assert splora == SPLoRAConfig(
        base_model="meta-llama/Llama-2-7b-hf", null="permutation", select="top_k", k=10, permutation_seed=5
    )
    with pytest.raises(ValueError, match="not used by the HfArgumentParser"):  # typos are not dropped silently
        parser.parse_yaml_file(write_yaml(tmp_path / "typo.yaml", {**FLAT, "metrc": "cosine"}))


def test_hf_argument_parser_on_a_command_line():
    parser = HfArgumentParser((TrainingArguments, SPLoRAConfig))
    args, splora = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--seed", "3", "--base_model", "b", "--metric", "cosine", "--null", "permutation"]
        + ["--select", "fraction", "--fraction", "0.1", "--permutation_seed", "9", "--prune_at_end", "false"]
    )
    assert args.seed == 3
    assert splora == SPLoRAConfig(
        base_model="b", metric="cosine", null="permutation", fraction=0.1, permutation_seed=9, prune_at_end=False
    )
    with pytest.raises(SystemExit):  # Literal fields become argparse choices
        parser.parse_args_into_dataclasses(["--output_dir", "out", "--base_model", "b", "--metric", "l2"])


def test_trl_parser_on_a_yaml_file_and_a_command_line_over_it(tmp_path):
    parser = trl.TrlParser((trl.SFTConfig, SPLoRAConfig))
    config = write_yaml(tmp_path / "sft.yaml", {**FLAT, **CPU, "max_length": 256})
    sft, splora = parser.parse_args_and_config(["--config", str(config), "--k", "4", "--seed", "11"])
    assert isinstance(sft, trl.SFTConfig)
    assert (sft.seed, sft.learning_rate, sft.max_length, sft.output_dir) == (11, 3e-4, 256, "out")
    assert (splora.k, splora.select, splora.null, splora.permutation_seed) == (4, "top_k", "permutation", 5)
    parser = trl.TrlParser((trl.SFTConfig, SPLoRAConfig))  # a fresh one: --config sets the parser's defaults
    sft, splora = parser.parse_args_and_config(
        ["--output_dir", "out", "--bf16", "false", "--use_cpu", "true", "--base_model", "b", "--action", "project"]
    )
    assert splora == SPLoRAConfig(base_model="b", action="project") and sft.seed == 42


def test_a_recipes_sections_are_one_flat_parser_file(tmp_path):
    """cpu-demo.yaml's training_args + splora, flattened for HfArgumentParser, give what the recipe builds."""
    # the demo's metric is the probe, which is no flat field: the flattening is checked with E-DIEM
    # (and no probe schedule or patch, which need the probe; the patch_* fields stay and round-trip)
    config = recipe_config.load_config(ROOT / "recipes" / "configs" / "cpu-demo.yaml",
                                       [f"output_dir={tmp_path}", "splora.metric=ediem", "splora.select=fraction",
                                        "splora.granularity=layer", "splora.probe_every_n_steps=null",
                                        "splora.action=prune", "evaluation.rate_patch.rebuild=true"])
    built_args = recipe_config.training_arguments(config)
    built_splora = recipe_config.splora_config(config, base="b", probe=None)
    flat = {
        "output_dir": built_args.output_dir,
        "run_name": built_args.run_name,
        "seed": config["seed"],
        "remove_unused_columns": False,
        **config["training_args"],
        **config["splora"],
        "base_model": "b",
        "alignment_cache": built_splora.alignment_cache,
    }
    args, splora = HfArgumentParser((TrainingArguments, SPLoRAConfig)).parse_dict(flat)
    assert args.to_dict() == built_args.to_dict()
    assert splora == built_splora


@pytest.mark.parametrize("parser", ["hf", "trl"])
def test_help_of_every_parser_the_recipes_and_readme_build(parser):
    """``--help`` works: a bare ``%`` in a field's help made argparse raise in ``format_help``."""
    if parser == "hf":
        text = HfArgumentParser((TrainingArguments, SPLoRAConfig)).format_help()
        assert HfArgumentParser((SPLoRAConfig,)).format_help()
    else:
        import trl

        text = trl.TrlParser((trl.SFTConfig, SPLoRAConfig)).format_help()
    assert "--restore" in text and "--budget" in text and "80 percent" in text
