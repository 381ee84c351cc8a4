"""The live objects of a run, kept apart from :class:`~splora_callback.config.SPLoRAConfig`.

A config is plain data: it is saved in every checkpoint, logged to W&B and written into reports,
and it round-trips through JSON and YAML. The probes are not data (tokenised tensors, a
tokenizer's output), so they live here, as PEFT keeps ``LoraRuntimeConfig`` apart from
``LoraConfig``. ``SPLoRAConfig(probe=..., utility=...)`` and ``SPLoRACallback(..., probe=...)``
both fill one; on resume the Trainer hands the callback you passed back, probes included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.utils import logging

from .probe import UtilityProbe

logger = logging.get_logger(__name__)


@dataclass
class SPLoRARuntime:
    """The live objects the callback uses besides its config.

    Attributes:
        probe: the :class:`~splora_callback.probe.SafetyProbe` (harmful prompts with refusals):
            ``metric="probe"``, the refusal-loss signal and the measured repair.
        utility: the :class:`~splora_callback.probe.UtilityProbe` (task examples) of the budget and
            repair rules; None: the callback samples the training data.
    """

    probe: Any = None
    utility: Any = None

    def summary(self) -> dict[str, str | None]:
        """What a report records of them: their repr (sizes, first prompt), not their tensors."""
        return {"probe": None if self.probe is None else repr(self.probe),
                "utility": None if self.utility is None else repr(self.utility)}


def default_utility_probe(train_dataloader: Any, examples: int, seed: int) -> tuple[UtilityProbe, str]:
    """The callback's utility probe when the user gave none: a seeded sample of the training data,
    collated by the Trainer's own collator (local RNG: the training order is not touched).

    Pass ``SPLoRAConfig(utility=UtilityProbe.from_dataset(eval_dataset, collator))`` to use
    held-out examples instead; training data that mixes in harmful compliance counts it as utility.

    Raises:
        ValueError: no map-style training dataset to sample from.
    """
    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise ValueError(
            "SPLoRACallback: select='budget' needs task examples and the training data cannot be sampled "
            "(no map-style train_dataset); pass SPLoRAConfig(utility=UtilityProbe.from_pairs(...))."
        )
    probe = UtilityProbe.from_dataset(dataset, train_dataloader.collate_fn, examples, seed=seed)
    source = f"train_dataset: {len(probe)} examples sampled with seed {seed}"
    logger.info("SPLoRA utility probe: %s (pass SPLoRAConfig(utility=...) for held-out examples).", source)
    return probe, source
