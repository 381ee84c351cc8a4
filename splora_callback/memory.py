"""Where the alignment subspace lives while training runs (spec 5b): off the accelerator by default.

``V = W_aligned - W_base`` is as large as the adapted weights: for a Llama-2-7B q/k/v/o adapter,
128 x 4096 x 4096 float32 = 8.6 GB (4.3 GB in bfloat16), more than a 24 GB QLoRA set-up has free.
Three placements, one field (``SPLoRAConfig.alignment_placement``):

- ``"stream"`` (default): V is kept on the CPU; each module's V is copied to the LoRA weights'
  device when that module is scored and dropped right after, so at most one module's V (plus the
  O(r) products of the scores) is on the accelerator at a time (:class:`StreamedDirections`);
- ``"cpu"``: V is kept and scored on the CPU; the LoRA factors (O(r) per layer) are copied down
  (``metrics.layer_geometry`` computes on V's device), nothing is placed on the accelerator;
- ``"resident"``: V is kept on the LoRA weights' device (the behaviour before 0.2: fastest on a
  GPU, V's full size on it).

On a CPU-only run the three are the same (no copy is made). Every consumer of V reads
``alignment.directions[name]`` one module at a time, so a placement is a property of that mapping
and nothing else in the scoring code knows about it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from .alignment import AlignmentSubspace

Placement = Literal["stream", "cpu", "resident"]
PLACEMENTS = ("stream", "cpu", "resident")


@dataclass
class DeviceAccount:
    """Bytes of V that :class:`StreamedDirections` placed on the scoring device.

    Attributes:
        moved: total bytes copied to the device (one module's V per access).
        copies: number of copies made.
        live: bytes of those copies still referenced now.
        peak: the largest ``live`` seen: what V added to the device's memory at its worst.
    """

    moved: int = 0
    copies: int = 0
    live: int = 0
    peak: int = 0
    _sizes: dict[int, int] = field(default_factory=dict, repr=False)

    def placed(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.moved += size
        self.copies += 1
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._released, size)

    def _released(self, size: int) -> None:
        self.live -= size

    def reset_peak(self) -> None:
        """Start a new measurement (a scoring call): ``peak`` from what is live now."""
        self.peak, self.moved, self.copies = self.live, 0, 0

    def to_dict(self) -> dict[str, int]:
        return {"moved_bytes": self.moved, "copies": self.copies, "peak_bytes": self.peak}


class StreamedDirections(Mapping):
    """Module name -> V, stored on the CPU and copied to ``device`` on each access.

    The copy lives as long as the caller holds it (one module's scoring), then its memory is
    freed; ``account`` counts the bytes placed and the peak held at once.

    Args:
        stored: module name -> V on the CPU (any dtype; consumers upcast as before).
        device: the scoring device (the LoRA weights' device).
        always_copy: copy even when ``device`` is where V is stored: emulates a separate scoring
            device on a CPU-only machine, for the tests and benchmarks that count the bytes.
    """

    def __init__(self, stored: Mapping[str, torch.Tensor], device: str | torch.device, always_copy: bool = False):
        self.stored = dict(stored)
        self.device = torch.device(device)
        self.always_copy = always_copy
        self.account = DeviceAccount()

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.stored[name]
        if tensor.device == self.device and not self.always_copy:
            return tensor
        placed = tensor.to(self.device, copy=True)
        self.account.placed(placed)
        return placed

    def __contains__(self, name: object) -> bool:  # Mapping's default would copy the tensor
        return name in self.stored

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    def stored_bytes(self) -> int:
        """Bytes of V kept on the CPU (what ``"resident"`` would put on the device)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.stored.values())


def storage_device(placement: str, lora_device: torch.device) -> torch.device:
    """Where V is built and kept for ``placement``: the CPU, or the LoRA weights' device."""
    if placement not in PLACEMENTS:
        raise ValueError(f"alignment_placement={placement!r}; expected one of {', '.join(PLACEMENTS)}.")
    return torch.device(lora_device) if placement == "resident" else torch.device("cpu")


def place_alignment(alignment: AlignmentSubspace, placement: str, lora_device: torch.device,
                    always_copy: bool = False) -> AlignmentSubspace:
    """Put ``alignment`` (built on :func:`storage_device`) where ``placement`` scores it, in place.

    ``"stream"`` wraps its directions in a :class:`StreamedDirections` towards ``lora_device``
    (nothing to wrap when that is the CPU, unless ``always_copy``); ``"cpu"`` and ``"resident"``
    leave it as built. Returns ``alignment``.
    """
    storage_device(placement, lora_device)  # validates
    lora_device = torch.device(lora_device)
    if placement == "stream" and (lora_device.type != "cpu" or always_copy):
        alignment.directions = StreamedDirections(alignment.directions, lora_device, always_copy=always_copy)
    return alignment


def device_account(alignment: AlignmentSubspace | None) -> DeviceAccount | None:
    """The byte count of a streamed alignment subspace (None for the other placements)."""
    directions = getattr(alignment, "directions", None)
    return directions.account if isinstance(directions, StreamedDirections) else None


def placement_info(alignment: AlignmentSubspace | None, placement: str, lora_device: torch.device) -> dict:
    """For the report: where V is kept, how many bytes, and what streaming placed on the device."""
    directions = {} if alignment is None else alignment.directions
    stored = (directions.stored_bytes() if isinstance(directions, StreamedDirections)
              else sum(t.numel() * t.element_size() for t in directions.values()))
    info = {"placement": placement, "scoring_device": str(lora_device if placement != "cpu" else "cpu"),
            "stored_on": str(storage_device(placement, lora_device)), "stored_bytes": stored}
    account = device_account(alignment)
    if account is not None:
        info["last_call"] = account.to_dict()
    return info
