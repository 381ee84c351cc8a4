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
        parts += ["--granularity", config.granularity]
    else:
        parts += ["--metric", config.metric]
    parts += config.rule.cli_arguments() or ["--top-k", "K"]  # a rule without a CLI form: choose a count
    if config.action == "project":
        parts += ["--action", "project"]
    parts += ["--output", f"{adapter_dir.rstrip('/')}-repaired"]
    return shlex.join(parts)
