"""How long ``splora --help`` takes: the CLI imports torch, safetensors and transformers only in its commands.

Each row is the wall time of a fresh process, median of ``--repeats`` (file caches warm after the
first untimed run): the Python start-up alone, ``splora --help`` (the installed console script),
``splora score --help``, and what the CLI cost before the package imported lazily (the whole
library, as the old ``splora_callback/__init__.py`` imported it eagerly). Target: help < 1 s.

Run: ``python benchmarks/cli_startup.py`` (under a minute).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

from _common import header, load_text, markdown_table, median, spread, wait_for_load, write_section

TARGET_S = 1.0


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wait-load", type=float, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed run of each command")
    args = parser.parse_args()
    script = shutil.which("splora")
    console = [script] if script else [sys.executable, "-m", "splora_callback.cli"]
    commands = {
        "python start-up (`python -c pass`)": [sys.executable, "-c", "pass"],
        "`splora --help`": [*console, "--help"],
        "`splora score --help`": [*console, "score", "--help"],
        "the library imported eagerly (what `splora --help` loaded before)":
            [sys.executable, "-c", "import splora_callback.callback, splora_callback.cli, splora_callback.pruning"],
    }
    wait_for_load(args.wait_load)
    load_before = load_text()
    seconds = {name: [] for name in commands}
    for command in commands.values() if not args.no_warmup else ():
        wall(command)  # untimed: warm the file cache
    for _ in range(args.repeats):  # interleaved
        for name, command in commands.items():
            seconds[name].append(wall(command))
    rows = [[name, f"{median(values):.2f}", spread(values)] for name, values in seconds.items()]
    help_s = median(seconds["`splora --help`"])
    body = "\n\n".join([
        "## CLI start-up (`benchmarks/cli_startup.py`)",
        header(load_before),
        f"- {args.repeats} interleaved runs of each command, a fresh process each"
        f"{'' if args.no_warmup else ', after one untimed run'} "
        f"(console script: `{' '.join(console)}`)",
        markdown_table(["command", "median s", "min-max s"], rows),
        f"Target `splora --help` < {TARGET_S:g} s: {help_s:.2f} s, {'met' if help_s < TARGET_S else 'MISSED'}. "
        "`splora_callback/__init__.py` imports its public names on first use (PEP 562) and `cli.py` imports "
        "torch, safetensors and transformers inside the commands (`tests/test_cli_usability.py` checks that help "
        "loads none of them).",
    ])
    print(body)
    if not args.no_write:
        write_section("cli_startup", body)


if __name__ == "__main__":
    main()
