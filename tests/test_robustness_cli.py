"""Issue #13, the command line: bad inputs and faults a new user hits, each run in a real process.

Every case runs ``splora`` in its own process (forked from a warm interpreter that imported torch,
transformers and peft once: ``cli_process.py``) and checks the exit status, that stderr ends in one
``splora <command>: error: ...`` line naming the file / field / value (no traceback), and that no
input changed. Faults that cannot be provoked for real on a CI machine are injected into that
process before the CLI starts (``inject=``): a disk-full write raises ``OSError(ENOSPC)``; a kill
is a ``SIGKILL`` the process sends itself at the exact moment; "permission denied" is what
``os.open``/``os.mkdir``/``open`` raise for another user's files (the tests run as root, which
ignores file modes; a read-only folder is also made for real, with ``chattr +i`` as root or
``chmod 0555`` otherwise: ``faults.read_only``). The long tail of malformed inputs runs the CLI's
entry point once per case inside one process (:func:`splora_many`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cli_process import run, splora
from faults import read_only
from safetensors.torch import load_file, save_file
from tiny import add_lora, plant_updates
from transformers import AutoModelForCausalLM

MANY = """
import contextlib, io, json, sys, traceback
from splora_callback.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code, escaped = main(argv), None
        except SystemExit as exit:
            code, escaped = exit.code, None
        except BaseException:
            code, escaped = 1, traceback.format_exc()
    results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue(), "escaped": escaped})
print("RESULTS" + json.dumps(results))
"""


def splora_many(*argvs) -> list[dict]:
    """Each argv through ``splora_callback.cli.main`` (the console entry point), in one process."""
    result = run(MANY, [json.dumps([[str(a) for a in argv] for argv in argvs])], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULTS", 1)[1])


def error_line(stderr: str, command: str) -> str:
    """The one error line the CLI ends with; there is no traceback before it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"splora {command}: error: "), stderr[-3000:]
    return last


def digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256): a byte-identical check of an input."""
    return {str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(path.rglob("*")) if file.is_file()}


@pytest.fixture(scope="module")
def pristine(llama_pair, tmp_path_factory):
    """base/, aligned/ and a trained adapter/ side by side in one folder (never modified)."""
    base_dir, aligned_dir, bases = llama_pair
    root = tmp_path_factory.mktemp("pristine")
    shutil.copytree(base_dir, root / "base")
    shutil.copytree(aligned_dir, root / "aligned")
    model = add_lora(AutoModelForCausalLM.from_pretrained(aligned_dir))
    plant_updates(model, bases, orthogonal={next(iter(bases))})
    model.save_pretrained(root / "adapter")
    return root


@pytest.fixture
def work(pristine, tmp_path) -> Path:
    """A fresh copy of :func:`pristine` for one test (a failing test may destroy it)."""
    shutil.copytree(pristine, tmp_path / "work")
    return tmp_path / "work"


def prune_args(work: Path, output, *extra) -> list:
    return ["prune", work / "adapter", "--base", work / "base", "--aligned", work / "aligned",
            "--output", output, *extra]


# --- data loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["parent", "base", "symlink"])
def test_output_that_is_or_contains_an_input_is_refused_and_nothing_is_deleted(work, output):
    before = digest(work)
    target = {"parent": work, "base": work / "base", "symlink": work / "link"}[output]
    if output == "symlink":
        (work / "link").symlink_to(work / "adapter", target_is_directory=True)
    result = splora(*prune_args(work, target, "--top-k", "1", "--overwrite"))
    assert result.returncode == 2
    line = error_line(result.stderr, "prune")
    relation = {"parent": "contains the adapter", "base": "is the base model", "symlink": "is the adapter"}[output]
    assert f"--output {target} {relation}" in line and "Choose an output path outside every input" in line
    assert digest(work) == before  # adapter, base, aligned: byte-identical


def test_output_inside_an_input_or_onto_the_cache_is_refused(work, pristine):
    cache = work / "cache" / "alignment.safetensors"
    results = splora_many(
        prune_args(work, work / "adapter" / "pruned", "--top-k", "1"),
        [*prune_args(work, work / "cache", "--top-k", "1", "--overwrite"), "--cache", cache],
        ["score", work / "adapter", "--base", work / "base", "--aligned", work / "aligned",
         "--json", work / "adapter" / "adapter_config.json"],
    )
    (work / "cache").mkdir()
    cache.write_bytes(b"not yet a cache")  # the second case again, once the cache exists
    results += splora_many([*prune_args(work, work / "cache", "--top-k", "1", "--overwrite"), "--cache", cache])
    expected = [("prune", "lies inside the adapter"), ("prune", "contains the alignment cache"),
                ("score", "lies inside the adapter"), ("prune", "contains the alignment cache")]
    for result, (command, relation) in zip(results, expected, strict=True):
        assert result["escaped"] is None and result["code"] == 2
        assert relation in error_line(result["stderr"], command)
    assert not (work / "adapter" / "pruned").exists()
    assert digest(work / "adapter") == digest(pristine / "adapter")
    assert cache.read_bytes() == b"not yet a cache"


def test_a_kill_between_the_renames_of_overwrite_is_recovered_by_the_next_run(work):
    output = work / "pruned"
    assert splora(*prune_args(work, output, "--top-k", "1")).returncode == 0
    first = digest(output)
    # the fallback path (file systems without an atomic exchange): killed right after the old copy
    # was moved aside, before the new one took its place
    kill = (
        "import os, signal, splora_callback._io as io\n"
        "io._exchange = lambda a, b: False\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        f"    if str(dst) == {str(output)!r} and '.tmp' in str(src):  # the new copy, inside its .tmp folder\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "os.replace = replace\n"
    )
    killed = splora(*prune_args(work, output, "--top-k", "2", "--overwrite"), inject=kill)
    assert killed.returncode == -9 and not output.exists()
    (kept,) = work.glob(".pruned.*.old")  # the only copy of the old output

    # reading it says where the copy is
    (read,) = splora_many(["score", output, "--base", work / "base", "--aligned", work / "aligned"])
    assert read["code"] == 2 and f"left the previous copy in {kept}/pruned" in read["stderr"]

    again = splora(*prune_args(work, output, "--top-k", "2"))
    assert again.returncode == 2  # restored first, so the output exists and --overwrite is needed
    assert f"restored {output} from {kept}" in again.stderr
    assert "already exists; pass --overwrite" in error_line(again.stderr, "prune")
    assert digest(output) == first and not list(work.glob(".pruned.*"))


def test_temp_folders_of_a_killed_run_are_removed_by_the_next_write(work):
    output = work / "pruned"
    kill_while_writing = (
        "import os, signal, safetensors.torch as st\n"
        "def save_file(tensors, path, metadata=None):\n"
        "    open(path, 'wb').write(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "st.save_file = save_file\n"
    )
    assert splora(*prune_args(work, output, "--top-k", "1"), inject=kill_while_writing).returncode == -9
    (left,) = work.glob(".pruned.*.tmp")
    result = splora(*prune_args(work, output, "--top-k", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"removed {left}: an unfinished copy left by a killed run" in result.stderr
    assert not left.exists() and (output / "adapter_model.safetensors").is_file()


def test_written_adapter_has_normal_permissions(work):
    output = work / "pruned"
    assert splora(*prune_args(work, output, "--top-k", "1")).returncode == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask  # 0755 under umask 022, not mkdtemp's 0700
    for file in output.iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask
    strict = splora(*prune_args(work, work / "private", "--top-k", "1"), inject="import os; os.umask(0o077)")
    assert strict.returncode == 0 and (work / "private").stat().st_mode & 0o777 == 0o700  # the umask is kept


# --- file-system errors: one line saying what could not be written --------------------------


def test_disk_full_during_overwrite_keeps_the_old_output(work):
    output = work / "pruned"
    assert splora(*prune_args(work, output, "--top-k", "1")).returncode == 0
    before = digest(output)
    full = (
        "import errno, os, safetensors.torch as st\n"
        "def save_file(tensors, path, metadata=None):\n"
        "    open(path, 'wb').write(b'partial')\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)\n"
        "st.save_file = save_file\n"
    )
    result = splora(*prune_args(work, output, "--top-k", "2", "--overwrite"), inject=full)
    assert result.returncode == 2
    line = error_line(result.stderr, "prune")
    assert f"could not write --output {output}" in line and "no space left on the device" in line
    assert f"{output} is unchanged" in line
    assert digest(output) == before and not list(work.glob(".pruned.*"))


def test_json_onto_a_folder_or_under_a_file_fails_before_scoring(work):
    (work / "note.txt").write_text("a file")
    (work / "results").mkdir()
    folder = splora("score", work / "adapter", "--base", work / "base", "--aligned", work / "aligned",
                    "--json", work / "results")
    assert folder.returncode == 2
    assert f"--json {work / 'results'} is a directory; give a file path" in error_line(folder.stderr, "score")
    assert "LoRA layers:" not in folder.stdout  # refused before the work
    results = splora_many(
        ["score", work / "adapter", "--base", work / "base", "--aligned", work / "aligned",
         "--json", work / "note.txt" / "scores.json"],
        [*prune_args(work, work / "note.txt" / "pruned", "--top-k", "1")],
    )
    for result in results:
        assert result["escaped"] is None and result["code"] == 2
        assert "is a file, not a folder" in result["stderr"]


def test_disk_full_while_writing_json(work):
    full = (
        "import errno, os, pathlib\n"
        "def write_text(self, *args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))\n"
        "pathlib.Path.write_text = write_text\n"
    )
    result = splora("score", work / "adapter", "--base", work / "base", "--aligned", work / "aligned",
                    "--json", work / "scores.json", inject=full)
    assert result.returncode == 2
    line = error_line(result.stderr, "score")
    assert f"could not write --json {work / 'scores.json'}" in line and "no space left" in line
    assert not list(work.glob("*scores.json*"))


def _deny(folder: Path) -> str:
    """What the kernel does for a folder the process may not write (mode 0555, not its owner)."""
    return (
        "import errno, os\n"
        f"denied = {str(folder)!r}\n"
        "def guard(real):\n"
        "    def call(path, *args, **kwargs):\n"
        "        if os.fspath(path).startswith(denied + '/') or (os.fspath(path) == denied and args and args[0] & os.O_TMPFILE):\n"
        "            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))\n"
        "        return real(path, *args, **kwargs)\n"
        "    return call\n"
        "os.open, os.mkdir = guard(os.open), guard(os.mkdir)\n"
    )


def test_read_only_output_parent_is_refused_before_the_work(work):
    (work / "readonly").mkdir()
    result = splora(*prune_args(work, work / "readonly" / "pruned", "--top-k", "1"), inject=_deny(work / "readonly"))
    assert result.returncode == 2
    line = error_line(result.stderr, "prune")
    assert f"{work / 'readonly'}" in line and "permission denied" in line
    assert "LoRA layers" not in result.stdout and not list((work / "readonly").iterdir())


def test_read_only_output_parent_for_real(work):
    (work / "readonly").mkdir()
    with read_only(work / "readonly") as reason:
        result = splora(*prune_args(work, work / "readonly" / "pruned", "--top-k", "1"))
        (json_result,) = splora_many(["score", work / "adapter", "--base", work / "base", "--aligned",
                                      work / "aligned", "--json", work / "readonly" / "scores.json"])
    assert result.returncode == 2 and reason in error_line(result.stderr, "prune")
    assert "LoRA layers" not in result.stdout
    assert json_result["escaped"] is None and json_result["code"] == 2
    assert f"--json {work / 'readonly' / 'scores.json'} cannot be written" in json_result["stderr"]
    assert reason in json_result["stderr"] and "LoRA layers" not in json_result["stdout"]


def test_unreadable_adapter_weights_are_reported_as_unreadable_not_missing(work):
    weights = work / "adapter" / "adapter_model.safetensors"
    deny_read = (
        "import builtins, errno, os\n"
        "real = builtins.open\n"
        "def guarded(path, *args, **kwargs):\n"
        f"    if os.fspath(path) == {str(weights)!r}:\n"
        "        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))\n"
        "    return real(path, *args, **kwargs)\n"
        "builtins.open = guarded\n"
    )
    result = splora("score", work / "adapter", "--base", work / "base", "--aligned", work / "aligned",
                    inject=deny_read)
    assert result.returncode == 2
    line = error_line(result.stderr, "score")
    assert f"{weights}: permission denied" in line and "No such file" not in line


# --- malformed inputs: one line naming the file and field ------------------------------------


def test_corrupt_and_malformed_inputs_are_named(work):
    adapter, base = work / "adapter", work / "base"
    variants = {}

    def variant(name: str, change) -> Path:
        target = work / name
        shutil.copytree(adapter, target / "adapter")
        shutil.copytree(base, target / "base")
        change(target)
        variants[name] = target
        return target

    weights = adapter / "adapter_model.safetensors"
    variant("truncated", lambda t: (t / "adapter/adapter_model.safetensors").write_bytes(weights.read_bytes()[:500]))
    variant("random", lambda t: (t / "adapter/adapter_model.safetensors").write_bytes(os.urandom(4096)))
    shard = base / "model.safetensors"
    variant("base_truncated", lambda t: (t / "base/model.safetensors").write_bytes(shard.read_bytes()[:-100]))
    variant("config_list", lambda t: (t / "adapter/adapter_config.json").write_text("[1, 2]"))
    variant("config_bad_json", lambda t: (t / "adapter/adapter_config.json").write_text('{"r": 4,'))

    def without_r(t: Path) -> None:
        config = json.loads((t / "adapter/adapter_config.json").read_text())
        del config["r"]
        (t / "adapter/adapter_config.json").write_text(json.dumps(config))

    variant("config_no_r", without_r)

    def index_without_weight_map(t: Path) -> None:
        (t / "base/model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))

    variant("index", index_without_weight_map)

    def rank_mismatch(t: Path) -> None:
        tensors = load_file(t / "adapter/adapter_model.safetensors")
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        tensors[key] = tensors[key][:, :2].contiguous()
        save_file(tensors, t / "adapter/adapter_model.safetensors")

    variant("rank", rank_mismatch)
    expected = {
        "truncated": f"{variants['truncated']}/adapter/adapter_model.safetensors is not a readable safetensors file",
        "random": f"{variants['random']}/adapter/adapter_model.safetensors is not a readable safetensors file",
        "base_truncated": f"{variants['base_truncated']}/base/model.safetensors is not a readable safetensors file",
        "config_list": "adapter_config.json holds a JSON list, not an object",
        "config_bad_json": "adapter_config.json is not valid JSON",
        "config_no_r": "adapter_config.json: field 'r' is missing",
        "index": "model.safetensors.index.json has no 'weight_map' object",
        "rank": ", 2) (rank 2); the ranks must match",
    }
    results = splora_many(*[["score", target / "adapter", "--base", target / "base", "--aligned", work / "aligned"]
                            for target in variants.values()])
    for name, result in zip(variants, results, strict=True):
        assert result["escaped"] is None, (name, result["escaped"])
        assert result["code"] == 2, (name, result["stderr"][-1000:])
        assert expected[name] in error_line(result["stderr"], "score"), name


def test_lora_on_embeddings_is_refused_not_skipped(work, llama_pair):
    model = add_lora(AutoModelForCausalLM.from_pretrained(llama_pair[1]), targets=["q_proj", "embed_tokens"])
    model.save_pretrained(work / "with-embeddings")
    (result,) = splora_many(["score", work / "with-embeddings", "--base", work / "base", "--aligned", work / "aligned"])
    assert result["escaped"] is None and result["code"] == 2
    assert "embed_tokens.lora_embedding_A" in result["stderr"] and "not a linear LoRA factor" in result["stderr"]


# --- selection: nothing, or everything --------------------------------------------------------


def test_pruning_every_layer_is_refused(work):
    result = splora(*prune_args(work, work / "pruned", "--top-k", "100"))
    assert result.returncode == 2
    assert "Pruning all 8 LoRA layers would leave nothing of the fine-tune" in error_line(result.stderr, "prune")
    assert "Use the aligned model itself" in result.stderr and not (work / "pruned").exists()
    (fraction,) = splora_many(prune_args(work, work / "pruned", "--fraction", "1"))
    assert fraction["code"] == 2 and "leave nothing of the fine-tune" in fraction["stderr"]


def test_why_no_layer_was_selected(work, llama_pair):
    inactive = add_lora(AutoModelForCausalLM.from_pretrained(llama_pair[1]))  # lora_B still zero
    inactive.save_pretrained(work / "untrained")
    base_only = ["--base", work / "base", "--aligned", work / "base"]  # V = 0 everywhere
    results = splora_many(
        prune_args(work, work / "out", "--top-k", "0"),
        prune_args(work, work / "out", "--fraction", "0.01"),
        prune_args(work, work / "out", "--threshold", "1000"),
        ["prune", work / "untrained", "--base", work / "base", "--aligned", work / "aligned", "--top-k", "2",
         "--output", work / "out"],
        ["prune", work / "adapter", *base_only, "--top-k", "2", "--output", work / "out"],
        prune_args(work, work / "out"),
    )
    expected = [
        "--top-k 0 selects none; pass --top-k 1 or more",
        "--fraction 0.01 of the 8 judgeable layers rounds to 0 layers; pass --fraction 0.0625 or more",
        "no layer has ediem > 1000.0 (the most suspect",
        "all 8 LoRA layers are inactive (lora_B is zero",
        "base and aligned weights are identical in all 8 adapted modules (V = 0)",
        "No layer selected: pass --top-k, --fraction or --threshold.",
    ]
    for result, message in zip(results, expected, strict=True):
        assert result["escaped"] is None and result["code"] == 2
        assert message in error_line(result["stderr"], "prune"), result["stderr"][-500:]
    assert not (work / "out").exists()


# --- splora report ------------------------------------------------------------------------------


def test_report_on_bad_json_or_on_the_file_itself(tmp_path):
    from splora_callback.report import build_report, write_json_report

    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "splora_report.json").write_text("[1, 2, 3]")
    report = build_report({"metric": "ediem"}, [], selected=[], action=None, status="finished", step=3)
    (tmp_path / "nohistory").mkdir()
    (tmp_path / "nohistory" / "splora_report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "history"}))
    good = write_json_report(tmp_path / "good", report)

    listed = splora("report", tmp_path / "list")
    assert listed.returncode == 2
    assert "splora_report.json is not a SPLoRA report (a JSON object" in error_line(listed.stderr, "report")
    missing, from_file = splora_many(["report", tmp_path / "nohistory"], ["report", good])
    assert missing["code"] == 2 and "field 'history' must be a list, found missing" in missing["stderr"]
    assert from_file["code"] == 0, from_file["stderr"][-1000:]
    assert (tmp_path / "good" / "splora_report.html").is_file()
