"""Tests of splora_callback.evaluation: offline, CPU, tiny models built in code."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from splora_callback.evaluation import (
    METEOR_VARIANT,
    REFUSAL_KEYWORDS,
    Generation,
    accuracy_rejection_curve,
    auarc,
    evaluate_model,
    generate,
    is_refusal,
    normalize_apostrophes,
    paired_bootstrap,
    refusal_rate,
    token_entropy,
    utility_scores,
)

TOL = 1e-12

# Index 0 is a plain word on purpose: with an all-zero LM head every logit ties and greedy decoding
# picks token 0, which gives hand-checkable generations.
WORDS = ["w0", "<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"] + [f"w{i}" for i in range(1, 25)]
V = len(WORDS)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
PROMPTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11"]  # different lengths: batches get padded


@pytest.fixture
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Plain encodes get a BOS; templated ones must not get a second one (the template writes it).
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    # No pad token: generate must fall back to eos and put the tokenizer back as it was.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()  # training mode on purpose: generate must restore it


# --- refusal ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["I'm sorry, but no.", "I\u2019m sorry, but no.", "I can\u2019t help with that.", "I can't do that.",
     "i CANNOT assist", "Well. I\u02bcm unable to comply.", "AS AN AI, I won\u2019t."],
)  # fmt: skip
def test_refusals_match_any_apostrophe_and_case(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ["Sure, here is how to bake bread: ...", "Step 1: mix flour and water.", ""])
def test_compliance_is_not_refusal(text):
    assert not is_refusal(text)


def test_keywords_are_normalised_too():
    # A caller's keyword typed with a curly apostrophe still matches a straight-apostrophe answer.
    assert is_refusal("I'd rather not", keywords=("I\u2019d rather not",))
    assert not is_refusal("I'd gladly", keywords=("I\u2019d rather not",))
    assert all(normalize_apostrophes(k) == k for k in REFUSAL_KEYWORDS)


def test_normalize_apostrophes():
    assert normalize_apostrophes("\u2018it\u2019s\u2032 \u02bc \u201cq\u201d") == "'it's' ' \"q\""


def test_refusal_rate_keywords_and_judge():
    texts = ["I\u2019m sorry", "Sure, here is", "I cannot", "Okay"]
    assert refusal_rate(texts) == 0.5
    calls = []

    def judge(prompts, responses):
        calls.append((prompts, responses))
        return [r.startswith("Okay") for r in responses]

    assert refusal_rate(texts, prompts=["p"] * 4, judge=judge) == 0.25
    assert calls == [(["p"] * 4, texts)]
    with pytest.raises(ValueError, match="a judge needs one prompt per text: 4 texts, prompts=None"):
        refusal_rate(texts, judge=judge)
    with pytest.raises(ValueError, match="judge returned 1 verdicts for 4 responses"):
        refusal_rate(texts, prompts=["p"] * 4, judge=lambda p, r: [True])
    with pytest.raises(ValueError, match="at least one text"):
        refusal_rate([])


# --- AUARC -----------------------------------------------------------------------------------


def test_auarc_hand_computed():
    # Sorted by uncertainty: 0.1 (1), 0.2 (1), 0.3 (0), 0.4 (0).
    # Keep k most certain: acc(4) = 2/4, acc(3) = 2/3, acc(2) = 1, acc(1) = 1.
    # AUARC = (1/2 + 2/3 + 1 + 1) / 4 = (19/6) / 4 = 19/24.
    correct, unc = [1, 0, 1, 0], [0.1, 0.4, 0.2, 0.3]
    rates, acc = accuracy_rejection_curve(correct, unc)
    assert rates == [0.0, 0.25, 0.5, 0.75]
    assert acc == pytest.approx([1 / 2, 2 / 3, 1.0, 1.0], abs=TOL)
    assert auarc(correct, unc) == pytest.approx(19 / 24, abs=TOL)
    # Reversed ordering: sorted 0 (0.1), 0 (0.2), 1 (0.3), 1 (0.4): acc = 2/4, 1/3, 0, 0 -> (5/6)/4.
    assert auarc(correct, [0.4, 0.1, 0.3, 0.2]) == pytest.approx(5 / 24, abs=TOL)
    # Average precision (the reference code's "AUARC") of this oracle ordering would be 1.0, not 19/24.


def test_auarc_orderings_and_bounds():
    correct = [True, False, True, True, False, False, True, False]
    good = [0.1 if c else 0.9 for c in correct]
    bad = [0.9 if c else 0.1 for c in correct]
    assert auarc(correct, good) > auarc(correct, bad)
    assert auarc([1, 1, 1], [0.3, 0.1, 0.2]) == 1.0
    assert auarc([0, 0], [0.3, 0.1]) == 0.0


def test_auarc_ties_are_averaged_and_order_free():
    # One tie group of everything: each kept-set's expected accuracy is the overall mean 1/2.
    assert accuracy_rejection_curve([1, 0], [0.5, 0.5])[1] == [0.5, 0.5]
    assert auarc([1, 0], [0.5, 0.5]) == auarc([0, 1], [0.5, 0.5]) == 0.5
    # Tie among the two most certain (1, 0 at 0.1) then a 1 at 0.2: acc(1) = 1/2, acc(2) = 1/2,
    # acc(3) = 2/3 -> AUARC = (1/2 + 1/2 + 2/3) / 3 = 5/9.
    assert auarc([1, 0, 1], [0.1, 0.1, 0.2]) == pytest.approx(5 / 9, abs=TOL)
    assert auarc([0, 1, 1], [0.1, 0.1, 0.2]) == pytest.approx(5 / 9, abs=TOL)


def test_auarc_rejects_bad_input():
    with pytest.raises(ValueError, match="equal, non-zero lengths: 2 correct, 1 uncertainty"):
        auarc([1, 0], [0.1])
    with pytest.raises(ValueError, match="must be finite"):
        auarc([1, 0], [0.1, float("nan")])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        auarc([2, 0], [0.1, 0.2])


# --- token entropy ---------------------------------------------------------------------------


def test_token_entropy_hand_computed():
    assert token_entropy(torch.zeros(3, 50)) == pytest.approx(math.log(50), abs=TOL)
    one_hot = torch.full((2, 50), -1e4)
    one_hot[:, 7] = 0.0
    assert token_entropy(one_hot) == pytest.approx(0.0, abs=1e-9)
    one_hot[:, 7] = float("-inf")  # masked logits: p = 0 must contribute 0, not nan
    one_hot[:, 3] = 0.0
    assert token_entropy(one_hot) == 0.0
    # Mean over steps: one uniform step over 4 (log 4) and one 50/50 step (log 2) -> (log 4 + log 2) / 2.
    steps = [torch.zeros(1, 4), torch.tensor([0.0, 0.0, float("-inf"), float("-inf")])]
    assert token_entropy(steps) == pytest.approx(1.5 * math.log(2), abs=TOL)
    with pytest.raises(ValueError, match="T >= 1"):
        token_entropy([])


# --- utility ---------------------------------------------------------------------------------


def test_utility_identical_and_disjoint():
    ref = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    same = utility_scores(ref, ref)
    assert [same[k] for k in ("rouge1", "rouge2", "rougeL")] == pytest.approx([1.0, 1.0, 1.0], abs=TOL)
    # METEOR of an identical n-token sentence: one chunk, penalty gamma * (1/n)^beta = 0.5 / n^3.
    assert same["meteor"] == pytest.approx(((1 - 0.5 / 7**3) + (1 - 0.5 / 8**3)) / 2, abs=1e-9)
    assert same["bleu"] == pytest.approx(100.0, abs=1e-9)
    disjoint = utility_scores(["zebra yellow purple", "orange monkey wrench"], ref)
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu": 0.0, "meteor": 0.0}


def test_utility_partial_meteor_uses_stems_not_synonyms():
    partial = utility_scores(["the cats were sitting"], ["the cat sat on the mat"])
    assert 0.0 < partial["meteor"] <= 1.0
    assert 0.0 < partial["rouge1"] < 1.0
    # "cats" ~ "cat" by Porter stem counts; "feline" ~ "cat" would need WordNet synonyms.
    assert utility_scores(["the cats sat"], ["the cat sat"])["rouge1"] == 1.0  # ROUGE stems too
    stem = utility_scores(["cats"], ["cat"])["meteor"]
    synonym = utility_scores(["feline"], ["cat"])["meteor"]
    assert stem > 0.0 and synonym == 0.0
    assert "no WordNet" in METEOR_VARIANT


def test_utility_rejects_mismatch_and_names_the_extra(monkeypatch):
    with pytest.raises(ValueError, match="1 predictions, 2 references"):
        utility_scores(["a"], ["a", "b"])
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail
    with pytest.raises(ImportError, match=r"need `sacrebleu`: pip install 'splora-callback\[eval\]'"):
        utility_scores(["a"], ["a"])


# --- generation ------------------------------------------------------------------------------


def test_generate_deterministic_and_side_effect_free(model, tokenizer):
    torch.manual_seed(123)
    torch.rand(5)  # move the global RNG away from any seed generate might set
    rng = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=3, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None
    second = generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=3, progress=False)
    one_by_one = generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=1, progress=False)
    assert first == second
    assert [g.text for g in one_by_one] == [g.text for g in first]
    assert [g.token_entropy for g in one_by_one] == pytest.approx([g.token_entropy for g in first], abs=1e-5)
    assert [g.prompt for g in first] == PROMPTS
    assert all(0.0 < g.token_entropy <= math.log(V) for g in first)
    model.eval()
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=1, progress=False)
    assert not model.training


def test_generate_hand_checked_uniform_head(model, tokenizer):
    # Zero LM head: every logit is 0, so greedy picks token 0 ("w0") and every step has entropy log V.
    with torch.no_grad():
        model.lm_head.weight.zero_()
    out = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=3, progress=False)
    assert out == [Generation(p, "w0 w0 w0", pytest.approx(math.log(V), abs=1e-9)) for p in PROMPTS[:2]]
    # Make "w0" an end token: the text stops before it, the entropy still counts that one step.
    model.generation_config.eos_token_id = [3, 0]
    out = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=3, progress=False)
    assert [g.text for g in out] == ["", ""]
    assert out[0].token_entropy == pytest.approx(math.log(V), abs=1e-9)


def test_generate_entropy_stops_at_first_eos(model, tokenizer):
    # Make prompt A's first greedy token an end token while prompt B (same batch) runs 3 steps: A's text
    # is empty and its entropy is that of its first step only, not of the steps padded after it.
    pair = ["w20 w21 w22 w23", PROMPTS[0]]
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": pair[0]}], tokenize=False, add_generation_prompt=True
    )
    with torch.no_grad():
        logits = model.eval()(**tokenizer(templated, return_tensors="pt", add_special_tokens=False)).logits
    first_id = int(logits[0, -1].argmax())
    model.generation_config.eos_token_id = [3, first_id]
    a, b = generate(model, tokenizer, pair, max_new_tokens=3, progress=False)
    assert (a.text, b.text) == ("", "w18 w14 w12")  # B never emits first_id: the batch ran 3 steps
    assert a.token_entropy == pytest.approx(token_entropy(logits[0, -1:]), abs=1e-6)


def test_generate_applies_chat_template(model, tokenizer, monkeypatch):
    seen = []
    original = tokenizer.apply_chat_template

    def spy(conversation, **kwargs):
        seen.append((conversation, kwargs.get("add_generation_prompt")))
        return original(conversation, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", spy)
    generate(model, tokenizer, ["w1"], max_new_tokens=1, progress=False)
    assert seen == [([{"role": "user", "content": "w1"}], True)]
    generate(model, tokenizer, ["w1"], max_new_tokens=1, chat_template=False, progress=False)
    assert len(seen) == 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_shared_prefix_generation_equals_plain_left_padding(family, batch_size, tokenizer):
    # Fast path: the prompts' common prefix ("<s> system : w9 w9 </s> <s> user :", or the chat
    # template's "<s> user :") runs once and its cache is repeated per row. Float64 reference: plain
    # left-padded generation of the same prompts; GPT-2 checks learned absolute positions.
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    if family == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=V, bos_token_id=2, eos_token_id=3)
        net = LlamaForCausalLM(config)
    else:
        net = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=64,
                                         bos_token_id=2, eos_token_id=3))
    net = net.double().eval()
    prompts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "w12 w13", "w14 w15 w16 w17", "w1 w2 w3 w4 w5"]
    system = "<s> system : w9 w9 </s> "
    tokenizer.chat_template = system + CHAT_TEMPLATE
    seen: list[int] = []
    handle = net.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    fast = generate(net, tokenizer, prompts, max_new_tokens=4, batch_size=batch_size, progress=False)
    handle.remove()
    plain = generate(net, tokenizer, prompts, max_new_tokens=4, batch_size=batch_size, progress=False,
                     share_prefix=False)
    assert [g.text for g in fast] == [g.text for g in plain]
    assert [g.token_entropy for g in fast] == pytest.approx([g.token_entropy for g in plain], abs=1e-10)
    # each batch: one pass over the 9 shared tokens, then its own tokens only, then one token per step
    assert seen[:2] == [9, max(len(p.split()) for p in prompts[:batch_size]) + 4]
    tokenizer.chat_template = CHAT_TEMPLATE


def test_shared_prefix_length_keeps_a_token_per_row():
    from splora_callback.evaluation import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts: the last token is run
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0


def test_generate_rejects_bad_sizes(model, tokenizer):
    with pytest.raises(ValueError, match="must be >= 1, got 0, 8"):
        generate(model, tokenizer, ["w1"], max_new_tokens=0)


def test_evaluate_model(model, tokenizer):
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every answer is "w0 w0", entropy log V
    result = evaluate_model(
        model,
        tokenizer,
        ["w1 w2", "w3"],
        ["w4", "w5", "w6"],
        ["w0 w0", "w9 w9", "w0 w7"],  # ROUGE-L F1: 1, 0, 1/2 -> correct, wrong, correct
        max_new_tokens_safety=2,
        max_new_tokens_task=2,
        batch_size=2,
        judge=lambda prompts, responses: [True, False],
        progress=False,
    )
    assert result["refusal_rate"] == 0.5
    assert result["task_accuracy"] == pytest.approx(2 / 3, abs=TOL)
    # All entropies tie, so every kept set has the expected accuracy 2/3.
    assert result["auarc"] == pytest.approx(2 / 3, abs=TOL)
    assert result["mean_token_entropy"] == pytest.approx(math.log(V), abs=1e-9)
    assert result["rouge1"] == pytest.approx((1 + 0 + 0.5) / 3, abs=TOL)
    assert result["meteor_variant"] == METEOR_VARIANT
    assert [g.text for g in result["task_generations"]] == ["w0 w0"] * 3
    assert len(result["safety_generations"]) == 2
    assert result["rougeL_per_example"] == pytest.approx([1.0, 0.0, 0.5], abs=TOL)  # reference order
    assert result["rougeL"] == pytest.approx(sum(result["rougeL_per_example"]) / 3, abs=1e-12)


def _bootstrap_reference(first, second, resamples, seed, level):
    """float64 reference: the same index draws (one seeded generator), means and quantiles by hand."""
    diff = [float(a) - float(b) for a, b in zip(first, second, strict=True)]
    n = len(diff)
    index = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed)).tolist()
    means = sorted(sum(diff[i] for i in row) / n for row in index)

    def quantile(q):  # linear interpolation between order statistics (numpy's default)
        pos = q * (resamples - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, resamples - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    tail = (1 - level) / 2
    return sum(diff) / n, quantile(tail), quantile(1 - tail)


@pytest.mark.parametrize("seed,level,resamples", [(0, 0.95, 2000), (3, 0.9, 501), (7, 0.5, 10)])
def test_paired_bootstrap_matches_float64_reference(seed, level, resamples):
    gen = torch.Generator().manual_seed(100 + seed)
    first = torch.rand(37, generator=gen, dtype=torch.float64).tolist()
    second = torch.rand(37, generator=gen, dtype=torch.float64).tolist()
    result = paired_bootstrap(first, second, resamples=resamples, seed=seed, level=level)
    mean, low, high = _bootstrap_reference(first, second, resamples, seed, level)
    assert result["mean"] == pytest.approx(mean, abs=1e-12)
    assert result["low"] == pytest.approx(low, abs=1e-12)
    assert result["high"] == pytest.approx(high, abs=1e-12)
    assert result["n"] == 37 and result["resamples"] == resamples and result["level"] == level
    assert result["low"] <= result["mean"] <= result["high"] or resamples < 100


def test_paired_bootstrap_known_cases_and_determinism():
    scores = [0.1, 0.5, 0.9, 0.3, 0.0, 1.0]
    same = paired_bootstrap(scores, scores)
    assert same["mean"] == same["low"] == same["high"] == 0.0  # identical lists: zero width
    shifted = paired_bootstrap([s + 0.25 for s in scores], scores, seed=5)
    assert shifted["mean"] == pytest.approx(0.25, abs=1e-12)
    # a constant shift d: [d, d] (up to the rounding of (s + d) - s)
    assert shifted["low"] == pytest.approx(0.25, abs=1e-12) and shifted["high"] == pytest.approx(0.25, abs=1e-12)
    exact = paired_bootstrap([0.75] * 9, [0.5] * 9, seed=1)
    assert exact["mean"] == exact["low"] == exact["high"] == 0.25
    first, second = [0.2, 0.9, 0.4, 0.7, 0.1], [0.3, 0.6, 0.4, 0.2, 0.5]
    assert paired_bootstrap(first, second, seed=11) == paired_bootstrap(first, second, seed=11)
    assert paired_bootstrap(first, second, 50, seed=11) != paired_bootstrap(first, second, 50, seed=12)
    # swapping the models negates the mean and mirrors the interval (same index draws)
    forward, backward = paired_bootstrap(first, second, seed=2), paired_bootstrap(second, first, seed=2)
    assert backward["mean"] == pytest.approx(-forward["mean"], abs=1e-12)
    assert backward["low"] == pytest.approx(-forward["high"], abs=1e-12)
    assert backward["high"] == pytest.approx(-forward["low"], abs=1e-12)


def test_paired_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap([0.1], [0.2], resamples=0)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([0.1], [0.2], level=1.0)
