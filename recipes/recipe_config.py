"""A recipe's YAML: read it (with ``inherit:``), apply ``--override``, check it, build what it configures.

    config = load_config("recipes/configs/cpu-demo.yaml", ["training_args.max_steps=10"])
    args = training_arguments(config)          # transformers.TrainingArguments

Sections (three of them are a class's keyword arguments, by that class's own field names):

    output_dir, seed, torch_threads, wandb      the run: its folder, its seed, threads, W&B env vars
    model, demo_models, tiny_models             where the (base, aligned) checkpoints come from
    harmful_prompts, data, probe, evaluation    this recipe's data and evaluation (recipe_data.py, evaluation_run.py);
                                                data, probe, evaluation: dataclasses of recipe_sections.py
    lora                                        peft.LoraConfig(**lora); task_type defaults to CAUSAL_LM
    training_args                               transformers.TrainingArguments(**training_args): any field
    splora                                      SPLoRAConfig(**splora): base_model and probe are filled in

Composition: ``inherit: parent.yaml`` (or a list, merged in order; paths relative to the file)
is read first and this file is deep-merged over it (nested mappings merge, anything else is
replaced); ``--override a.b=value`` (value parsed as YAML) is applied last.
Also here: the command line both scripts share, the run's environment and the stage timer.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from recipe_sections import (
    callback_patch_differences,
    check_fields,
    data_section,
    evaluation_section,
    probe_section,
)

REQUIRED = (
    "output_dir",
    "seed",
    "model",
    "harmful_prompts",
    "data",
    "lora",
    "training_args",
    "splora",
    "probe",
    "evaluation",
)
MODEL_BUILDERS = ("demo_models", "tiny_models")  # sections that build model.base / model.aligned
# The schema before issue #14, for an error that says what to write instead.
RENAMED = {
    "train": "training_args (TrainingArguments' own field names: lr -> learning_rate, batch_size -> "
    "per_device_train_batch_size, epochs -> num_train_epochs, lr_scheduler -> lr_scheduler_type, "
    "warmup -> warmup_steps, sampling -> train_sampling_strategy, gradient_checkpointing -> "
    "activation_checkpointing)",
    "report_to": "training_args.report_to",
}

class _Loader(yaml.SafeLoader):
    """PyYAML reads ``1e-4`` as a string (YAML 1.1 floats need a dot); YAML 1.2 and every user read a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-4`` as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------------------------------
# YAML -> dict
# --------------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config with its ``inherit:`` parent(s) (relative to this file) read first and merged under it."""
    path = Path(path)
    config = parse_yaml(path.read_text()) or {}
    parents = config.pop("inherit", None) or []
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, read_config(path.parent / parent))
    return deep_merge(merged, config)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in: nested dicts merge, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (``value`` parsed as YAML: numbers, lists, null) to a copy."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override {item!r}: expected key=value, e.g. training_args.max_steps=10")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--override {item!r}: {part!r} is not a section of the config")
            node = child
        node[leaf] = parse_yaml(raw)
    return config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read, inherit, override and check a recipe config."""
    config = apply_overrides(read_config(path), overrides)
    check_config(config)
    return config


def check_config(config: dict[str, Any]) -> None:
    """Fail early, naming the key, rather than deep inside a run.

    Raises:
        ValueError: a key of the old schema; a missing section; no models (neither ``model.aligned``
            and ``model.base`` nor a section that builds them); a key of ``lora``, ``training_args``,
            ``splora``, ``evaluation``, ``data`` or ``probe`` that is not a field of its class (with the
            closest field names), or a key of the last three missing.
    """
    from peft import LoraConfig
    from transformers import TrainingArguments

    from splora_callback import SPLoRAConfig

    for old, new in RENAMED.items():
        if old in config:
            raise ValueError(f"config: {old!r} is now {new}; see recipes/configs/cpu-demo.yaml")
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise ValueError(f"config is missing the section(s) {missing}; see recipes/configs/cpu-demo.yaml")
    builders = [name for name in MODEL_BUILDERS if config.get(name) is not None]
    if len(builders) > 1:
        raise ValueError(f"config: set at most one of {list(MODEL_BUILDERS)}; got {builders}")
    if not builders and not (config["model"].get("aligned") and config["model"].get("base")):
        raise ValueError(
            "config: set model.aligned and model.base (local folders or Hub ids), or add a demo_models or "
            f"tiny_models section that builds them; got model={config['model']}"
        )
    check_fields("lora", config["lora"], LoraConfig)
    check_fields("training_args", config["training_args"], TrainingArguments)
    check_fields("splora", config["splora"], SPLoRAConfig, filled_in=("base_model", "probe"))
    for read in (evaluation_section, data_section, probe_section):  # the recipe's own sections
        read(config)
    check_callback_patch(config)


def check_callback_patch(config: dict[str, Any]) -> None:
    """``evaluation.rate_patch.rebuild: false`` evaluates the callback's ``adapter/``: before any
    training, the callback must patch (``splora.action``, when set) with the section's settings."""
    spec = evaluation_section(config)
    if "rate_patch" not in spec.rules or spec.rate_patch.rebuild:
        return
    action = config["splora"].get("action")
    if action not in (None, "patch"):
        raise ValueError(f"config: evaluation.rate_patch.rebuild: false evaluates the callback's adapter/, but "
                         f"splora.action is {action!r}: set splora.action: patch or rebuild: true")
    differ = callback_patch_differences(spec.rate_patch, config["splora"])
    if differ:
        raise ValueError("config: evaluation.rate_patch.rebuild: false needs the callback's patch settings; they differ "
                         f"({'; '.join(differ)}): make them equal or set rebuild: true")


