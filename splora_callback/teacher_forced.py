"""The probe's teacher-forced loss, and its attribution to the LoRA layers: one home for both.

A probe (``probe.ProbeSet``: harmful prompts with refusals, or task pairs) is scored by the mean
token loss of its responses, teacher-forced (eval mode, LoRA dropout off, logits at the response
positions only: :func:`response_logits`), summed in fp32 at least (:func:`summed_token_loss`):

- :func:`probe_loss`: forward passes only (the safety signal, the repair's measured stop, the
  one-shot patch's calibration);
- :func:`attribute_slice`: forward and backward over a slice of the probe, the loss and its
  attribution to every LoRA layer (``ProbeSet.run`` for the scores; the math is in ``probe.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, accepts_logits_mask
from .evaluation import prefix_cache, shared_prefix_length
from .sharding import unwrap_parallel

if TYPE_CHECKING:
    from .probe import ProbeSet

logger = logging.getLogger(__name__)


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the response tokens, summed (nats): ``logits`` (tokens, vocab), ``targets`` (tokens,).

    In fp32 at least: a token loss summed in bf16 loses the small differences the probe attributes
    and the safety signal tracks.
    """
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def response_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets_mask: torch.Tensor,
    **cache: Any,
) -> torch.Tensor:
    """(number of True in ``targets_mask``, vocab) logits at the positions that predict a response token.

    transformers' ``logits_to_keep`` with a boolean (b, T) mask skips the LM head elsewhere
    (prompt tokens are most of a probe; the head is a large share of a small model's FLOPs and of
    memory at a 128k vocabulary); models without it get full logits, masked here. ``cache``: the
    keys and values of a shared prefix (``evaluation.prefix_cache``); ``input_ids`` (b, T) and
    ``targets_mask`` (b, T - 1) then continue after it and ``attention_mask`` covers both.
    """
    keep = torch.cat([targets_mask, torch.zeros_like(targets_mask[:, :1])], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": bool(cache), **cache}
    if accepts_logits_mask(model):
        logits = model(**inputs, logits_to_keep=keep).logits
        if logits.ndim == 2 and logits.shape[0] == int(keep.sum()):
            return logits
        logger.debug("logits_to_keep gave logits of shape %s: using full logits.", tuple(logits.shape))
    logits = model(**inputs).logits
    return logits[keep]


def row_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Per row, one past the last attended position (right or left padding alike)."""
    width = attention_mask.shape[1]
    positions = torch.arange(1, width + 1).expand_as(attention_mask)
    return (positions * (attention_mask != 0)).amax(dim=1).tolist() if width else []


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes (a sharded parameter still reports its device)."""
    return next(model.parameters()).device


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; on exit every module's training mode and the torch/CUDA RNG states are
    put back exactly (eval mode consumes no randomness; the RNG is restored anyway)."""
    if torch.is_inference_mode_enabled():
        raise ValueError("Probe attribution needs gradients: call it outside torch.inference_mode().")
    modes = [(module, module.training) for module in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def shared_prompt_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> int:
    """Leading columns of a right-padded batch that every row has, attended, before any target.

    ``targets``: (B, T - 1) bool, the positions whose logits predict a response token. The count
    is at most the first target position, so every logit the loss needs comes after it; 0 for one row.
    """
    if input_ids.shape[0] < 2:
        return 0
    rows = [row[:length].tolist() for row, length in zip(input_ids, (attention_mask != 0).sum(dim=1), strict=True)]
    needed = targets.any(dim=0).nonzero()
    return min(shared_prefix_length(rows), int(needed[0]) if len(needed) else input_ids.shape[1])


@torch.no_grad()
def probe_loss(probe: ProbeSet, model: nn.Module, share_prefix: bool = True) -> float:
    """The probe's mean token loss over its response tokens (nats), without gradients.

    The same ``L`` as :meth:`ProbeSet.run` computes with its attributions (eval mode, logits at the
    response positions only), at the cost of forward passes alone. Every rank of a multi-process
    run computes the whole probe (a sharded model gathers inside each forward: the same passes
    everywhere), so the value is the same on all ranks. Modes and RNG states are restored.

    ``share_prefix``: the tokens every pair of a batch starts with (the chat template's system
    prompt: about a third of a SmolLM2 probe pair) run once, and each row continues from their
    cache (as :func:`~splora_callback.evaluation.generate` does): the same loss to float rounding
    (tested against ``share_prefix=False``); on the demo's probe 3.0-3.4 s a pass instead of 3.5-3.7 s.
    """
    module = unwrap_parallel(model)
    device = next(module.parameters()).device
    total = 0.0
    with preserved_state(module):
        for start in range(0, len(probe), probe.batch_size):
            rows = slice(start, start + probe.batch_size)
            ids, mask, labels = probe.input_ids[rows], probe.attention_mask[rows], probe.labels[rows]
            targets = labels[:, 1:] != IGNORE_INDEX
            if not targets.any():
                continue
            shared = shared_prompt_length(ids, mask, targets) if share_prefix else 0
            cache = prefix_cache(module, ids[0, :shared].tolist(), len(ids)) if shared else {}
            if not cache:
                shared = 0
            logits = response_logits(module, ids[:, shared:].to(device), mask.to(device),
                                     targets[:, shared:].to(device), **cache)
            total += float(summed_token_loss(logits, labels[:, 1:][targets].to(device)))
    return total / probe.response_tokens


class SliceAttribution(NamedTuple):
    """Attribution of a slice of the probe set.

    Attributes:
        sums: (layers,) float64, ``sum over the slice's response tokens t of <d loss_t / dA_l, A_l>``
            divided by the normalizer: with the probe's total token count, the slices' sums add up
            to ``probe[l]`` (each rank's share is weighted by its number of response tokens).
        tokens: number of response tokens in the slice.
        interactions: per layer, the (r, r) float64 ``M = sum_t g_t y_t^T`` (``g_t = d loss / dy_t``
            at the ``lora_A`` output ``y_t``), same normalizer: ``tr(M)`` is the layer's sum, and
            :func:`~splora_callback.components.component_attribution` splits it over the update's
            rank-one components (spec 3c).
        loss: the slice's summed token loss divided by the normalizer (the probe's mean loss when
            the normalizer is the probe's token count).
    """

    sums: torch.Tensor
    tokens: int
    interactions: list[torch.Tensor]
    loss: float


def attribute_slice(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    layers: Mapping[str, nn.Module], *, batch_size: int = 8, normalizer: int | None = None,
    passes: int | None = None,
) -> SliceAttribution:
    """Sum over the slice's response tokens of ``<d loss_t/dA_l, A_l>`` / ``normalizer``; no collective.

    Pure apart from the forward/backward passes: the caller sets eval mode (LoRA dropout off: the
    activation form needs ``lora_A``'s input to be the layer input; see :func:`preserved_state`).
    Examples are batched by length (order does not change the sum).

    Args:
        model: the module to run: a ``PeftModel``, a model with LoRA layers, or an FSDP root around
            one (its forward gathers the shards). Not a DDP wrapper (its forward would sync buffers).
        input_ids, attention_mask, labels: (n, T) slice of a :class:`SafetyProbe`; n may be 0.
        layers: module name -> ``lora_A`` module, from :func:`lora_down_projections`.
        normalizer: divides the summed token loss (default: the slice's own response tokens, i.e. the
            slice's mean-loss attribution). Pass the whole probe's count to get additive shares:
            gradients then have the size of a mean-loss training step's (safer in fp16).
        passes: run exactly this many forward/backward passes (at least the slice's micro-batches),
            padding with zero-weight passes on a 2-token dummy and never skipping a micro-batch
            without response tokens. Sharded models (FSDP, ZeRO-3) gather parameters inside every
            pass, so all ranks must run the same number. None: only the passes that count.
    """
    modules = list(layers.values())
    sums = torch.zeros(len(modules), dtype=torch.float64)
    interactions = [torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for m in modules]
    tokens, total_loss = 0, 0.0
    if normalizer is None:
        normalizer = max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
    lengths = row_lengths(attention_mask)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if passes is not None:
        if passes < len(batches):
            raise ValueError(f"passes={passes} but the slice has {len(batches)} micro-batches of {batch_size}.")
        batches += [None] * (passes - len(batches))
    device = model_device(model)
    for rows in batches:
        if rows is None:  # zero-weight pass: keeps the ranks' collectives in step
            ids = torch.zeros(1, 2, dtype=torch.long, device=device)
            batch_ids, batch_mask, batch_labels = ids, torch.ones_like(ids), torch.full_like(ids, IGNORE_INDEX)
        else:
            width = max(lengths[i] for i in rows)
            batch_ids, batch_mask = input_ids[rows, :width].to(device), attention_mask[rows, :width].to(device)
            batch_labels = labels[rows, :width].to(device)
        targets_mask = batch_labels[:, 1:] != IGNORE_INDEX  # (b, width - 1): positions that predict
        count = int(targets_mask.sum())
        if count == 0 and passes is None:
            continue
        with torch.enable_grad(), _captured_outputs(modules) as outputs:
            logits = response_logits(model, batch_ids, batch_mask, targets_mask)
            captured = [(index, output) for index, calls in enumerate(outputs) for output in calls]
        with torch.enable_grad():
            loss = summed_token_loss(logits, batch_labels[:, 1:][targets_mask]) / normalizer
            grads = torch.autograd.grad(loss, [output for _, output in captured], allow_unused=True)
        for (index, output), grad in zip(captured, grads, strict=True):
            if grad is not None:  # float64: a sum of many small products
                sums[index] += torch.sum(grad.double() * output.detach().double()).cpu()
                rank = output.shape[-1]
                interactions[index] += (grad.double().reshape(-1, rank).T @ output.detach().double().reshape(-1, rank)).cpu()
        tokens += count
        total_loss += float(loss.detach())
    return SliceAttribution(sums, tokens, interactions, total_loss)


@contextlib.contextmanager
def _captured_outputs(modules: Sequence[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Forward hooks that keep every output of ``modules`` (a list per module: a module may run twice).

    An output that does not require grad (every parameter above it frozen, e.g. an adapter loaded
    for inference) is replaced by a leaf that does: nothing above it is in the graph, so nothing
    is cut, and the layers after it get a graph through it.
    """
    outputs: list[list[torch.Tensor]] = [[] for _ in modules]

    def hook_for(index: int):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            outputs[index].append(output)
            return output

        return hook

    handles = [module.register_forward_hook(hook_for(index)) for index, module in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
