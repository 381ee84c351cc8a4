"""The ``splora prune`` command that repairs a saved adapter after the fact, for error messages."""

from __future__ import annotations

import shlex
from typing import Any


def repair_command(config: Any, adapter_dir: str, aligned: str | None) -> str:
    """The ``splora prune`` command line that applies ``config``'s rule to the adapter saved in
    ``adapter_dir`` (placeholders in capitals: files the user provides)."""
    parts = ["splora", "prune", adapter_dir]
    if config.base_model:
        parts += ["--base", config.base_model]
    if aligned:
        parts += ["--aligned", aligned]
    if config.metric == "probe":
        parts += ["--probe-prompts", "HARMFUL_PROMPTS.jsonl", "--granularity", config.granularity]
        if config.select == "repair":
            parts += ["--utility-examples", "TASK_EXAMPLES.jsonl", "--restore", str(config.restore)]
        elif config.select == "budget":
            parts += ["--utility-examples", "TASK_EXAMPLES.jsonl", "--budget", str(config.budget)]
    else:
        parts += ["--metric", config.metric]
    flag = {"top_k": ("--top-k", config.k), "fraction": ("--fraction", config.fraction),
            "threshold": ("--threshold", config.threshold)}.get(config.select)
    if flag is not None and flag[1] is not None:
        parts += [flag[0], str(flag[1])]
    if config.action == "project":
        parts += ["--action", "project"]
    parts += ["--output", f"{adapter_dir.rstrip('/')}-repaired"]
    return shlex.join(parts)
