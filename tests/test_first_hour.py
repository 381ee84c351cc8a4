"""What a new user meets in the first hour (issue 28): the card survives the Trainer's own card
writing and ``push_to_hub``, console lines start a line under tqdm, the end line says what was done
in the unit acted on (or, monitor-only, how far the model drifted), and no internal reference
("spec 3c", a ``docs/`` path a pip user does not have) reaches what users read."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from tiny import add_lora, llama_attention_names, save_pair, tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from splora_callback import SPLoRACallback
from splora_callback.model_card import BEGIN, END, PIPELINE_TAG, TAGS

INTERNAL = re.compile(r"\bspec \d|\(spec\b|\bdocs/[\w./-]+\.md|\.\./docs/")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base_dir, aligned_dir, _ = save_pair(tmp_path_factory.mktemp("pair"), tiny_llama, llama_attention_names)
    return base_dir, aligned_dir


def tokens(rows: int = 16, length: int = 12) -> Dataset:
    ids = torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def word_tokenizer(folder: Path):
    """A word-level tokenizer whose 128 ids fit the tiny model, with a chat template (TRL wants one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(125)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                        pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} <eos> {% endfor %}"
    tokenizer.save_pretrained(folder)
    return tokenizer


class FakeHub:
    """``transformers.trainer.hf_api()``: records the card each upload would send."""

    def __init__(self):
        self.cards: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"user/{Path(repo_id).name}")

    def upload_folder(self, *, folder_path, **kwargs):
        self.cards.append((Path(folder_path) / "README.md").read_text())
        return "https://huggingface.co/user/x/commit/0"


def assert_splora_card(text: str, aligned_dir: Path) -> None:
    card = ModelCard(text)
    assert card.text.count(BEGIN) == 1 and card.text.count(END) == 1, card.text[:400]
    assert card.text.index(BEGIN) < 40  # ours first, the trainer's text below
    assert card.data.base_model == str(aligned_dir)
    assert card.data.library_name == "peft" and card.data.pipeline_tag == PIPELINE_TAG
    assert set(TAGS) <= set(card.data.tags) and f"base_model:adapter:{aligned_dir}" in card.data.tags
    assert "2 of 8 LoRA layers removed" in card.text


def callback(pair) -> SPLoRACallback:
    return SPLoRACallback(base_model=str(pair[0]), metric="ediem", select="top_k", k=2, action="prune",
                          score_every_n_steps=2)


