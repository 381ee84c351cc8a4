"""Evaluate a finished LoRA run: which layer-selection rule restores refusals, and at what cost.

    python recipes/evaluation_run.py recipes/configs/cpu-demo.yaml [--override KEY=VALUE ...] [--report-only]

Run by ``finetune.py`` after training; runnable alone on a finished ``output_dir`` (it reads
``adapter-lora/`` and ``splora_report.json``, and rebuilds the run's inputs with
``recipe_data.prepare``). Scores once (one ``score_layers`` call gives E-DIEM, cosine, the signed
diagnostic and the probe) and reuses the scores for every fraction. Each selection is applied with
``apply_action`` to a fresh copy of the trained LoRA model, never by retraining. Rows: the aligned
model, the LoRA model, every rule of ``evaluation.rules`` (``variants.RULES``) at every fraction,
each rule's module-kind-matched random control (spec 7) and uniform random choices, several seeds
each. Writes ``results.md``, ``results.json`` and ``results.png`` into ``output_dir``. The models
are planned and evaluated in ``variants.py``; the tables and files are written by ``results.py``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from recipe_config import argument_parser, load_config, setup_environment, stage
from recipe_data import prepare
from recipe_sections import EvaluationSection, evaluation_section
from results import render_results, write_results
from variants import RULES, callback_stop, check_lora_effect, evaluate_variants, plan_variants

# --------------------------------------------------------------------------------------------------
# Scores and the whole stage
# --------------------------------------------------------------------------------------------------


def load_template(aligned: str, adapter_dir: Path, dtype: str) -> tuple[Any, Any, Any]:
    """(tokenizer, unpruned LoRA model, plain aligned model for generation), all in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(aligned)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(aligned, dtype=getattr(torch, dtype)), str(adapter_dir)
    ).eval()
    eval_model = AutoModelForCausalLM.from_pretrained(aligned, dtype=getattr(torch, dtype)).eval()
    return tokenizer, template, eval_model


def run_dir(config: dict[str, Any]) -> Path:
    """The finished run evaluated: ``evaluation.run_dir`` if set (results still go to ``output_dir``)."""
    return Path(evaluation_section(config).run_dir or config["output_dir"])


def task_probe(tokenizer: Any, task_train: Sequence[tuple[str, str]], spec: EvaluationSection, seed: int) -> Any:
    """The utility probe of the rules that need one (spec 3c): ``evaluation.utility_examples`` (20)
    task training pairs, seeded; never held-out pairs, and never the harmful part of the mix."""
    import random

    from splora_callback import UtilityProbe

    count = min(int(spec.utility_examples), len(task_train))
    pairs = random.Random(seed).sample(list(task_train), count)
    return UtilityProbe.from_pairs(tokenizer, pairs, max_length=int(spec.utility_max_length),
                                   batch_size=int(spec.utility_batch_size))


# Settings that choose which models are evaluated, not what one model's evaluation gives. Whether a
# cached model has the over-refusal prompts it now needs is checked per model (variants.py).
PLAN_ONLY = ("rules", "fractions", "random_seeds", "controls", "workers", "run_dir", "over_refusal",
             "over_refusal_controls")
# The section that builds each prebuilt model, by action: in that model's fingerprint only, so a new
# or changed candidate re-evaluates its own model, not the whole cell.
BUILT_BY = {"patch": "one_shot_patch", "anchored_patch": "anchored_patch", "rate_patch": "rate_patch",
            "gates": "gates", "safe_delta": "safe_delta"}


def cache_fingerprints(config: dict[str, Any], aligned: str, data: dict[str, Any]) -> Callable[[str], str]:
    """action -> sha256 of what one cached evaluation (a line of ``variants.jsonl``) depends on: the
    trained adapter's bytes, the aligned model (a local folder: its files' names, sizes and
    modification times; a Hub id as given), the dtype and seed, the probe, every prompt set, the
    evaluation settings that change a result and, for a prebuilt model (:data:`BUILT_BY`), the
    section that built it. A removal's model is its cache key (action and units): no rule's settings."""
    import hashlib

    from splora_callback.adapter_files import ADAPTER_WEIGHTS

    adapter = hashlib.sha256((run_dir(config) / "adapter-lora" / ADAPTER_WEIGHTS).read_bytes())
    folder = Path(aligned)  # its files, not the alignment caches recipe_data keeps next to them
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                   if not p.name.startswith("alignment_subspace")) if folder.is_dir() else []
    # the sections as written, not with recipe_sections' defaults: a new field's default keeps the caches
    evaluation = config["evaluation"]
    common = {key: value for key, value in evaluation.items() if key not in PLAN_ONLY and key not in BUILT_BY.values()}
    inputs = {"aligned": [str(aligned), files], "dtype": config["model"]["dtype"], "seed": config["seed"],
              "evaluation": common, "probe": config["probe"],
              "prompts": {key: data[key] for key in ("eval_prompts", "task_eval", "benign_prompts", "probe_prompts")}}

    def fingerprint(action: str) -> str:
        section = BUILT_BY.get(action)
        built = None if section is None else {section: evaluation.get(section)}
        digest = adapter.copy()
        if section == "rate_patch" and (evaluation.get(section) or {}).get("rebuild") is False:
            digest.update((run_dir(config) / "adapter" / ADAPTER_WEIGHTS).read_bytes())  # the callback's own patch
        digest.update(json.dumps({**inputs, "built": built}, sort_keys=True, default=str).encode())
        return digest.hexdigest()

    return fingerprint


