"""What ``splora`` checks before the work, and the inputs it reads besides adapter and checkpoints.

Each check raises a ``ValueError`` whose message is one sentence naming the file or field and the
fix (the CLI prints it as ``splora <command>: error: ...``): probe JSONL files, the aligned model's
tokenizer, an adapter whose scaling is zero, scores that are not finite, a report's values. Also the
adapters kept in sub-folders of an adapter folder, carried unchanged into a pruned copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and peft load in the commands, not with `splora --help`
    from .layers import LoraUpdate

# files of which one makes a folder loadable by AutoTokenizer.from_pretrained
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


# --- probe files and the tokenizer ----------------------------------------------------------------


def _text(path: str) -> str:
    """A JSONL file's text; bytes that are not UTF-8 are named by line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}; a Latin-1 or Windows-1252 file?); "
            f"JSON lines must be UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 {path} > fixed.jsonl`."
        ) from None


def read_pairs(path: str, response_key: str, default_response: Callable[[list[str]], list[str]] | None = None,
               ) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL file: one object per line with ``prompt`` and
    ``response_key`` (``default_response`` fills a missing response, e.g. templated refusals).

    Raises:
        ValueError: a line that is not UTF-8, or not an object with string fields, naming the file and line.
    """
    rows = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}); expected one object per line.") from error
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string \"prompt\", got {line[:80]!r}.")
        response = row.get(response_key)
        if response is None and default_response is None:
            raise ValueError(f"{path}:{number}: no \"{response_key}\" string; each line needs prompt and {response_key}.")
        if response is not None and not isinstance(response, str):
            raise ValueError(f"{path}:{number}: \"{response_key}\" must be a string.")
        rows.append((row["prompt"], response))
    if not rows:
        raise ValueError(f"{path}: no examples (expected JSON lines with \"prompt\").")
    if default_response is not None:
        filled = iter(default_response([prompt for prompt, response in rows if response is None]))
        rows = [(prompt, response if response is not None else next(filled)) for prompt, response in rows]
    return rows


def load_tokenizer(aligned: str, source: str = "--aligned") -> Any:
    """The aligned model's tokenizer (pad token = EOS where it has none), for the safety probe.

    Raises:
        ValueError: a local folder without tokenizer files, or one that AutoTokenizer cannot load.
    """
    from transformers import AutoTokenizer

    folder = Path(aligned).expanduser()
    fix = (f"the safety probe tokenizes its prompts with the aligned model's tokenizer: save it there "
           f"(AutoTokenizer.from_pretrained(<the model's Hub id>).save_pretrained('{aligned}')) or pass --aligned "
           "a folder or Hub id that has one")
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"ALIGNED {aligned} (from {source}) has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}); "
                         f"{fix}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(aligned)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"ALIGNED {aligned} (from {source}): its tokenizer cannot be loaded ({reason}); {fix}.") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- the adapter and its scores -----------------------------------------------------------------


def check_scaling(updates: Sequence[LoraUpdate], config: dict, adapter_dir: str | os.PathLike) -> None:
    """Refuse an adapter whose LoRA scaling is zero everywhere (``lora_alpha=0``): every update is zero
    whatever ``lora_B`` holds, so nothing can be scored (the statuses would all say "inactive")."""
    from .adapter_files import ADAPTER_CONFIG

    if not updates or any(update.scaling != 0 for update in updates):
        return
    path = Path(adapter_dir) / ADAPTER_CONFIG
    field = ("lora_alpha=0" if config.get("lora_alpha") == 0 else
             f"lora_alpha={config.get('lora_alpha')!r} with alpha_pattern {config.get('alpha_pattern')!r}")
    raise ValueError(
        f"{path}: {field} makes the LoRA scaling alpha / r zero in all {len(updates)} layers, so every update "
        "is zero whatever lora_B holds and there is nothing to score; set lora_alpha to the value the adapter "
        "was trained with."
    )


def check_finite(scores: Any, updates: Sequence[LoraUpdate] = ()) -> None:
    """Refuse scores with NaN / inf (``LayerScores.non_finite``): no selection, table or JSON is built
    from them. ``updates``: the factors, to name the largest entry (an overflow's usual cause)."""
    bad = scores.non_finite()
    if not bad:
        return
    layers = sorted({entry.split("=")[0].rsplit(".", 1)[0] for entry in bad if not entry.startswith("losses.")})
    largest = ""
    if updates:
        peak = max(updates, key=lambda u: max(float(u.lora_A.abs().max()), float(u.lora_B.abs().max())))
        value = max(float(peak.lora_A.abs().max()), float(peak.lora_B.abs().max()))
        largest = f" (largest LoRA factor entry {value:.3g}, in {peak.name})"
    raise ValueError(
        f"Scores are not finite in {len(layers) or 'the losses of'} layer(s), e.g. {', '.join(bad[:2])}: the "
        f"adapter's factors overflow float32 arithmetic or hold NaN{largest}, so nothing was selected or written; "
        "check the training run that saved the adapter (a diverged loss?) and score a sound checkpoint."
    )


# --- adapters in sub-folders ------------------------------------------------------------------------


def adapter_subfolders(adapter_dir: str | os.PathLike) -> list[Path]:
    """Sub-folders holding another adapter (PEFT saves adapter ``NAME`` of a multi-adapter model in
    ``<dir>/NAME/``): a pruned copy carries them unchanged. Not carried: hidden folders (a killed
    write's leftovers) and ``splora/``, the callback's pruned copy of a checkpoint (derived from
    the very adapter being pruned, not another one)."""
    from .adapter_files import ADAPTER_CONFIG
    from .resume import CHECKPOINT_SUBDIR

    return sorted(entry for entry in Path(adapter_dir).iterdir()
                  if entry.is_dir() and (entry / ADAPTER_CONFIG).is_file()
                  and not entry.name.startswith(".") and entry.name != CHECKPOINT_SUBDIR)


def write_with_subadapters(output: str | os.PathLike, state_dict: dict, config: dict, overwrite: bool,
                           carried: Sequence[Path]) -> None:
    """The pruned adapter (``pruning.write_adapter``) with ``carried`` sub-folder adapters copied in
    unchanged, all in one atomic write (an interrupted run leaves the old output or none)."""
    from ._io import atomic_directory
    from .pruning import write_adapter

    if not carried:
        write_adapter(output, state_dict, config, overwrite=overwrite)
        return
    with atomic_directory(output, overwrite=overwrite) as folder:
        write_adapter(folder, state_dict, config, overwrite=True)
        for source in carried:
            shutil.copytree(source, folder / source.name)


# --- a report's values, before a page is drawn from them --------------------------------------------


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _layer_problem(item: Any) -> str | None:
    """What is wrong with one layer entry of a report's scores (None: nothing)."""
    from .scoring import LayerScore

    if not isinstance(item, dict):
        return f"must be an object, found {type(item).__name__}"
    fields = {field.name: field for field in dataclasses.fields(LayerScore)}
    unknown = sorted(set(item) - set(fields))
    if unknown:
        return f"has unknown field {unknown[0]!r}"
    missing = [name for name, field in fields.items() if name not in item and field.default is dataclasses.MISSING]
    if missing:
        return f"lacks field {missing[0]!r}"
    checks = {"name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
              "kind": (lambda v: isinstance(v, str), "a string"), "status": (lambda v: isinstance(v, str), "a string"),
              "shape": (lambda v: isinstance(v, list) and len(v) == 2 and all(type(n) is int for n in v),
                        "a list of two integers"),
              "rank": (lambda v: type(v) is int, "an integer"), "ediem_scaled": (lambda v: v is None or isinstance(v, bool),
                                                                              "true, false or null"),
              "components": (lambda v: v is None or (isinstance(v, dict) and all(
                  isinstance(values, list) and all(map(_number_or_none, values)) for values in v.values())),
                  "null or an object of number lists")}
    for name, value in item.items():
        test, what = checks.get(name, (_number_or_none, "a number or null"))
        if not test(value):
            return f"field {name!r} must be {what}, found {type(value).__name__} {json.dumps(value)[:40]}"
    return None


def check_report_values(report: dict, path: str | os.PathLike) -> None:
    """Every value the page draws: each history entry's scores (metric, null, layers with typed
    fields) and the action's layers; ``report.load_report`` has checked the top-level fields.

    Raises:
        ValueError: names the file, the entry and field, and what it must be.
    """

    def damaged(where: str, problem: str) -> ValueError:
        return ValueError(f"{path}: {where} {problem}; the report is damaged: write it again (a training run, "
                          "or the callback's report) or restore the file.")

    for index, entry in enumerate(report["history"]):
        scores = entry["scores"]
        for key in ("metric", "null"):
            if not isinstance(scores.get(key), str):
                raise damaged(f"history[{index}].scores.{key}", f"must be a string, found {json.dumps(scores.get(key))[:40]}")
        losses = scores.get("losses", {})
        if not isinstance(losses, dict) or not all(map(_number_or_none, losses.values())):
            raise damaged(f"history[{index}].scores.losses", "must be an object of numbers")
        for number, item in enumerate(scores["layers"]):
            problem = _layer_problem(item)
            if problem:
                raise damaged(f"history[{index}].scores.layers[{number}]", problem)
        if any(isinstance(v, float) and not math.isfinite(v) for item in scores["layers"] for v in item.values()):
            raise damaged(f"history[{index}].scores.layers", "hold NaN or infinity (JSON allows neither)")
    action = report.get("action")
    if action is not None:
        if not isinstance(action, dict) or not isinstance(action.get("action"), str):
            raise damaged("action", "must be null or an object with an 'action' string")
        layers = action.get("layers")
        if action["action"] != "none" and not (isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
            raise damaged("action.layers", f"must be a list of layer names, found {json.dumps(layers)[:40]}")
        if not isinstance(action.get("kept_rank") or {}, dict):
            raise damaged("action.kept_rank", "must be an object (layer -> rank)")
