"""Safe writes: atomic, never onto an input, with normal permissions, and tidy after a killed run.

- :func:`atomic_path` / :func:`atomic_directory`: a reader (or a crash) never sees a half-written
  report, cache or adapter, and an original is replaced only by a complete copy;
- :func:`check_output_path`: refuse an output that is, contains or lies inside an input;
- :func:`recover_leftovers`: what a killed run left next to its output (``.NAME.splora-*.tmp`` /
  ``.old``) is removed, or restored when it is the only copy, on the next write to that folder;
  :func:`remove_stale_temporaries` does it for a training ``output_dir`` and its checkpoints;
- :func:`check_writable` and :func:`describe_os_error`: fail before the work, in words.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

# Leftovers of another host, or whose writer cannot be identified (an older version's names), are
# only touched once this old: a live writer on another machine of a shared file system keeps them.
STALE_AFTER_S = 24 * 3600
_TAG = "splora"
_LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.{_TAG}-(?P<pid>\d+)@(?P<host>[^/]+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(?P<kind>tmp|old)$")  # version 0.1.0's names


class OutputExistsError(FileExistsError):
    """The output directory exists and overwriting was not asked for."""


class UnsafeOutputError(ValueError):
    """The output is, contains or lies inside one of the inputs: writing it could destroy an input."""


class OutputNotWritableError(ValueError):
    """The output cannot be written (permissions, a file where a folder is needed, read-only disk)."""


# --- permissions --------------------------------------------------------------------------------


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (``os.umask`` sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(directory: bool) -> int:
    """What ``open``/``mkdir`` would give (0644 / 0755 under umask 022), not mkstemp's 0600/0700."""
    return (0o777 if directory else 0o666) & ~_umask()


def _normal_permissions(root: Path) -> None:
    """Give ``root`` and everything under it (all written by us) :func:`_normal_mode`."""
    os.chmod(root, _normal_mode(directory=True))
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), _normal_mode(directory=True))
        for name in files:
            os.chmod(os.path.join(folder, name), _normal_mode(directory=False))


def _prefix(name: str) -> str:
    return f".{name}.{_TAG}-{os.getpid()}@{socket.gethostname()}."


# --- leftovers of killed runs -------------------------------------------------------------------


def _writer_gone(match: re.Match, age: float) -> bool:
    if match.re is _LEGACY or match["host"] != socket.gethostname():
        return age > STALE_AFTER_S
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return age > STALE_AFTER_S  # alive: only a reused pid can be this old


def recover_leftovers(parent: str | os.PathLike, name: str | None = None) -> list[str]:
    """Tidy what killed writes left in ``parent``; return one line per thing done (also logged).

    A ``.NAME.splora-PID@HOST.*.tmp`` whose writer is gone is an unfinished copy: removed. A
    ``.NAME.*.old`` folder is the previous ``NAME`` kept while ``--overwrite`` swapped the new one
    in: if ``NAME`` is missing (killed between the two renames) it is moved back, else removed.
    Version 0.1.0's names (no writer recorded) count only for ``name`` and after a day.
    """
    parent = Path(parent)
    done: list[str] = []
    try:
        entries = list(parent.iterdir())
    except OSError:  # missing or unreadable: the write itself reports it
        return done
    for entry in entries:
        match = _LEFTOVER.match(entry.name) or _LEGACY.match(entry.name)
        if match is None or (match.re is _LEGACY and match["name"] != name):
            continue
        try:
            age = time.time() - entry.lstat().st_mtime
            if not _writer_gone(match, age):
                continue
            target, kept = parent / match["name"], entry / match["name"]
            if match["kind"] == "old" and kept.exists() and not os.path.lexists(target):
                os.replace(kept, target)
                done.append(f"restored {target} from {entry} (a run was killed while replacing it)")
            else:
                what = "an unfinished copy" if match["kind"] == "tmp" else "a replaced copy"
                done.append(f"removed {entry}: {what} left by a killed run")
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as error:  # never fail a write because a leftover could not be tidied
            logger.warning("Could not tidy %s: %s", entry, describe_os_error(error))
    for line in done:
        logger.warning("%s", line)
    return done


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """:func:`recover_leftovers` in ``folder`` and in each of its sub-folders (``checkpoint-N/``).

    What a run killed while writing (SIGTERM, SIGKILL, a lost node) left in a training
    ``output_dir``: ``.NAME.splora-*.tmp`` copies are removed and a ``.old`` copy whose original is
    missing is moved back, once their writer is gone (a live writer's are kept). Call it before the
    Trainer resumes from a checkpoint: a leftover of an older version holds ``adapter_model.safetensors``
    directly, and the Trainer's resume loads every such sub-folder as an adapter. Returns one line
    per thing done (also logged).
    """
    folder = Path(folder)
    done = recover_leftovers(folder)
    try:
        subfolders = [entry for entry in folder.iterdir() if entry.is_dir() and not entry.is_symlink()
                      and not (_LEFTOVER.match(entry.name) or _LEGACY.match(entry.name))]
    except OSError:  # missing or unreadable: nothing of ours to tidy
        return done
    for subfolder in sorted(subfolders):
        done.extend(recover_leftovers(subfolder))
    return done