def check_against_callback(scores: Any, callback_report: dict[str, Any], tolerance: float = 1e-4) -> float:
    """Largest E-DIEM difference between these scores and the callback's last ones (same weights).

    Raises:
        RuntimeError: they differ by more than ``tolerance``: the reloaded adapter is not the trained one.
    """
    last = {item["name"]: item["ediem"] for item in callback_report["history"][-1]["scores"]["layers"]}
    gaps = [
        abs(score.ediem - last[score.name])
        for score in scores
        if score.ediem is not None and last.get(score.name) is not None
    ]
    worst = max(gaps, default=0.0)
    if worst > tolerance:
        raise RuntimeError(
            f"E-DIEM of the reloaded adapter differs from the callback's by {worst:.3g}: "
            "adapter-lora/ is not the adapter the callback scored"
        )
    return worst


def callback_patch_gap(patched: Any, adapter_dir: Path) -> float:
    """Largest |difference| between the LoRA factors of ``patched`` (a PEFT model) and the adapter
    the callback saved in ``adapter_dir`` (``action: patch``): 0 when the study's rate patch is the
    callback's.

    Raises:
        ValueError: the two hold different LoRA tensors (names), with the first few that differ.
    """
    from safetensors.torch import load_file

    saved = load_file(adapter_dir / "adapter_model.safetensors")
    live = {name.replace(".default", ""): p.detach() for name, p in patched.named_parameters() if "lora_" in name}
    if saved.keys() != live.keys():
        raise ValueError(f"{adapter_dir}: its LoRA tensors are not the patched model's "
                         f"(e.g. {sorted(set(saved) ^ set(live))[:3]})")
    return max(float((saved[name].double() - live[name].double()).abs().max()) for name in saved)


def callback_patch_model(template: Any, spec: Any, callback_report: dict[str, Any], adapter_dir: Path) -> tuple[Any, dict]:
    """The callback's patched adapter (``adapter_dir``) as a copy of the trained LoRA model, and the
    callback's patch record (``from_callback_adapter``: True): ``evaluation.rate_patch.rebuild: false``.

    Raises:
        ValueError: the callback did not patch, or with other settings than ``spec`` (named).
    """
    from recipe_sections import callback_patch_differences
    from safetensors.torch import load_file
    from variants import lora_copy

    action = (callback_report or {}).get("action") or {}
    if action.get("action") != "patch":
        raise ValueError("config: evaluation.rate_patch.rebuild: false evaluates the callback's adapter/, but the "
                         f"callback ran action {action.get('action')!r}: set splora.action: patch or rebuild: true")
    settings = {"patch_factors": "both", **(callback_report.get("config") or {})}  # reports before patch_factors
    differ = callback_patch_differences(spec, settings)
    if differ:
        raise ValueError("config: evaluation.rate_patch.rebuild: false needs the callback's patch settings; they differ "
                         f"({'; '.join(differ)}): make them equal or set rebuild: true")
    model, _ = lora_copy(template)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(saved[name.replace(".default", "")])
    return model.eval(), {**action["patch"], "from_callback_adapter": True}


