"""``splora score|prune|report``: the library's functions from a shell.

No model is loaded: LoRA factors come from the adapter's safetensors file, and base and aligned
weights are streamed from their checkpoints one module at a time. Nothing is ever written onto an
input (adapter, base, aligned model, alignment cache), and every problem is one line on stderr
(exit status 2) naming the file, field or value and the fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import __version__
from ._io import (
    OutputExistsError,
    OutputNotWritableError,
    atomic_write_text,
    check_output_path,
    check_writable,
    describe_os_error,
    link_target,
    recover_leftovers,
)
from .cli_checks import (
    adapter_subfolders,
    check_finite,
    check_report_values,
    check_scaling,
    load_tokenizer,
    read_pairs,
    write_with_subadapters,
)

# torch, safetensors and transformers load in the commands, not here: `splora --help` answers at once
if TYPE_CHECKING:
    from .alignment import AlignmentSubspace
    from .scoring import LayerScores

# E-DIEM and the probe select past a threshold from above; cosine and the signed diagnostic from below.
_PAST = {"ediem": ">", "probe": ">", "cosine": "<", "signed": "<"}


def format_table(scores: LayerScores, chosen: Sequence[str] = (), sort: str = "module") -> str:
    """A readable per-layer table: layer, kind, the scores computed (E-DIEM, cosine, relative distance,
    signed alignment; the probes' attributions), status, in ``sort`` order (``provenance.SORTS``)."""
    from .provenance import sorted_scores

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:+.4f}"

    columns = [("E-DIEM", "ediem"), ("cosine", "cosine"), ("rel.dist", "relative_distance"),
               ("signed", "signed_alignment"), ("probe", "probe"), ("utility", "utility")]
    # only the scores this run computed (with --probe-prompts and no --base: the probe's, no geometry)
    columns = [(title, field) for title, field in columns
               if any(getattr(score, field, None) is not None for score in scores)] or columns[:4]
    header = ("layer", "kind", *(title for title, _ in columns), "status")
    rows = []
    for score in sorted_scores(scores, sort):
        status = "SELECTED" if score.name in chosen else score.status
        if score.ediem_scaled is False:
            status += " (unscaled: IQR=0)"
        rows.append((score.name, score.kind, *(number(getattr(score, field, None)) for _, field in columns), status))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _inputs(args: argparse.Namespace) -> dict[str, str | None]:
    """What no write may touch (paths that do not exist locally, Hub ids, are skipped)."""
    return {"adapter": args.adapter_dir, "base model": args.base, "aligned model": args.aligned,
            "alignment cache": args.cache}


def _resolve_aligned(args: argparse.Namespace) -> None:
    """``--aligned`` defaults to the adapter config's ``base_model_name_or_path`` (the model the
    adapter was trained on); ``args.aligned_source`` says which."""
    args.aligned_source = "--aligned"
    if args.aligned is not None:
        return
    from .adapter_files import read_adapter_config

    recorded = read_adapter_config(args.adapter_dir).get("base_model_name_or_path")
    if not recorded:
        raise ValueError(f"{Path(args.adapter_dir) / 'adapter_config.json'} records no base_model_name_or_path; "
                         "pass --aligned (the aligned checkpoint the adapter was trained on).")
    args.aligned, args.aligned_source = recorded, "adapter_config.json base_model_name_or_path"


def _infer_base(args: argparse.Namespace) -> None:
    """``--base`` defaults to ALIGNED's model card ``base_model`` (or the known pairs), said on stderr."""
    from .base_models import BaseModelNotFound, infer_base_model

    try:
        args.base, source = infer_base_model(args.aligned)
    except BaseModelNotFound:
        unless = (", or --probe-prompts FILE to score by the safety probe alone"
                  if hasattr(args, "probe_prompts") else "")
        raise ValueError(f"--base BASE is required: the unaligned model {args.aligned} was aligned from (its model "
                         f"card has no base_model, and it is not a known pair); pass --base BASE{unless}.") from None
    print(f"BASE: {args.base} (from {source}: the base_model of {args.aligned}; --base overrides it)",
          file=sys.stderr)