# --- atomic writes ------------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(path.parent, path.name)
    handle, tmp = tempfile.mkstemp(prefix=_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.close(handle)
        yield Path(tmp)
        os.chmod(tmp, _normal_mode(directory=False))  # writers (safetensors) may have recreated it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # e.g. some network file systems
        return False
    raise OSError(code, os.strerror(code), str(second))


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; it becomes ``path`` only if the block succeeds.

    An existing ``path`` is refused unless ``overwrite``; then it is replaced only after the new
    directory is complete, in one atomic exchange where the file system has one. Elsewhere the old
    directory is first moved into a hidden ``.old`` folder; a run killed right then leaves that
    folder, which the next write to the same parent moves back (:func:`recover_leftovers`).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = link_target(path)
    recover_leftovers(path.parent, path.name)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"Output directory {path} already exists; choose another path or pass overwrite=True "
            "(--overwrite on the command line)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # the copy is built one level down: a killed run's leftover never looks like an adapter folder
    # to a reader that lists sub-folders holding adapter_model.safetensors (the Trainer's resume)
    holder = Path(tempfile.mkdtemp(prefix=_prefix(path.name), suffix=".tmp", dir=path.parent))
    tmp = holder / path.name
    try:
        tmp.mkdir()
        yield tmp
        _normal_permissions(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # tmp now holds the old copy, removed below
            old = Path(tempfile.mkdtemp(prefix=_prefix(path.name), suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)
                raise
            shutil.rmtree(old)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def link_target(path: str | os.PathLike) -> Path:
    """``path``, or where it points when it is a symbolic link (a write replaces the target and keeps
    the link: replacing the link itself would leave its target stale and the link gone).

    Raises:
        OutputNotWritableError: the link is part of a loop.
    """
    path = Path(path)
    return resolved(path, "output") if path.is_symlink() else path


def resolved(path: str | os.PathLike, what: str) -> Path:
    """``path`` with every symbolic link resolved (``Path.resolve``), a loop refused in words.

    Raises:
        OutputNotWritableError: a symbolic link on the way points back to itself.
    """
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as error:  # Python 3.11-3.12 raise RuntimeError, 3.13 OSError(ELOOP)
        if isinstance(error, OSError) and error.errno != errno.ELOOP:
            raise
        raise OutputNotWritableError(
            f"{what} {path} is a symbolic link loop (it points back to itself, directly or through other links), "
            f"so nothing can be written there; remove the link (rm {path}) or choose another path."
        ) from None


# --- refusing unsafe outputs --------------------------------------------------------------------


def check_output_path(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                      what: str = "output", existing_only: bool = True) -> None:
    """Refuse an ``output`` that is, contains or lies inside an existing input (symlinks resolved).

    Args:
        inputs: label -> path (``{"adapter": ..., "base": ..., "alignment cache": ...}``); ``None``
            and paths that do not exist locally (Hub ids) are skipped.
        what: how the output is named in the message (``"--output"``).
        existing_only: skip inputs that do not exist yet; False for a file the same run writes
            first (an alignment cache built before the output is written).

    Raises:
        UnsafeOutputError: the output and an input overlap; nothing was written.
    """
    target = resolved(output, what)
    for label, value in inputs.items():
        if value is None or (existing_only and not Path(value).expanduser().exists()):
            continue
        source = resolved(value, f"the {label}")
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise UnsafeOutputError(
            f"{what} {output} {relation} the {label} {value}"
            + (f" (both resolve to {target})" if relation == "is" and str(target) != str(value) else "")
            + ": writing it could overwrite or delete the input. Choose an output path outside every "
            "input (adapter, base, aligned model, alignment cache)."
        )


def check_writable(path: str | os.PathLike, what: str = "output", directory: bool = False) -> None:
    """Fail now, before any work, if ``path`` cannot be written: a probe file is created and removed.

    Args:
        directory: ``path`` is a folder (created if missing); else a file, which must not be a folder.

    Raises:
        OutputNotWritableError: the message says why (a folder where a file is wanted, a file in the
            way of a folder, permissions, read-only file system).
    """
    path = Path(path)
    if not directory and path.is_dir():
        raise OutputNotWritableError(f"{what} {path} is a directory; give a file path (e.g. {path / 'scores.json'}).")
    folder = path if directory else path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputNotWritableError(
            f"{what} {path} cannot be created: {existing} is a file, not a folder. Choose another path."
        )
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=_prefix("probe")):
            pass
    except OSError as error:
        raise OutputNotWritableError(f"{what} {path} cannot be written: {describe_os_error(error)}") from error


_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere",
    errno.EACCES: "permission denied: choose a folder you can write to, or ask its owner",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or ask its owner",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a directory, where a file is expected",
}


def describe_os_error(error: OSError) -> str:
    """``"<file>: <what happened, and what to do>"`` for an ``OSError`` (no traceback needed)."""
    reason = _HINTS.get(error.errno, error.strerror or str(error))
    return f"{error.filename}: {reason}" if error.filename else reason