def build_baselines(config: dict[str, Any], spec: EvaluationSection, template: Any, eval_model: Any, tokenizer: Any,
                    probe: Any, data: dict[str, Any], context: dict[str, Any], built: dict[str, Any],
                    timings: dict[str, float]) -> dict[str, Any]:
    """The models of the rules without units besides the plain patch, into ``built`` by action: the
    anchored patch, the learned gates (a LoRA copy each) and Safe Delta (effective weights); returns
    their records. Anchors and the gates' benign term: the guard's benign requests (never aligned
    on, never evaluated) answered by the trained LoRA itself."""
    records: dict[str, Any] = {}
    wanted = set(spec.rules) & {"anchored_patch", "rate_patch", "gates", "safe_delta"}
    if not wanted:
        return records
    anchors = None
    if wanted & {"anchored_patch", "rate_patch", "gates"}:
        from demo_data import BENIGN_PROBE_REQUESTS

        from splora_callback.patch import anchor_pairs

        with stage("anchor pairs (benign requests, the LoRA's own answers)", timings):
            anchors = anchor_pairs(template, tokenizer, BENIGN_PROBE_REQUESTS, max_new_tokens=spec.task_max_new_tokens,
                                        batch_size=len(BENIGN_PROBE_REQUESTS))
    for rule, what in (("anchored_patch", "anchored one-shot patch (probe pairs + benign anchors)"),
                       ("rate_patch", "anchored patch, refusal-rate stop (greedy answers to the probe's prompts)")):
        if rule in wanted:
            from one_shot_patch import one_shot_patch

            if rule == "rate_patch" and not spec.rate_patch.rebuild:  # the callback's adapter/ itself
                built[rule], records[rule] = callback_patch_model(
                    template, spec.rate_patch, context.get("callback_report"), Path(config["output_dir"]) / "adapter")
                continue
            with stage(what, timings):
                built[rule], records[rule] = one_shot_patch(
                    template, probe, getattr(spec, rule), context["target"], config["seed"], anchor_pairs=anchors,
                    tokenizer=tokenizer, anchor_max_length=int(config["probe"]["max_length"]))
            action = (context.get("callback_report") or {}).get("action") or {}
            if rule == "rate_patch" and action.get("action") == "patch":  # the callback ran the same patch
                gap = callback_patch_gap(built[rule], Path(config["output_dir"]) / "adapter")
                records[rule]["callback_adapter_max_abs_diff"] = gap
                print(f"rate patch vs the callback's adapter/ (action: patch): largest |difference| {gap:.3g}")
    if "gates" in wanted:
        from recipe_sections import GatesSection
        from variants import lora_copy

        from splora_callback import UtilityProbe
        from splora_callback.gates import fold_gates, learn_gates

        gates = spec.gates or GatesSection()
        with stage(f"learned gates ({gates.steps} steps)", timings):
            anchor = UtilityProbe.from_pairs(tokenizer, anchors, max_length=int(config["probe"]["max_length"]),
                                             batch_size=probe.batch_size)
            gated, _ = lora_copy(template)
            result = learn_gates(gated, probe, utility=context.get("utility") or task_probe(
                tokenizer, data["task_train"], spec, config["seed"]), anchor=anchor, steps=gates.steps, lr=gates.lr,
                weights=(gates.refusal_weight, gates.task_weight, gates.anchor_weight))
            fold_gates(gated, result.gates, threshold=gates.threshold)
            built["gates"] = gated
            records["gates"] = {**dataclasses.asdict(gates), "losses": result.losses,
                                "below_half": sum(int((g < 0.5).sum()) for g in result.gates.values()),
                                "components": sum(g.numel() for g in result.gates.values())}
    if "safe_delta" in wanted:
        from safe_delta import calibrated_safe_delta

        with stage("Safe Delta (Gram matrices on the probe, scale calibration)", timings):
            built["safe_delta"], records["safe_delta"] = calibrated_safe_delta(
                template, eval_model, tokenizer, probe, spec.safe_delta, max_new_tokens=spec.harmful_max_new_tokens)
    return records