# --------------------------------------------------------------------------------------------------
# dict -> the objects it configures
# --------------------------------------------------------------------------------------------------


def lora_config(spec: dict[str, Any]):
    """``peft.LoraConfig(**lora)``, a causal-LM task unless the section says otherwise."""
    from peft import LoraConfig

    return LoraConfig(**{"task_type": "CAUSAL_LM", **spec})


def training_arguments(config: dict[str, Any]):
    """``TrainingArguments(**training_args)``, validated by the class itself.

    Filled in unless the section sets them: ``output_dir`` = ``<output_dir>/trainer``, ``run_name`` =
    the name of ``output_dir``, ``seed`` = the run's ``seed``, ``remove_unused_columns=False`` (the
    examples are already input_ids / attention_mask / labels).
    """
    from transformers import TrainingArguments

    defaults = {
        "output_dir": str(Path(config["output_dir"]) / "trainer"),
        "run_name": Path(config["output_dir"]).name,
        "seed": config["seed"],
        "remove_unused_columns": False,
    }
    return TrainingArguments(**{**defaults, **config["training_args"]})


def splora_config(config: dict[str, Any], base: str, probe: Any | None, utility: Any | None = None):
    """``SPLoRAConfig(**splora)`` with the base model and, for ``metric: probe``, the safety probe
    (and ``utility``, the recipe's task probe, for the rules that weigh task cost)."""
    from splora_callback import SPLoRAConfig

    spec = dict(config["splora"])
    # one cache for the callback and the evaluation: the second build is a file read
    spec.setdefault("alignment_cache", str(Path(config["output_dir"]) / "alignment_subspace.safetensors"))
    probed = spec.get("metric") == "probe"
    return SPLoRAConfig(base_model=base, probe=probe if probed else None, utility=utility if probed else None, **spec)


# --------------------------------------------------------------------------------------------------
# Command line, environment, stage timer (what finetune.py and evaluation_run.py share)
# --------------------------------------------------------------------------------------------------


def argument_parser(description: str) -> argparse.ArgumentParser:
    """``CONFIG [--override KEY=VALUE ...]``; ``--override`` takes several pairs and may be repeated."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="a YAML file in recipes/configs/")
    parser.add_argument(
        "--override",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. --override training_args.max_steps=10 evaluation.fractions=[0.25] (repeatable)",
    )
    return parser


def setup_environment(config: dict[str, Any]) -> None:
    """Seed everything, show the library's progress logs, set W&B's project and mode (used when
    ``training_args.report_to`` has ``wandb``; variables already set win)."""
    import torch
    from transformers import set_seed

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    for name in ("splora_callback", "demo_models"):
        logging.getLogger(name).setLevel(logging.INFO)
    set_seed(config["seed"])
    if config.get("torch_threads"):  # 1 is much faster on a busy shared CPU (see docs/demo.md)
        torch.set_num_threads(config["torch_threads"])
    wandb = config.get("wandb") or {}
    for key, variable in (("mode", "WANDB_MODE"), ("project", "WANDB_PROJECT")):
        if wandb.get(key):
            os.environ.setdefault(variable, wandb[key])


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Print a stage's start and its elapsed wall time; record it in ``timings`` (seconds)."""
    load = os.getloadavg()[0]
    print(f"\n=== {name} (load average {load:.1f}) ===", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"=== {name}: {timings[name]:.1f} s ===", flush=True)