def _alignment(args: argparse.Namespace, names: list[str], fan_in_fan_out: bool) -> AlignmentSubspace:
    from .alignment import AlignmentSubspace

    return AlignmentSubspace.from_pretrained(
        args.base,
        aligned=args.aligned,
        target_modules=names,
        fan_in_fan_out=fan_in_fan_out,
        cache_file=args.cache,
        revision=args.revision,
    )


class Scored(NamedTuple):
    """What scoring an adapter gives the commands; ``model`` and ``probe``: the loaded aligned
    model with the adapter and the safety probe, when ``--probe-prompts`` scored it (else None)."""

    scores: LayerScores
    alignment: Any
    config: dict[str, Any]
    state_dict: dict[str, Any]
    model: Any = None
    probe: Any = None
    tokenizer: Any = None


def _score(args: argparse.Namespace) -> Scored:
    from .adapter_files import lora_updates_from_adapter
    from .scoring import score_updates

    if getattr(args, "probe_prompts", None):
        return _score_with_probes(args)
    if getattr(args, "granularity", "layer") != "layer" or getattr(args, "budget", None) is not None \
            or getattr(args, "restore", None) is not None:
        raise ValueError("--granularity component, --budget and --restore need the safety probe: pass "
                         "--probe-prompts FILE (and --utility-examples FILE for --budget and --restore).")
    if not args.base:
        _infer_base(args)

    if args.cache:  # the cache is written: never inside the adapter (checkpoints are checked later)
        check_output_path(args.cache, {"adapter": args.adapter_dir}, what="--cache")
    updates, config, state_dict = lora_updates_from_adapter(args.adapter_dir)
    check_scaling(updates, config, args.adapter_dir)
    alignment = _alignment(args, [update.name for update in updates], bool(config.get("fan_in_fan_out")))
    scores = score_updates(updates, alignment, args.metric, null=args.null, seed=args.seed)
    check_finite(scores, updates)
    return Scored(scores, alignment, config, state_dict)


def _score_with_probes(args: argparse.Namespace):
    """Scores of the live adapter on the aligned model: the safety probe (and the utility probe)
    run on it, geometry too when ``--base`` is given. Loads the model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .adapter_files import lora_updates_from_adapter
    from .probe import SafetyProbe, UtilityProbe, probe_pairs
    from .scoring import score_layers

    updates, config, state_dict = lora_updates_from_adapter(args.adapter_dir)
    check_scaling(updates, config, args.adapter_dir)
    refusals = read_pairs(args.probe_prompts, "refusal", lambda prompts: [r for _, r in probe_pairs(prompts, seed=args.seed)])
    examples = None if args.utility_examples is None else read_pairs(args.utility_examples, "response")
    tokenizer = load_tokenizer(args.aligned, args.aligned_source)
    safety = SafetyProbe.from_pairs(tokenizer, refusals, max_length=args.max_length)
    utility = None if examples is None else UtilityProbe.from_pairs(tokenizer, examples, max_length=args.max_length)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.aligned, dtype=torch.float32),
                                      args.adapter_dir).eval()
    alignment = None
    if args.base:
        names = [name for name in (key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
                                   for key in state_dict if key.endswith(".lora_A.weight"))]
        alignment = _alignment(args, names, bool(config.get("fan_in_fan_out")))
    scores = score_layers(model, alignment, "probe", null=args.null, seed=args.seed, probe=safety, utility=utility,
                          granularity=args.granularity)
    check_finite(scores, updates)
    return Scored(scores, alignment, config, state_dict, model, safety, tokenizer)


def selection_rule(args: argparse.Namespace):
    """The rule the command's options choose (``--select``/``--rule``, or one of the count flags), or None."""
    from .rules import load_rule, rule_from_options

    select = getattr(args, "select", None)
    if getattr(args, "rule", None):
        loaded = load_rule(args.rule)
        select = select or loaded
    parameters = {"k": args.top_k, "fraction": args.fraction, "threshold": args.threshold,
                  "budget": getattr(args, "budget", None), "restore": getattr(args, "restore", None)}
    options = rule_options(getattr(args, "rule_option", None) or [])
    rule = rule_from_options(select, {**parameters, **options})
    unknown = sorted(set(options) - set(rule.parameters() if rule is not None else ()))
    if unknown:
        raise ValueError(f"--rule-option {', '.join(unknown)}: not a parameter of the rule "
                         f"{getattr(rule, 'name', None)!r} (its parameters: {', '.join(rule.parameters()) if rule else 'none'}).")
    if rule is not None and rule.needs_probe and not getattr(args, "probe_prompts", None):
        raise ValueError(f"the rule {rule.name!r} selects by the safety probe: pass --probe-prompts FILE"
                         + (" (splora prune)" if args.command != "prune" else "") + ".")
    return rule