def run_evaluation(
    config: dict[str, Any],
    *,
    base: str,
    aligned: str,
    data: dict[str, Any],
    probe: Any,
    timings: dict[str, float],
    callback_report: dict[str, Any],
) -> dict[str, Any]:
    """Score once, plan the variants, evaluate them; returns everything ``write_results`` writes."""
    from splora_callback import AlignmentSubspace, score_layers

    output_dir = Path(config["output_dir"])
    spec = evaluation_section(config)
    with stage("scores (E-DIEM, cosine, signed, probe: one call)", timings):
        tokenizer, template, eval_model = load_template(
            aligned, run_dir(config) / "adapter-lora", config["model"]["dtype"]
        )
        cache = config["splora"].get("alignment_cache") or output_dir / "alignment_subspace.safetensors"
        alignment = AlignmentSubspace.from_pretrained(base, model=template, cache_file=cache, progress=False)
        rules = [RULES[rule] for rule in spec.rules if rule in RULES]
        same_utility = run_dir(config) == output_dir  # the run's own task probe
        # the probes' attributions, unless the only rules that need them reuse the callback's stop
        probing = [rule for rule in rules if rule.needs_probe and not (
            rule.measured and callback_stop(callback_report, *rule.measured, same_utility) is not None)]
        utility = task_probe(tokenizer, data["task_train"], spec, config["seed"]) if any(
            rule.needs_utility for rule in probing) else None
        granularity = "component" if any(rule.granularity == "component" for rule in rules) else "layer"
        scores = score_layers(
            template, alignment, "ediem", null=config["splora"].get("null", "layers"),
            probe=probe if probing else None, utility=utility, granularity=granularity,
        )
        gap = check_against_callback(scores, callback_report)
        print(f"{len(scores.eligible())} scored layers; E-DIEM matches the callback's to {gap:.2g}")
    context: dict[str, Any] = {"model": template, "probe": probe, "utility": utility, "tokenizer": tokenizer,
                               "callback_report": callback_report, "same_utility": same_utility}
    if any(getattr(rule.measured[1], "over_refusal_margin", None) is not None for rule in rules if rule.measured):
        from demo_data import (
            BENIGN_PROBE_REQUESTS,  # the guard's benign requests: never aligned on, never evaluated
        )

        context["benign_probe"] = list(BENIGN_PROBE_REQUESTS)
    patched, patch = None, None
    if any(rule.needs_model or rule.action in ("patch", "anchored_patch", "rate_patch") for rule in rules):
        from splora_callback.safety import aligned_refusal_loss

        measured = (callback_report.get("safety") or {}).get("aligned_refusal_loss")
        same_probe = (callback_report.get("runtime") or {}).get("probe") == repr(probe)
        # the callback measured it at train start with this probe on the same aligned weights
        context["target"] = measured if same_probe and measured is not None else aligned_refusal_loss(probe, template)
    if "one_shot_patch" in spec.rules:
        from one_shot_patch import one_shot_patch

        with stage("one-shot safety patch (probe pairs)", timings):
            patched, patch = one_shot_patch(template, probe, spec.one_shot_patch, context["target"], config["seed"])
            print(f"one-shot patch: {patch['steps']} steps, refusal loss {patch['refusal_loss']['before']:.3f} -> "
                  f"{patch['refusal_loss']['after']:.3f} (aligned {context['target']:.3f})")
    built = {} if patched is None else {"patch": patched}
    baselines = build_baselines(config, spec, template, eval_model, tokenizer, probe, data, context, built, timings)
    with stage("plan (measured stops run here)", timings):
        variants = plan_variants(scores, spec.rules, spec.fractions, spec.random_seeds, context, spec.controls)
    unique = len({variant.key for variant in variants})
    with stage(f"evaluation ({len(variants)} rows, {unique} distinct models)", timings):
        premise: dict[str, Any] = {}
        rows = evaluate_variants(
            variants,
            template,
            eval_model,
            tokenizer,
            alignment,
            data,
            dataclasses.asdict(spec),  # every key there, with its default
            check=lambda done: premise.update(
                check_lora_effect(done, spec.require_lora_effect, spec.premise_refusal_ratio)
            ),
            built=built,
            cache_file=output_dir / "variants.jsonl",
            fingerprint=cache_fingerprints(config, aligned, data),
        )
    return {
        "base": base,
        "aligned": aligned,
        "scores": scores,
        "rows": rows,
        "premise": premise,
        "probe": probe.describe(),
        "utility": None if utility is None else utility.describe(),
        "aligned_refusal_loss": context.get("target"),
        "repair_traces": context.get("traces", {}),
        "one_shot_patch": patch,
        "baselines": baselines,
        "data": data,
        "callback": {
            "selected": callback_report["selected"],
            "action": callback_report.get("action"),
            "config": callback_report["config"],
        },
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Re-run the evaluation of a finished run (``adapter-lora/`` and ``splora_report.json`` in output_dir);
    with ``--report-only``, only rewrite ``results.md`` / ``results.png`` from ``results.json``."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite results.md / results.png from results.json"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, args.override)
    output_dir = Path(config["output_dir"])
    if args.report_only:
        payload = json.loads((output_dir / "results.json").read_text())
        render_results(output_dir, payload)
        print(f"Rewrote {output_dir}/results.md and results.png from results.json")
        return payload
    setup_environment(config)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data, base, aligned, probe = prepare(config, timings)
    results = run_evaluation(
        config,
        base=base,
        aligned=aligned,
        data=data,
        probe=probe,
        timings=timings,
        callback_report=json.loads((run_dir(config) / "splora_report.json").read_text()),
    )
    timings["total"] = time.perf_counter() - start
    write_results(output_dir, results, timings, config)
    print(f"Results in {output_dir}/results.md")
    return results


if __name__ == "__main__":
    main()
