"""Run Python code in real child processes forked from one warm interpreter (the CLI tests).

A fresh interpreter spends ~10 s here importing torch, transformers and peft before ``splora``
does anything; the CLI tests start dozens of processes. :func:`run` asks a helper interpreter that
imported them once (started on first use, one per test session) to ``fork`` a child for each call:
a separate process with its own exit status, signals (a ``SIGKILL`` it sends itself reads as -9),
``stdout`` / ``stderr`` at the file-descriptor level, environment and working directory; only the
imports are shared (so what those libraries read from the environment at import, such as
``HF_HUB_OFFLINE``, keeps the value the test session started with: conftest.py sets it). What a
fresh start itself does (the console script) is tested by ``test_cli.test_console_script_is_installed``.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HELPER = r"""
import atexit, json, os, sys, tempfile, traceback
import torch, transformers, peft, safetensors  # noqa: F401  the imports every child shares
import splora_callback.cli  # noqa: F401

def child(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from TMPDIR, as a fresh process would
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    sys.argv = ["-c", *request["argv"]]
    code = 1
    try:
        exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as exit:  # what the interpreter does with it
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""

_helper: subprocess.Popen | None = None


def _started() -> subprocess.Popen:
    global _helper
    if _helper is None or _helper.poll() is not None:
        _helper = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, bufsize=1)
        atexit.register(_helper.kill)
    return _helper


def _reply(helper: subprocess.Popen, timeout: float) -> dict:
    with selectors.DefaultSelector() as selector:
        selector.register(helper.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError
    line = helper.stdout.readline()
    if not line:
        raise RuntimeError(f"the CLI test helper process exited ({helper.poll()})")
    return json.loads(line)


def run(code: str, argv: Sequence[str] = (), timeout: float = 300, cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -c CODE ARGV...`` in a child of the warm helper, in ``cwd`` with ``env`` (default:
    this process's); stdout and stderr as text.

    Raises:
        subprocess.TimeoutExpired: the child ran past ``timeout`` seconds (it is killed).
    """
    helper = _started()
    with tempfile.TemporaryDirectory() as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        stdout.touch()
        stderr.touch()
        request = {"code": code, "argv": [str(a) for a in argv], "cwd": str(cwd or os.getcwd()),
                   "env": dict(os.environ if env is None else env),
                   "stdout": str(stdout), "stderr": str(stderr)}
        helper.stdin.write(json.dumps(request) + "\n")
        helper.stdin.flush()
        pid = _reply(helper, 60)["pid"]
        try:
            returncode = _reply(helper, timeout)["returncode"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            _reply(helper, 60)
            raise subprocess.TimeoutExpired(["-c", code, *argv], timeout) from None
        return subprocess.CompletedProcess(["-c", code, *argv], returncode, stdout.read_text(), stderr.read_text())


def run_script(script: str | os.PathLike, argv: Sequence[str] = (), **kwargs) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGV...`` (run as ``__main__``, its folder first on ``sys.path``) in a child."""
    script = Path(script).resolve()
    code = (f"import runpy, sys\nsys.path.insert(0, {str(script.parent)!r})\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    return run(code, argv, **kwargs)


CLI = "import sys\nfrom splora_callback.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def splora(*args: object, inject: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``splora ARGS`` in its own process (with ``inject`` run first, e.g. to provoke a fault)."""
    return run(CLI if inject is None else f"{inject}\n{CLI}", [str(a) for a in args], timeout)