def rule_options(options: list[str]) -> dict[str, Any]:
    """``--rule-option KEY=VALUE`` flags as parameters (VALUE as JSON when it parses, else text).

    Raises:
        ValueError: an option without ``=``.
    """
    import json

    parameters: dict[str, Any] = {}
    for option in options:
        key, equals, text = option.partition("=")
        if not equals or not key.isidentifier():
            raise ValueError(f"--rule-option {option!r}: expected KEY=VALUE, e.g. stop=refusal_rate.")
        try:
            parameters[key] = json.loads(text)
        except json.JSONDecodeError:
            parameters[key] = text
    return parameters


def read_prompts(path: str) -> list[str]:
    """The ``"prompt"`` of every line of a JSONL file (``--benign-prompts``)."""
    return [prompt for prompt, _ in read_pairs(path, "response", lambda prompts: [""] * len(prompts))]


def _selection(args: argparse.Namespace, scored: Scored, rule: Any = None):
    """What ``rule`` (default: the options' :func:`selection_rule`) selects on the scored adapter."""
    from .rules import SelectionContext
    from .safety import aligned_refusal_loss

    rule = rule or selection_rule(args)
    if rule is None:
        return []
    benign = read_prompts(args.benign_prompts) if getattr(args, "benign_prompts", None) else None
    context = SelectionContext(model=scored.model, probe=scored.probe, acts=True, progress=sys.stderr.isatty(),
                               tokenizer=scored.tokenizer, benign_prompts=benign)
    if rule.needs_model:
        context.aligned_refusal_loss = aligned_refusal_loss(scored.probe, scored.model)
    chosen = rule.select(scored.scores, context)
    if "repair_trace" in context.notes:
        _print_trace(context.notes["repair_trace"], scored, context.aligned_refusal_loss)
    return chosen


def _check_restore(args: argparse.Namespace) -> None:
    """``--restore`` chooses its own count and needs both probes: refused before anything loads."""
    if getattr(args, "restore", None) is None:
        return
    given = [flag for flag, value in (("--budget", args.budget), ("--top-k", args.top_k), ("--fraction", args.fraction),
                                      ("--threshold", args.threshold)) if value is not None]
    if given:
        raise ValueError(f"--restore measures its own number of units: drop {' and '.join(given)}.")
    if args.probe_prompts is None or args.utility_examples is None:
        raise ValueError("--restore measures refusals with the safety probe and orders units by safety gain per unit "
                         "of task cost: pass --probe-prompts FILE and --utility-examples FILE.")


