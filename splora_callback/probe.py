"""Safety-probe attribution (spec 3b): which LoRA layers lower the loss of refusing harmful prompts.

With ``L`` = the mean token loss of refusal responses to harmful prompts (response tokens only,
eval mode, LoRA dropout off), removing layer l's update ``dW = s B A`` changes ``L`` by
``-<dL/dW_eff, dW>_F`` to first order, and

    probe[l] = <dL/dW_eff[l], s B A>_F = <dL/dA[l], A[l]>_F = <dL/dB[l], B[l]>_F.

Higher ``probe[l]`` = removing the update lowers the refusal loss more = more suspect.

Computed in its activation form: with ``y_t = A x_t`` the output of ``lora_A`` at token t,
``dL/dA = sum_t (dL/dy_t) x_t^T``, so ``<dL/dA, A>_F = sum_t <dL/dy_t, y_t>``. Forward hooks keep
the ``lora_A`` outputs (b, T, r) and ``torch.autograd.grad`` differentiates the loss with respect to
them: no parameter is read, so sharded parameters (FSDP, ZeRO-3) need no gather, and no ``.grad``
field, ``requires_grad`` flag, optimizer or base-weight gradient is touched. Under
``torch.distributed`` each rank scores its slice of the probe set and only one scalar per layer (plus
a token count) is all-reduced. The passes themselves (the teacher-forced loss, its fp32 sum, the
hooks) are ``teacher_forced.py``'s; this module holds the probe sets and the split over ranks.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from . import processes
from .data import (
    IGNORE_INDEX,
    REFUSAL_TEMPLATES,
    assert_disjoint,
    load_harmbench_behaviors,
    pad_batch,
    render_chat_examples,
)
from .sharding import lora_layers, unwrap_parallel
from .teacher_forced import SliceAttribution, attribute_slice, model_device, preserved_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True, repr=False)
class ProbeSet:
    """A tokenised probe set: prompts with target responses, loss on the responses only.

    Use its two kinds: :class:`SafetyProbe` (harmful prompts, refusals) and :class:`UtilityProbe`
    (task prompts, the task's answers).

    Attributes:
        input_ids: (N, T) int64 token ids, padded (right padding from :meth:`from_pairs`).
        attention_mask: (N, T), 0 on padding.
        labels: (N, T) int64, ``IGNORE_INDEX`` (-100) on prompt and padding tokens; HF convention
            (``labels[:, t]`` is the target of the logits at ``t - 1``).
        prompts: the harmful prompts, when known (reports show them; never use evaluation prompts).
        batch_size: examples per forward/backward micro-batch (memory, not result).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompts: tuple[str, ...] | None = None
    batch_size: int = 8

    response_name: ClassVar[str] = "response"  # what the responses are, in messages

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.input_ids must be (N, T) with N >= 1, got shape {shape}.")
        for name in ("attention_mask", "labels"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{type(self).__name__}.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}.")
        if self.prompts is not None and len(self.prompts) != shape[0]:
            raise ValueError(f"{type(self).__name__}.prompts has {len(self.prompts)} entries for {shape[0]} examples.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"{type(self).__name__}.batch_size={self.batch_size!r}: must be an integer >= 1.")
        if ((self.labels != IGNORE_INDEX) & (self.attention_mask == 0)).any():
            raise ValueError(f"{type(self).__name__}.labels: padding tokens (attention_mask 0) must be labelled -100.")
        if self.response_tokens == 0:
            raise ValueError(f"{type(self).__name__}.labels: no response token (every label is -100); nothing to probe.")

    @classmethod
    def from_tensors(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
        prompts: Sequence[str] | None = None, batch_size: int = 8,
    ) -> ProbeSet:
        """A probe from tensors tokenised by the user ((N, T) each, labels -100 outside responses).

        Right padding is safest: with left padding, models that number positions by column see
        shifted positions for the padded rows.
        """
        return cls(
            input_ids.detach().to("cpu", torch.long), attention_mask.detach().to("cpu", torch.long),
            labels.detach().to("cpu", torch.long), None if prompts is None else tuple(prompts), batch_size,
        )

    @classmethod
    def from_pairs(
        cls, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_length: int = 256, batch_size: int = 8,
    ) -> ProbeSet:
        """A probe from (prompt, response) pairs: (harmful prompt, refusal) for a
        :class:`SafetyProbe`, (task prompt, task answer) for a :class:`UtilityProbe`.

        With a chat template: user turn = prompt, assistant turn = refusal (the template's end of turn
        included in the loss). Without one: ``prompt + "\\n"`` then ``refusal + eos`` (warned).
        Labels mask the prompt part; responses longer than ``max_length`` tokens are cut.

        Raises:
            ValueError: no pairs, a pair that is not two strings, or a prompt filling ``max_length``.
        """
        pairs = list(pairs)
        if not pairs:
            raise ValueError(f"{cls.__name__}.from_pairs: pairs is empty; pass [(prompt, {cls.response_name}), ...].")
        for pair in pairs:
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(text, str) for text in pair):
                raise ValueError(f"{cls.__name__}.from_pairs: expected (prompt, {cls.response_name}) strings, got {pair!r}.")
        if getattr(tokenizer, "chat_template", None):
            examples = render_chat_examples(tokenizer, pairs, max_length)
        else:
            logger.warning("Tokenizer has no chat template: probing with plain 'prompt\\nrefusal<eos>' text.")
            examples = _render_plain(tokenizer, pairs, max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = pad_batch(examples, 0 if pad_id is None else pad_id)
        return cls(batch["input_ids"], batch["attention_mask"], batch["labels"],
                   tuple(prompt for prompt, _ in pairs), batch_size)

    @classmethod
    def from_dataset(
        cls, dataset: Any, collate_fn: Any, n: int = 32, *, seed: int = 0, batch_size: int = 8,
    ) -> ProbeSet:
        """A probe of ``n`` examples of a map-style dataset (a seeded sample, local RNG), tokenised by
        ``collate_fn`` (e.g. the Trainer's data collator) into ``input_ids``, ``attention_mask``,
        ``labels``. Fewer than ``n`` rows: all of them.

        Raises:
            ValueError: the dataset has no length / is empty, or the collated batch lacks labels.
        """
        if not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise ValueError(f"{cls.__name__}.from_dataset: needs a non-empty map-style dataset (with a length).")
        rows = sorted(random.Random(seed).sample(range(len(dataset)), min(n, len(dataset))))
        batch = collate_fn([dataset[row] for row in rows])
        missing = [key for key in ("input_ids", "labels") if key not in batch]
        if missing:
            raise ValueError(
                f"{cls.__name__}.from_dataset: the collated batch has no {missing}; use a collator that returns "
                "input_ids and labels (-100 outside the responses), e.g. DataCollatorForSeq2Seq."
            )
        mask = batch.get("attention_mask")
        mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
        return cls.from_tensors(batch["input_ids"], mask, batch["labels"], batch_size=batch_size)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_tokens(self) -> int:
        """Number of tokens whose loss enters ``L`` (labels shifted by one, as the model sees them)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for reports: sizes and the probe prompts (None if tokenised by the user)."""
        return {
            "examples": len(self),
            "response_tokens": self.response_tokens,
            "max_tokens": int(self.input_ids.shape[1]),
            "batch_size": self.batch_size,
            "prompts": None if self.prompts is None else list(self.prompts),
        }

    def __repr__(self) -> str:
        source = "user tensors" if self.prompts is None else f"first prompt {self.prompts[0][:40]!r}"
        return f"{type(self).__name__}({len(self)} examples, {self.response_tokens} response tokens, {source})"

    def check_disjoint(self, evaluation_prompts: Sequence[str]) -> None:
        """Raise ``ValueError`` if a probe prompt is also an evaluation prompt (spec 3b).

        Raises:
            ValueError: prompts overlap, or the probe has no prompts to compare (``from_tensors``).
        """
        if self.prompts is None:
            raise ValueError("This probe was built from tensors: pass prompts= to from_tensors to check it.")
        assert_disjoint(probe=self.prompts, evaluation=list(evaluation_prompts))

    def attribute(self, model: nn.Module, adapter_name: str | None = None) -> dict[str, float]:
        """``probe[l]`` for every LoRA layer of ``adapter_name``: module name -> float (spec 3b).

        ``run(model, adapter_name).layers``; see :meth:`run`.
        """
        return self.run(model, adapter_name).layers

    def run(self, model: nn.Module, adapter_name: str | None = None) -> ProbeAttribution:
        """One forward/backward pass over the probe set: its mean loss, ``probe[l]`` and every
        layer's r x r interaction ``M`` (spec 3b, 3c).

        Names are those of :func:`~splora_callback.layers.lora_updates_from_model`. The model's
        training modes, ``requires_grad`` flags, ``.grad`` fields and the global torch/CUDA RNG
        states are as before afterwards. Under ``torch.distributed`` every rank must call this
        with the same probe; each rank computes its slice and the result is the same everywhere.
        ``model`` may be wrapped in DDP, FSDP (v1 or v2) or a DeepSpeed ZeRO-3 engine (tested on 2
        gloo processes). Under ZeRO-3 the ``lora_A`` weights of the first adapted modules (those
        whose own backward is not needed) stay gathered until the next training step releases them.

        Raises:
            ValueError: the adapter is not active in some layer, or grad is impossible
                (``torch.inference_mode``).
            UnsupportedAdapterError: DoRA and other variants (see ``layers.check_supported``).
        """
        module = unwrap_parallel(model)  # DDP / DeepSpeed engine off; an FSDP root stays (it gathers)
        layers = lora_down_projections(module, adapter_name)
        world = processes.world_size()
        rows = slice(processes.rank(), None, world)  # strided rows, as before (split_between_processes: blocks)
        # the same number of passes on every rank: a sharded model gathers inside each one
        passes = math.ceil(math.ceil(len(self) / world) / self.batch_size) if world > 1 else None
        with preserved_state(module):
            part = attribute_slice(
                module, self.input_ids[rows], self.attention_mask[rows], self.labels[rows], layers,
                batch_size=self.batch_size, normalizer=self.response_tokens, passes=passes,
            )
        if world > 1:
            part = _all_reduce(part, model_device(module))
        if part.tokens != self.response_tokens:  # every rank must hold the same probe
            raise RuntimeError(
                f"Probe slices covered {part.tokens} response tokens, the probe has {self.response_tokens}: "
                "under torch.distributed every rank must call attribute() with the same probe."
            )
        return ProbeAttribution(
            loss=part.loss,
            layers={name: float(value) for name, value in zip(layers, part.sums.tolist(), strict=True)},
            interactions=dict(zip(layers, part.interactions, strict=True)),
        )


@dataclass(frozen=True, repr=False)
class SafetyProbe(ProbeSet):
    """Harmful prompts with refusal responses: ``L`` = the refusal loss (spec 3b).

    ``probe[l] > 0`` (and a component's ``a_i > 0``): removing that update lowers the refusal loss,
    i.e. it is suspect.
    """

    response_name: ClassVar[str] = "refusal"


@dataclass(frozen=True, repr=False)
class UtilityProbe(ProbeSet):
    """Task prompts with the task's answers: ``L`` = the task loss (spec 3c).

    Its raw attributions have the safety probe's sign convention; the scores report them turned,
    ``utility = -attribution``, so that ``utility > 0`` means removing the update raises the task
    loss (a component the fine-tune learned for the task).
    """


class ProbeAttribution(NamedTuple):
    """One probe pass over a model: the loss and its attribution to every LoRA layer.

    Attributes:
        loss: mean token loss of the probe's responses (nats).
        layers: module name -> ``tr(M)`` (spec 3b; the probe's ``attribute()``).
        interactions: module name -> (r, r) float64 ``M`` (spec 3c).
    """

    loss: float
    layers: dict[str, float]
    interactions: dict[str, torch.Tensor]


def lora_down_projections(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Module]:
    """Module name -> the ``lora_A`` module (``Linear(n, r)``, possibly FSDP-wrapped), in module order.

    Names as :func:`~splora_callback.layers.lora_updates_from_model` gives them, whatever the wrapper
    (:func:`~splora_callback.sharding.lora_layers`).

    Raises:
        ValueError: the adapter is disabled or not active in a layer (its update would not be in
            the forward pass, so its attribution would be a silent zero).
        NoLoraLayersError, UnsupportedAdapterError: no LoRA layer; DoRA and other variants.
    """
    adapter, layers = lora_layers(model, adapter_name)
    for name, layer in layers:
        if layer.disable_adapters or adapter not in layer.active_adapters:
            raise ValueError(
                f"{name}: adapter {adapter!r} is not active (active: {list(layer.active_adapters)}, "
                f"disabled: {layer.disable_adapters}); call model.set_adapter({adapter!r}) first."
            )
    return {name: layer.lora_A[adapter] for name, layer in layers}


def probe_pairs(
    prompts: Sequence[str], *, seed: int, templates: Sequence[str] = REFUSAL_TEMPLATES
) -> list[tuple[str, str]]:
    """(prompt, refusal) pairs, one template per prompt drawn with ``random.Random(seed)``.

    With the default templates this equals :func:`splora_callback.data.refusal_pairs`.
    """
    if not templates:
        raise ValueError("probe_pairs: templates is empty.")
    rng = random.Random(seed)
    return [(prompt, rng.choice(templates)) for prompt in prompts]


def harmbench_probe(
    tokenizer: Any, n: int = 40, *, seed: int = 0, exclude: Sequence[str] = (), max_length: int = 256,
    batch_size: int = 8, templates: Sequence[str] = REFUSAL_TEMPLATES,
) -> SafetyProbe:
    """A probe of ``n`` HarmBench standard behaviors (seeded) with templated refusals.

    Args:
        exclude: prompts that must not be probes (the evaluation prompts, spec 3b).

    Raises:
        ImportError: HarmBench's package is missing; the message gives the install command.
        ValueError: fewer than ``n`` prompts remain after ``exclude``.
    """
    behaviors = load_harmbench_behaviors("standard")
    pool = sorted(set(behaviors) - set(exclude))
    if n < 1 or n > len(pool):
        raise ValueError(
            f"harmbench_probe: n={n} but {len(pool)} of {len(set(behaviors))} HarmBench standard prompts "
            f"remain after excluding {len(set(exclude))}; probes must not overlap evaluation prompts, "
            "so ask for fewer."
        )
    prompts = random.Random(seed).sample(pool, n)
    return SafetyProbe.from_pairs(
        tokenizer, probe_pairs(prompts, seed=seed, templates=templates), max_length=max_length,
        batch_size=batch_size,
    )


def _render_plain(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """``render_chat_examples`` for tokenizers without a chat template: prompt + newline, refusal + eos."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    examples = []
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt + "\n")["input_ids"]
        if len(prompt_ids) >= max_length:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, max_length is {max_length}: {prompt[:80]!r}")
        response_ids = (tokenizer(response, add_special_tokens=False)["input_ids"] + eos)[: max_length - len(prompt_ids)]
        examples.append({
            "input_ids": prompt_ids + response_ids,
            "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        })
    return examples


def _all_reduce(part: SliceAttribution, device: torch.device) -> SliceAttribution:
    """Sum the per-layer shares, r x r interactions, loss and token count over ranks: one float64
    all-reduce of (layers + sum r^2 + 2,) numbers.

    No gradient is communicated. NCCL needs the tensor on the GPU; gloo takes CPU tensors.
    """
    on = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    flat = [matrix.reshape(-1) for matrix in part.interactions]
    scalars = torch.tensor([part.loss, part.tokens], dtype=torch.float64)
    packed = processes.all_reduce_sum(torch.cat([part.sums, *flat, scalars]).to(on)).cpu()
    layers = part.sums.numel()
    sums, rest = packed[:layers], packed[layers:]
    interactions = []
    for matrix in part.interactions:
        interactions.append(rest[: matrix.numel()].reshape(matrix.shape).clone())
        rest = rest[matrix.numel():]
    return SliceAttribution(sums, int(rest[1]), interactions, float(rest[0]))
