"""Provoking file-system faults for real in tests, also as root (which ignores file modes)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def read_only(folder: Path) -> Iterator[str]:
    """Make ``folder`` unwritable for this process; yield the reason a write then fails.

    Not root: ``chmod 0555`` (EACCES). Root ignores modes, so the folder is made immutable with
    ``chattr +i`` (EPERM for everyone, root included); where the file system has no such flag the
    test is skipped, as the fault cannot be provoked there.
    """
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield "permission denied"
        finally:
            os.chmod(folder, 0o755)
        return
    try:
        subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot make {folder} read-only as root here (chattr +i: {error})")
    try:
        yield "operation not permitted"
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True, capture_output=True)