def test_trainer_create_model_card_and_push_to_hub_keep_the_splora_card(pair, tmp_path, monkeypatch):
    import transformers.trainer

    torch.manual_seed(0)
    trainer = Trainer(model=add_lora(LlamaForCausalLM.from_pretrained(pair[1])), train_dataset=tokens(),
                      callbacks=[callback(pair)],
                      args=TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()  # alone, it writes "More information needed" over the card
    text = (tmp_path / "out" / "README.md").read_text()
    assert_splora_card(text, pair[1])
    assert "More information needed" in text  # the Trainer's own text is kept, below ours
    html = (tmp_path / "out" / "splora_report.html").read_text()
    for shown in (text, html):  # what users read explains itself: no "spec 3c", no docs/ path of a clone
        assert not INTERNAL.search(shown), INTERNAL.search(shown)
    assert "Pruned 2 of 8 LoRA layers" in html
    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer.push_to_hub()
    assert len(hub.cards) == 1
    assert_splora_card(hub.cards[0], pair[1])


def test_sft_trainer_create_model_card_and_push_to_hub_keep_base_model_and_the_card(pair, tmp_path, monkeypatch):
    import transformers.trainer
    from trl import SFTConfig, SFTTrainer

    tokenizer = word_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    trainer = SFTTrainer(model=add_lora(LlamaForCausalLM.from_pretrained(pair[1])), processing_class=tokenizer,
                         train_dataset=tokens().remove_columns("labels"), callbacks=[callback(pair)],
                         args=SFTConfig(str(tmp_path / "out-sft"), max_steps=2, per_device_train_batch_size=4,
                                        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                        bf16=False))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()  # TRL's replaces the whole card, without base_model for a local model
    text = (tmp_path / "out-sft" / "README.md").read_text()
    assert_splora_card(text, pair[1])
    assert "sft" in ModelCard(text).data.tags  # TRL's metadata is merged, not dropped
    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer.push_to_hub()
    assert len(hub.cards) == 1
    assert_splora_card(hub.cards[0], pair[1])


SCRIPT = textwrap.dedent("""
    import sys, torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments
    sys.path.insert(0, {tests!r})
    from tiny import add_lora
    from splora_callback import SPLoRACallback

    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({{"input_ids": ids.tolist(), "labels": ids.tolist()}})
    torch.manual_seed(0)
    callback = SPLoRACallback(base_model={base!r}, score_every_n_steps=2)  # no probe: monitor only
    trainer = Trainer(model=add_lora(LlamaForCausalLM.from_pretrained({aligned!r})), train_dataset=data,
                      callbacks=[callback],
                      args=TrainingArguments({out!r}, max_steps=4, per_device_train_batch_size=4, report_to=[],
                                             use_cpu=True, save_strategy="no", disable_tqdm=False))
    trainer.train()
""")


def visible_lines(stream: str) -> list[str]:
    """What a terminal shows: each line with its carriage returns applied (later text over earlier)."""
    lines = []
    for raw in stream.split("\n"):
        screen = ""
        for part in raw.split("\r"):
            screen = part + screen[len(part):]
        lines.append(screen.rstrip())
    return lines


def test_console_lines_start_a_line_under_the_trainers_progress_bar_and_monitor_only_ends_with_a_verdict(
        pair, tmp_path):
    script = SCRIPT.format(tests=str(Path(__file__).parent), base=str(pair[0]), aligned=str(pair[1]),
                           out=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = done.stderr
    assert "it/s]SPLoRA" not in raw and "s/it]SPLoRA" not in raw
    lines = visible_lines(raw)
    end = [line for line in lines if "SPLoRA: " in line and "adapter:" in line]
    assert len(end) == 1 and end[0].startswith("SPLoRA: "), end
    line = end[0]
    # monitor only: nothing changed, said so; how far it drifted; where the report is
    assert line.startswith("SPLoRA: monitor only, nothing changed")
    assert "most drift from alignment (E-DIEM): " in line and "no safety probe" in line
    assert f"report {tmp_path / 'out' / 'splora_report.html'}" in line
    assert "SPLoRA none:" not in raw  # the action 'none' no longer reads as if something acted
    assert not INTERNAL.search(raw), INTERNAL.search(raw)


# --- the CLI: every hint names a flag of the command that prints it ---------------------------------

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*[a-z](?![\w-])")  # a flag argparse wrapped at its hyphen is skipped


def command_flags() -> dict[str, set[str]]:
    """Each `splora` command's own options (the top-level parser's under "")."""
    from splora_callback.cli import build_parser

    parser = build_parser()
    (sub,) = [action for action in parser._actions if hasattr(action, "choices") and isinstance(action.choices, dict)]
    flags = {"": {option for action in parser._actions for option in action.option_strings}}
    for name, command in sub.choices.items():
        flags[name] = {option for action in command._actions for option in action.option_strings}
    return flags


def foreign_flags(text: str, command: str, flags: dict[str, set[str]]) -> set[str]:
    """Flags in ``text`` that ``command`` does not accept; a line naming `splora OTHER` (and the lines
    continuing it) may use OTHER's flags."""
    bad, current = set(), [command]
    for line in text.splitlines():
        named = re.findall(r"splora (score|prune|report)\b", line)
        if named:
            current = named
        elif not line.startswith("    "):
            current = [command]
        allowed = set().union(*(flags[name] for name in current)) | flags[command]
        bad |= {flag for flag in FLAG.findall(line) if flag not in allowed}
    return bad


def run_cli(argv: list, capsys) -> tuple[int, str]:
    from splora_callback.cli import main

    try:
        code = main([str(item) for item in argv])
    except SystemExit as error:
        code = error.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def saved_adapter(planted_llama, tmp_path):
    model, base_dir, aligned_dir, _ = planted_llama
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", base_dir, aligned_dir


def test_every_cli_help_names_only_its_own_flags_and_no_internal_reference(capsys):
    flags = command_flags()
    for command in ("", "score", "prune", "report"):
        code, text = run_cli([command, "--help"] if command else ["--help"], capsys)
        assert code == 0
        assert not foreign_flags(text, command, flags), (command, foreign_flags(text, command, flags))
        assert not INTERNAL.search(text), (command, INTERNAL.search(text))
        # a shell line continuation in an example is printed, not eaten by the Python string
        assert all(line.rstrip().endswith("\\") for line in text.splitlines() if "task.jsonl" in line)


def test_cli_hints_name_flags_the_command_accepts_and_base_comes_from_the_aligned_card(saved_adapter, tmp_path,
                                                                                         capsys):
    adapter, base_dir, aligned_dir = saved_adapter
    flags = command_flags()
    card = aligned_dir / "README.md"
    card_before = card.read_text() if card.exists() else None
    try:
        if card.exists():
            card.unlink()
        for command, argv in (("score", ["score", adapter, "--aligned", aligned_dir]),
                              ("prune", ["prune", adapter, "--aligned", aligned_dir, "--top-k", "1",
                                         "--output", tmp_path / "pruned"]),
                              ("score", ["score", adapter, "--aligned", aligned_dir, "--base", base_dir,
                                         "--select", "repair"]),
                              ("prune", ["prune", adapter, "--aligned", aligned_dir, "--base", base_dir,
                                         "--top-k", "0", "--output", tmp_path / "pruned"])):
            code, text = run_cli(argv, capsys)
            assert code != 0 or command == "score", text
            assert FLAG.search(text), text  # a hint was given
            assert not foreign_flags(text, command, flags), (argv, text)
        # ALIGNED's card names its base: --base is not needed, and the CLI says where BASE came from
        card.write_text(f"---\nbase_model: {base_dir}\n---\n\n# aligned\n")
        code, text = run_cli(["score", adapter, "--aligned", aligned_dir, "--top-k", "2"], capsys)
        assert code == 0, text
        assert f"BASE: {base_dir} (from model card {card}" in text and "SELECTED" in text
    finally:
        card.unlink(missing_ok=True)
        if card_before is not None:
            card.write_text(card_before)


def test_prune_with_probe_prompts_prints_the_probe_scores_not_a_table_of_dashes(saved_adapter, tmp_path, capsys):
    adapter, _, aligned_dir = saved_adapter
    folder = tmp_path / "aligned-with-tokenizer"
    import shutil

    shutil.copytree(aligned_dir, folder)
    word_tokenizer(folder)
    prompts = tmp_path / "probe.jsonl"
    prompts.write_text("".join(f'{{"prompt": "w{i} w{i + 1} w{i + 2}", "refusal": "w9 w8"}}\n' for i in range(4)))
    code, text = run_cli(["prune", adapter, "--aligned", folder, "--probe-prompts", prompts, "--top-k", "2",
                          "--output", tmp_path / "pruned"], capsys)
    assert code == 0, text
    header = next(line for line in text.splitlines() if line.startswith("layer "))
    assert "probe" in header.split() and "E-DIEM" not in header.split()  # no --base: no geometry column
    rows = [line for line in text.splitlines() if line.startswith("base_model.") or ".self_attn." in line]
    assert rows and all(re.search(r"[+-]\d\.\d{4}", row) for row in rows), rows[:3]


def test_results_count_the_unit_acted_on_and_a_rule_with_its_own_stop_has_no_fraction():
    sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
    import results

    repair = {"rule": "component_repair", "control": None, "fraction": 0.25, "n_layers": 3,
              "layers": [["l0.q_proj", 0], ["l0.q_proj", 1], ["l1.v_proj", 0]]}
    assert results.acted_cell(repair) == "3 components (2 layers)"
    assert results.acted_cell({**repair, "layers": []}) == "0 components"
    assert results.sweep_label(repair) == "own stop"
    ediem = {"rule": "ediem", "control": None, "fraction": 0.25, "n_layers": 30, "layers": ["x"] * 30}
    assert results.acted_cell(ediem) == "30 layers" and results.sweep_label(ediem) == "25%"
    assert results.selected_words({"l0.q_proj": [0, 1]}, {"granularity": "component"}) == \
        "2 rank-one components of 1 layer"
    assert results.selected_words(["l0.q_proj"], {"granularity": "layer"}) == "1 layer"
    # results.json's callback record: the report's `selected` names layers, the action holds the components
    callback = {"selected": ["l0.q_proj", "l1.v_proj"], "action": {"components": {"l0.q_proj": [0, 1], "l1.v_proj": [3]}}}
    assert results.selected_words(results.callback_choice(callback), {"granularity": "component"}) == \
        "3 rank-one components of 2 layers"
    assert results.callback_choice({"selected": ["l0.q_proj"], "action": {"action": "prune"}}) == ["l0.q_proj"]
    # a patch selects nothing: its rows and the callback's sentence say the LoRA was patched, not "0 layers"
    patch_row = {"rule": "rate_patch", "control": None, "fraction": 0.25, "n_layers": 0, "layers": [], "acted": "0 layers"}
    assert results.acted_cell(patch_row) == results.acted_words(patch_row) == "the LoRA, patched"
    assert results.sweep_label(patch_row) == "-" and results.acted_words({"rule": "ediem", "acted": "30 layers", "n_layers": 30}) == "30 layers"
    patched = {"selected": ["l0.q_proj"], "config": {"metric": "probe", "select": "fraction", "action": "patch"},
               "action": {"action": "patch", "patch": {"steps": 2, "pairs": 20, "anchors": 4, "factors": "A",
                                                       "refusal_rate_by_step": [0.0, 0.5, 0.95],
                                                       "target_refusal_rate": 0.85, "aligned_refusal_rate": 0.95}}}
    sentence = results.callback_sentence(patched, {"callback_adapter_max_abs_diff": 0.0})
    assert "patched the LoRA (lora_A): 2 steps on 20 refusal pairs + 4 benign anchors" in sentence and "chose" not in sentence
    assert sentence.endswith("largest |difference| from `adapter/` 0.")
    assert results.verdict_table([{"label": "patch", "rule": "rate_patch", "n_layers": 0, "fraction": 0.25,
                                   "refusal_rate": 0.9, "kind_matched": None, "beats_kind_matched": False,
                                   "uniform": {"mean": 0.04, "min": 0.0, "max": 0.1}, "beats_uniform": True,
                                   "rougeL": 0.7, "rougeL_kind_matched": None}]).splitlines()[-1] == \
        "| patch | the LoRA, patched (-) | 0.900 | - | 0.040 [0.000, 0.100] | - | yes | 0.700 / - |"


def test_the_wheel_and_sdist_declare_the_license_file():
    """pyproject declares LICENSE as a license file (setuptools puts it in the wheel's
    dist-info/licenses/ and in the sdist; checked with `python -m build` and a clean venv, where
    `splora --help` runs with no dependency installed) and the license as an SPDX expression."""
    import tomllib

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"] and (root / "LICENSE").is_file()
    assert "Apache License" in (root / "LICENSE").read_text()[:200]
    assert any(req.startswith("setuptools>=77") for req in project["build-system"]["requires"])  # license-files


def test_the_end_line_says_why_a_repair_changed_nothing_and_counts_components_when_it_did():
    from splora_callback.trackers import final_line

    layers = [{"name": f"model.layers.{i}.self_attn.v_proj", "kind": "v_proj", "ediem": float(i)} for i in range(4)]
    report = {"action": {"action": "prune", "layers": []}, "config": {"metric": "probe", "select": "repair"},
              "repair": {"measured_stop": {"reason": "refusal restored"}},
              "history": [{"step": 2, "scores": {"layers": layers, "losses": {"refusal": 1.088}}}],
              "safety": {"aligned_refusal_loss": 1.092}}
    line = final_line(report, Path("out/splora_report.html"), "as trained")
    assert line.startswith("SPLoRA: nothing changed (the repair rule chose nothing: the refusal loss is already "
                           "within the repair's target, nothing to undo); refusal loss 1.088 (aligned 1.092)")
    assert "most drift from alignment (E-DIEM): 3.self_attn.v_proj +3.00" in line
    from splora_callback.model_card import card_block, facts_from_report

    assert ("`prune`: nothing changed (the selection rule chose nothing: the refusal loss is already within the "
            "repair's target, nothing to undo)") in card_block(facts_from_report(report, None))
    report["action"] = {"action": "prune", "layers": [layers[0]["name"], layers[1]["name"]],
                        "components": {layers[0]["name"]: [0, 2], layers[1]["name"]: [1]}}
    line = final_line(report, None, "x")
    assert line.startswith("SPLoRA: removed 3 rank-one components from 2 of 4 LoRA layers (v_proj 2) by probe repair")
    assert "most drift" not in line


def test_the_repair_command_a_failed_action_logs_uses_only_splora_prune_flags():
    import shlex

    from splora_callback import SPLoRAConfig
    from splora_callback.acting import repair_command

    prune = command_flags()["prune"]
    for config in (SPLoRAConfig(base_model="b", select="top_k", k=3, action="prune"),
                   SPLoRAConfig(base_model="b", select="fraction", fraction=0.25, action="project"),
                   SPLoRAConfig(base_model="b", probe=object(), select="repair"),  # the measured repair
                   SPLoRAConfig(base_model="b", probe=object(), select="budget", budget=0.05)):
        command = repair_command(config, "out", "org/chat")
        flags = [part for part in shlex.split(command) if part.startswith("--")]
        assert flags and set(flags) <= prune, (command, set(flags) - prune)
    patch = repair_command(SPLoRAConfig(base_model="b", probe=object()), "out", "org/chat")  # the default: the patch
    assert "from_pretrained('org/chat'), 'out')" in patch and "safety_patch(model, probe" in patch
    assert "save_pretrained('out-patched')" in patch
    assert "lr=0.0004, max_steps=40, stop='refusal_rate', restore=1.0, factors='A', anchors=4" in patch and "DEFAULT_ANCHOR_REQUESTS" in patch
    own = repair_command(SPLoRAConfig(base_model="b", probe=object(), benign_prompts=["Bake bread."], patch_lr=1e-4),
                         "out", "org/chat")
    assert "lr=0.0001" in own and "BENIGN_PROMPTS" in own  # the user's own anchors and settings, not the defaults
    import ast

    ast.parse(own.removeprefix("in Python, "))  # lines a user can paste
