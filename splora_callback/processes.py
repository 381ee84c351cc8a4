"""Which process this is, and the collectives SPLoRA needs: Accelerate's, as TRL's callbacks use them.

The one definition of rank and world in the package: ``distributed.py`` splits the layers by it,
``probe.py`` the probe's rows, ``sharding.py`` warns on the main process only, and the callback
agrees through :func:`all_gather_object` / :func:`broadcast_object`. Under a ``Trainer`` the state
is Accelerate's ``PartialState``, the one ``TrainingArguments`` created; without one (``torchrun``
and a process group of the script's own) it is read from the environment here.

Every function that communicates is collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def process_state() -> Any:
    """Accelerate's ``PartialState`` while a process group is up; None in one process.

    One process is answered here, without Accelerate: ``PartialState()`` would start a process
    group under ``torchrun`` before the Trainer does, and checks GPU peer-to-peer support (which
    initialises CUDA) in a plain CPU run of the CLI.

    Raises:
        RuntimeError: Accelerate's state counts another number of processes than the process
            group (configured before the group was started): its collectives would not reach the
            other ranks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from accelerate import PartialState

    # Used only when nothing created the state yet (the Trainer's wins). A gloo group is a CPU
    # launch: Accelerate counts its processes only when asked with cpu=True (accelerate 1.x,
    # PartialState._prepare_backend; otherwise one process without a GPU, and with one it would
    # move each rank to cuda:LOCAL_RANK, which a single-GPU machine running N CPU ranks lacks).
    state = PartialState(cpu=dist.get_backend() == "gloo")
    if state.num_processes != dist.get_world_size():
        raise RuntimeError(
            f"Accelerate's PartialState counts {state.num_processes} process(es) but the process group has "
            f"{dist.get_world_size()}: it was configured before the group started. Create the Trainer's "
            "TrainingArguments (or accelerate.PartialState()) after torch.distributed.init_process_group()."
        )
    return state


def rank() -> int:
    """This process's global rank (0 in one process)."""
    state = process_state()
    return 0 if state is None else state.process_index


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    state = process_state()
    return 1 if state is None else state.num_processes


def is_main_process() -> bool:
    """Global rank 0 (the Trainer's ``state.is_world_process_zero``); True in one process."""
    return rank() == 0


def all_gather_object(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process). Collective."""
    from accelerate.utils import gather_object

    if process_state() is None:
        return [obj]
    return gather_object([obj])  # Accelerate gathers lists and concatenates them: one item per rank


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (picklable; move tensors to CPU first). Collective."""
    from accelerate.utils import broadcast_object_list

    if process_state() is None:
        return obj
    return broadcast_object_list([obj], from_process=src)[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over ranks (a new tensor; ``tensor`` itself in one process).

    NCCL needs the tensor on the GPU, gloo takes CPU tensors: the caller places it. Collective.
    """
    from accelerate.utils import reduce

    if process_state() is None:
        return tensor
    return reduce(tensor, reduction="sum")
