"""Shared helpers of the benchmarks: machine header, timing, load checks, RESULTS.md sections.

Every benchmark prints its table and writes it into ``benchmarks/RESULTS.md`` between its own
markers (``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``): a rerun replaces only that block,
and a block that is not there yet is appended at the end, so sections written by other scripts or
by hand are never touched.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GIB = 1024**3


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` if given (the header records the thread count used).

    On a busy shared CPU, 1 thread is steadier than 2: an OpenMP thread that loses its core stalls
    every parallel region of the other.
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (what ``uptime`` prints)."""
    return os.getloadavg()


def load_text() -> str:
    one, five, fifteen = load_average()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def wait_for_load(threshold: float | None, max_wait_s: float = 3600.0, poll_s: float = 15.0) -> None:
    """Block until the 1-minute load average is at most ``threshold`` (None: do not wait).

    The CPU is shared; timings taken at a load above the core count are mostly queueing.
    Gives up after ``max_wait_s`` and says so (the load is recorded next to the numbers anyway).
    """
    if threshold is None:
        return
    start = time.monotonic()
    while load_average()[0] > threshold:
        if time.monotonic() - start > max_wait_s:
            print(f"[bench] load still {load_text()} after {max_wait_s:.0f} s; measuring anyway")
            return
        time.sleep(poll_s)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("nan")


def versions() -> str:
    import peft
    import torch
    import transformers

    return (
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {peft.__version__}"
    )


def header(load_before: str | None = None) -> str:
    """Machine, versions, date and load lines for a section (load now, and before if given)."""
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {memory_total_gib():.0f} GiB RAM "
        "(nothing else running unless the load average says so)",
        f"- versions: {versions()}",
        f"- date: {now}",
        f"- command: `python {' '.join(sys.argv)}`",
    ]
    if load_before is not None:
        lines.append(f"- load average at start: {load_before}; at end: {load_text()}")
    else:
        lines.append(f"- load average: {load_text()}")
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def time_call(function: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """``min-max`` of a list of seconds or ratios, for the tables."""
    return f"{min(values):.3g}-{max(values):.3g}"


def write_section(name: str, body: str, results: Path = RESULTS, at_top: bool = False) -> None:
    """Put ``body`` between this benchmark's markers in RESULTS.md (replace that block, else append).

    Only the block with this ``name`` is rewritten; the rest of the file is kept byte for byte.
    ``at_top``: a new block goes right after the file's first ``# `` title (the summary) instead of
    at the end. The file is locked while it is read and rewritten.
    """
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    results.touch(exist_ok=True)
    with results.open("r+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        text = handle.read()
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        elif at_top:
            title = re.search(r"^# .*\n", text, re.MULTILINE)
            cut = title.end() if title else 0
            text = text[:cut] + ("\n" if cut else "") + block + "\n" + text[cut:].lstrip("\n")
        else:
            if text and not text.endswith("\n\n"):
                text += "\n" if text.endswith("\n") else "\n\n"
            text += block
        handle.seek(0)
        handle.write(text)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
    print(f"[bench] wrote section {name!r} to {results}")
