"""``splora score|prune|report``: the library's functions from a shell.

No model is loaded: LoRA factors come from the adapter's safetensors file, and base and aligned
weights are streamed from their checkpoints one module at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._io import OutputExistsError, atomic_write_text
from .alignment import AlignmentSubspace
from .layers import lora_updates_from_adapter
from .pruning import acted_config, acted_state_dict, write_adapter
from .scoring import LayerScores, score_updates
from .selection import select_layers


def format_table(scores: LayerScores, chosen: Sequence[str] = ()) -> str:
    """A readable per-layer table: layer, kind, E-DIEM, cosine, relative distance, status."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:+.4f}"

    header = ("layer", "kind", "E-DIEM", "cosine", "rel.dist", "signed", "status")
    rows = []
    for score in scores:
        status = "SELECTED" if score.name in chosen else score.status
        if score.ediem_scaled is False:
            status += " (unscaled: IQR=0)"
        rows.append(
            (score.name, score.kind, number(score.ediem), number(score.cosine),
             number(score.relative_distance), number(score.signed_alignment), status)
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _alignment(args: argparse.Namespace, names: list[str], fan_in_fan_out: bool) -> AlignmentSubspace:
    return AlignmentSubspace.from_pretrained(
        args.base,
        aligned=args.aligned,
        target_modules=names,
        fan_in_fan_out=fan_in_fan_out,
        cache_file=args.cache,
        revision=args.revision,
    )


def _score(args: argparse.Namespace):
    updates, config, state_dict = lora_updates_from_adapter(args.adapter_dir)
    alignment = _alignment(args, [update.name for update in updates], bool(config.get("fan_in_fan_out")))
    scores = score_updates(updates, alignment, args.metric, null=args.null, seed=args.seed)
    return scores, alignment, config, state_dict


def _selection(args: argparse.Namespace, scores: LayerScores) -> list[str]:
    if args.top_k is not None:
        return select_layers(scores, "top_k", k=args.top_k)
    if args.fraction is not None:
        return select_layers(scores, "fraction", fraction=args.fraction)
    if args.threshold is not None:
        return select_layers(scores, "threshold", threshold=args.threshold)
    return []


def cmd_score(args: argparse.Namespace) -> int:
    scores, _, _, _ = _score(args)
    chosen = _selection(args, scores)
    print(format_table(scores, chosen))
    counts = {status: sum(s.status == status for s in scores) for status in ("active", "inactive", "no_alignment")}
    print(f"\n{len(scores)} LoRA layers: {counts}; metric={args.metric}, null={args.null}; higher E-DIEM = more suspect.")
    if args.json:
        atomic_write_text(args.json, json.dumps({**scores.to_dict(), "selected": chosen}, indent=2))
        print(f"Scores written to {args.json}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    if Path(args.output).resolve() == Path(args.adapter_dir).resolve():
        raise OutputExistsError("--output must differ from ADAPTER_DIR: the input adapter is never modified.")
    if Path(args.output).exists() and not args.overwrite:
        raise OutputExistsError(f"Output directory {args.output} already exists; pass --overwrite to replace it.")
    scores, alignment, config, state_dict = _score(args)
    chosen = _selection(args, scores)
    if not chosen:
        raise ValueError("No layer selected: pass --top-k, --fraction or --threshold.")
    write_adapter(
        args.output,
        acted_state_dict(state_dict, chosen, args.action, alignment),
        acted_config(config, chosen, args.action),
        overwrite=args.overwrite,
    )
    print(format_table(scores, chosen))
    print(f"\n{args.action}: {len(chosen)} of {len(scores)} LoRA layers -> {args.output}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .dashboard import write_html_report

    path = write_html_report(args.output_dir)
    print(f"Report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splora", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"splora-callback {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def scoring_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("adapter_dir", help="LoRA adapter directory written by PeftModel.save_pretrained")
        sub.add_argument("--base", required=True, help="unaligned base checkpoint: directory or Hub id")
        sub.add_argument("--aligned", required=True, help="aligned checkpoint the adapter was trained on")
        sub.add_argument("--metric", choices=["ediem", "cosine", "signed"], default="ediem")
        sub.add_argument("--null", choices=["layers", "permutation"], default="layers")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--cache", help="safetensors file caching the alignment subspace")
        sub.add_argument("--revision", help="Hub revision of base and aligned")
        group = sub.add_mutually_exclusive_group()
        group.add_argument("--top-k", type=int, help="select the k most suspect layers")
        group.add_argument("--fraction", type=float, help="select this share of the scored layers")
        group.add_argument("--threshold", type=float, help="select layers past this score")

    score = commands.add_parser("score", help="print per-layer scores of an adapter")
    scoring_options(score)
    score.add_argument("--json", help="also write the scores to this JSON file")
    score.set_defaults(func=cmd_score)

    prune = commands.add_parser("prune", help="write a pruned (or projected) copy of an adapter")
    scoring_options(prune)
    prune.add_argument("--output", required=True, help="new adapter directory (the input is never touched)")
    prune.add_argument("--action", choices=["prune", "project"], default="prune")
    prune.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    prune.set_defaults(func=cmd_prune)

    report = commands.add_parser("report", help="regenerate splora_report.html from splora_report.json")
    report.add_argument("output_dir", help="training output_dir holding splora_report.json")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as error:
        print(f"splora {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