def _print_trace(trace: dict[str, Any], scored: Scored, aligned: float) -> None:
    """The measured stop's line on stderr: units taken, refusal loss before -> after, passes."""
    from .repair import RepairTrace

    trace = RepairTrace(**trace)
    removed = trace.chosen - len(trace.returned)
    trimmed = f", {len(trace.returned)} put back by the trim" if trace.returned else ""
    if trace.stop == "refusal_rate":
        before = next(m["rate"] for m in trace.measurements if m["probe"] == "refusal_rate" and m["count"] == 0)
        change = (f"refusal rate on the probe's prompts {before:.3f} -> {trace.final.get('refusal_rate', float('nan')):.3f}, "
                  f"target {trace.target:.3f} (aligned model {trace.aligned.get('refusal_rate', float('nan')):.3f})")
    else:
        change = (f"refusal loss {scored.scores.losses['refusal']:.4f} -> {trace.final.get('refusal', float('nan')):.4f}, "
                  f"target {trace.target:.4f} (aligned model {aligned:.4f})")
    print(f"measured stop: {removed} of {trace.available} {scored.scores.granularity} units ({trace.reason}{trimmed}); "
          f"{change}; {trace.passes} passes", file=sys.stderr)


def why_nothing_selected(args: argparse.Namespace, scores: LayerScores) -> str:
    """Which of the ways to select no layer happened, and what to do about it."""
    if getattr(args, "select", None) or getattr(args, "rule", None):
        return f"Nothing selected: the rule {getattr(args, 'select', None) or args.rule!r} chose no unit of this adapter."
    if getattr(args, "restore", None) is not None:
        if rule_options(getattr(args, "rule_option", None) or []).get("stop") == "refusal_rate":
            return (f"Nothing selected: the adapter's refusal rate on the probe's prompts already reaches --restore "
                    f"{args.restore} of the way to the aligned model's; there is nothing to repair.")
        return (f"Nothing selected: the adapter's refusal loss on the probe is already within --restore "
                f"{args.restore} of the aligned model's; there is nothing to repair.")
    if getattr(args, "budget", None) is not None:
        return (f"Nothing selected: no {scores.granularity} lowers the refusal loss within --budget {args.budget} "
                "of the task loss (first order); pass a larger --budget, or --top-k.")
    if args.top_k is None and args.fraction is None and args.threshold is None:
        return "No layer selected: pass --top-k, --fraction or --threshold."
    eligible = scores.eligible()
    if not eligible:
        counts = Counter(score.status for score in scores)
        if counts["inactive"] == len(scores):
            return (f"No layer selected: all {len(scores)} LoRA layers are inactive (lora_B is zero: the adapter "
                    "was saved before any training step?). There is nothing to prune.")
        if counts["no_alignment"] == len(scores):
            return (f"No layer selected: base and aligned weights are identical in all {len(scores)} adapted "
                    "modules (V = 0), so no layer can be judged. --aligned must be the aligned model and "
                    "--base its unaligned base; are they the same checkpoint?")
        return (f"No layer selected: no layer can be judged ({counts['inactive']} inactive: lora_B is zero; "
                f"{counts['no_alignment']} with base = aligned there: V = 0).")
    if args.top_k is not None:
        return "No layer selected: --top-k 0 selects none; pass --top-k 1 or more."
    if args.fraction is not None:
        return (f"No layer selected: --fraction {args.fraction} of the {len(eligible)} judgeable layers rounds "
                f"to 0 layers; pass --fraction {0.5 / len(eligible):.3g} or more, or --top-k 1.")
    suspicion = scores.suspicion()
    worst = max(suspicion, key=suspicion.get)
    value = getattr(scores[worst], "signed_alignment" if scores.metric == "signed" else scores.metric)
    past = _PAST.get(scores.metric, ">")
    return (f"No layer selected: no layer has {scores.metric} {past} {args.threshold} (the most suspect, "
            f"{worst}, has {value:.4g}); pass a {'lower' if past == '>' else 'higher'} --threshold or --top-k.")


def _writing(what: str, path: str, unchanged: str = "") -> Callable:
    """Run a write; an ``OSError`` becomes one line saying what could not be written, and why."""

    def run(write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as error:
            raise OutputNotWritableError(
                f"could not write {what} {path}: {describe_os_error(error)}.{unchanged}"
            ) from error

    return run


def cmd_score(args: argparse.Namespace) -> int:
    from .provenance import dumps, scores_document

    _resolve_aligned(args)
    to_stdout = args.json == "-"  # the JSON goes to stdout; the table to stderr
    if args.json and not to_stdout:  # refuse before the work, not after it
        check_output_path(args.json, _inputs(args), what="--json")
        check_writable(args.json, "--json")
    table = sys.stderr if to_stdout else sys.stdout
    scored = _score(args)
    scores, chosen = scored.scores, _selection(args, scored)
    print(format_table(scores, chosen, args.sort), file=table)
    counts = {status: sum(s.status == status for s in scores) for status in ("active", "inactive", "no_alignment")}
    print(f"\n{len(scores)} LoRA layers: {counts}; metric={args.metric}, null={args.null}; higher E-DIEM = more suspect.",
          file=table)
    if args.json:
        text = dumps(scores_document(scores, chosen, args, args.aligned_source, __version__))
        if to_stdout:
            print(text)
        else:
            _writing("--json", args.json)(lambda: atomic_write_text(args.json, text))
            print(f"Scores written to {args.json}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .model_card import facts_from_cli, write_model_card
    from .pruning import acted_adapter
    from .selection import selection_size

    _check_restore(args)
    _resolve_aligned(args)
    check_output_path(args.output, _inputs(args), what="--output")  # a symlink loop is refused here too
    if args.cache:  # written by this run before the output: it must not end up inside it either
        check_output_path(args.output, {"alignment cache": args.cache}, what="--output", existing_only=False)
    output = link_target(args.output)  # a link to a folder: the folder is replaced, the link kept
    recover_leftovers(output.parent, output.name)  # a killed --overwrite: the old copy comes back first
    if output.exists() and not args.overwrite:
        raise OutputExistsError(f"Output directory {args.output} already exists; pass --overwrite to replace it.")
    check_writable(output.parent, "--output's parent folder", directory=True)
    carried = adapter_subfolders(args.adapter_dir) if Path(args.adapter_dir).is_dir() else []
    scored = _score(args)
    scores, alignment, config, state_dict = scored.scores, scored.alignment, scored.config, scored.state_dict
    rule = selection_rule(args)
    chosen = _selection(args, scored, rule)
    if not chosen:
        raise ValueError(why_nothing_selected(args, scores))
    acted, acted_cfg = acted_adapter(state_dict, config, chosen, args.action, alignment)  # refuses pruning every layer
    unchanged = f" {output} is unchanged." if output.exists() else ""
    _writing("--output", str(output), unchanged)(
        lambda: write_with_subadapters(output, acted, acted_cfg, args.overwrite, carried)
    )
    from .rules import PROBE_FILES

    flags = [part for part in rule.cli_arguments() or [] if part not in PROBE_FILES]
    selection = f"`{' '.join(flags)}`" if flags else f"`--select {rule.name}` ({rule.describe()})"
    metric = "probe" if getattr(args, "probe_prompts", None) else args.metric
    facts = facts_from_cli(aligned=args.aligned, base=args.base, metric=metric, selection=selection,
                           action=args.action, scores=scores, chosen=list(chosen), adapter=str(args.adapter_dir),
                           version=__version__)
    _writing("the model card in", args.output)(lambda: write_model_card(args.output, facts))
    print(format_table(scores, chosen, args.sort))
    if isinstance(chosen, dict):
        print(f"\n{args.action}: {selection_size(chosen)} rank-one components in {len(chosen)} of {len(scores)} LoRA "
              f"layers -> {args.output} (model card: README.md)")
    else:
        print(f"\n{args.action}: {len(chosen)} of {len(scores)} LoRA layers -> {args.output} (model card: README.md)")
    if str(output) != str(args.output):
        print(f"{args.output} is a symbolic link: its target {output} was written, the link kept.")
    if carried:
        print(f"Carried unchanged (other adapters of {args.adapter_dir}, not scored or pruned): "
              + ", ".join(f"{folder.name}/" for folder in carried))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .dashboard import write_html_report
    from .report import load_report, report_path

    check_report_values(load_report(args.output_dir), report_path(args.output_dir))  # before drawing a page
    path = write_html_report(args.output_dir)
    print(f"Report written to {path}")
    return 0


MODELS_HELP = """\
Two checkpoints define what "safety drift" is measured against:
  ALIGNED  the aligned (chat / instruct) model the LoRA adapter was trained on, e.g.
           meta-llama/Llama-2-7b-chat-hf; default: the adapter's adapter_config.json
           base_model_name_or_path (what PEFT recorded at training time)
  BASE     the unaligned model ALIGNED was aligned from, e.g. meta-llama/Llama-2-7b-hf
Alignment moved the weights by V = W_aligned - W_base; each LoRA layer is scored by how far its
update strays from V (E-DIEM, Safe LoRA's cosine). Both are local directories or Hub ids;
only their safetensors shards are read, one tensor at a time (no model is loaded).
"""
EXAMPLES = """\
examples:
  splora score out/adapter --base meta-llama/Llama-2-7b-hf --top-k 10 --sort ediem
  splora score out/adapter --base BASE --aligned ALIGNED --json scores.json
  splora score out/adapter --base BASE --json - | jq '.layers[] | select(.ediem > 2)'
  splora prune out/adapter --base BASE --top-k 10 --output out/pruned   # out/adapter is never touched
  splora report out                                                     # out/splora_report.html again
  # loads the model; removes rank-one components until the predicted task-loss rise reaches 5 %:
  splora prune out/adapter --probe-prompts probe.jsonl --utility-examples task.jsonl \\
    --granularity component --budget 0.05 --output out/repaired
  # the measured repair (the callback's default): until 80 % of the refusal-loss rise is undone:
  splora prune out/adapter --probe-prompts probe.jsonl --utility-examples task.jsonl \\
    --granularity component --restore 0.8 --output out/repaired
"""


def _fraction_arg(text: str) -> float:
    """A share in (0, 1], for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .provenance import SORTS

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="splora", description=__doc__.splitlines()[0].replace("``", "") + "\n\n" + MODELS_HELP,
                                     epilog=EXAMPLES, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"splora-callback {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def scoring_options(sub: argparse.ArgumentParser, probes: bool = False) -> None:
        sub.add_argument("adapter_dir", help="LoRA adapter directory written by PeftModel.save_pretrained")
        sub.add_argument("--base", metavar="BASE",
                         help="the unaligned base model ALIGNED was aligned from: directory or Hub id (default: "
                              "the base_model of ALIGNED's model card, or a known pair"
                              + (", not needed with --probe-prompts)" if probes else ")"))
        sub.add_argument("--aligned", metavar="ALIGNED",
                         help="the aligned model the adapter was trained on: directory or Hub id (default: "
                              "adapter_config.json's base_model_name_or_path)")
        sub.add_argument("--sort", choices=list(SORTS), default="module",
                         help="table order: module (default), name, suspicion (most suspect first under "
                              "--metric), or one score, most suspect first")
        sub.add_argument("--metric", choices=["ediem", "cosine", "signed"], default="ediem")
        sub.add_argument("--null", choices=["layers", "permutation"], default="layers")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--cache", help="safetensors file caching the alignment subspace")
        sub.add_argument("--revision", help="Hub revision of base and aligned")
        group = sub.add_mutually_exclusive_group()
        group.add_argument("--top-k", type=int, help="select the k most suspect layers")
        group.add_argument("--fraction", type=float, help="select this share of the scored layers")
        group.add_argument("--threshold", type=float, help="select layers past this score")
        sub.add_argument("--select", metavar="NAME",
                         help="a selection rule by name (splora_callback.rules.RULES, or one --rule registers); "
                              "--top-k / --fraction / --threshold" + (" / --budget / --restore" if probes else "")
                              + " become its parameters")
        sub.add_argument("--rule", metavar="MODULE:ATTR",
                         help="import a rule of your own (a splora_callback.rules.Rule subclass or a function "
                              "(scores, context) -> selection) from MODULE, e.g. my_rules:AboveMedianProbe, and "
                              "select by it")
        sub.add_argument("--rule-option", action="append", metavar="KEY=VALUE",
                         help="a parameter of the rule (repeatable; VALUE read as JSON, else text), e.g. "
                              "--rule-option stop=refusal_rate --rule-option order=difference")

    score = commands.add_parser("score", help="print per-layer scores of an adapter", description=MODELS_HELP,
                                epilog=EXAMPLES, formatter_class=formatter)
    scoring_options(score)
    score.add_argument("--json", metavar="FILE",
                       help="also write the scores (format splora-scores-v1, with provenance: paths and "
                            "SHA-256 of adapter, base and aligned files) to FILE; '-' writes them to stdout "
                            "and the table to stderr")
    score.set_defaults(func=cmd_score)

    prune = commands.add_parser("prune", help="write a pruned (or projected) copy of an adapter, with a model card",
                                description=MODELS_HELP, epilog=EXAMPLES, formatter_class=formatter)
    scoring_options(prune, probes=True)
    prune.add_argument("--output", required=True, help="new adapter directory (the input is never touched)")
    probes = prune.add_argument_group(
        "repair with the safety probe (select by each layer's or rank-one component's measured effect on the "
        "refusal loss): these LOAD the aligned model and the adapter (CPU, float32) and run a forward and "
        "backward pass over the examples")
    probes.add_argument("--probe-prompts", metavar="FILE",
                        help="JSONL of harmful prompts: {\"prompt\": ..., \"refusal\": ...} (refusal optional: "
                             "templated); selects by the safety probe (never use evaluation prompts here)")
    probes.add_argument("--utility-examples", metavar="FILE",
                        help="JSONL of task examples {\"prompt\": ..., \"response\": ...}: the utility probe "
                             "(--budget needs it)")
    probes.add_argument("--granularity", choices=["layer", "component"], default="layer",
                        help="prune whole LoRA layers, or rank-one components of their updates")
    probes.add_argument("--budget", type=float,
                        help="select by safety gain per unit of task cost until the predicted task-loss increase "
                             "reaches this share of the task loss (e.g. 0.05); --top-k caps the count")
    probes.add_argument("--restore", type=_fraction_arg, metavar="SHARE",
                        help="measured repair (select='repair', the rule action='prune' takes with a probe): units in budget "
                             "order, the fewest whose removal closes this share (e.g. 0.8) of the gap between the "
                             "adapter's refusal loss and the aligned model's, measured by forward passes; needs "
                             "--utility-examples")
    probes.add_argument("--benign-prompts", metavar="FILE",
                        help="JSONL of benign requests {\"prompt\": ...} never used in alignment or evaluation: the "
                             "over-refusal guard of --rule-option stop=refusal_rate --rule-option over_refusal_margin=M")
    probes.add_argument("--max-length", type=int, default=256, help="tokens per probe example")
    prune.add_argument("--action", choices=["prune", "project"], default="prune")
    prune.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    prune.set_defaults(func=cmd_prune)

    report = commands.add_parser("report", help="regenerate splora_report.html from splora_report.json")
    report.add_argument("output_dir", help="training output_dir holding splora_report.json (or that file)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except OSError as error:  # a read or write the commands did not expect to fail: say which file
        print(f"splora {args.command}: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"splora {args.command}: error: {message or type(error).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
