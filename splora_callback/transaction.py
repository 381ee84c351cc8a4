"""Changes to the live model as one transaction: every change applied, or none.

An action on the live model (pruning layers or rank-one components, projecting ``B``) touches
several objects per layer: the factors, ``r`` / ``lora_alpha`` / ``scaling``, and the adapter
config's ``exclude_modules`` / ``rank_pattern`` / ``alpha_pattern``, which ``save_pretrained``
writes and ``PeftModel.from_pretrained`` reads back. Stopped half-way, the saved adapter would not
load (or load into other weights). So every new value is built first, aside, and
:meth:`LiveEdits.commit` then only swaps references, with SIGINT / SIGTERM held until the swap is
done and every applied change undone if anything raises on the way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_MISSING = object()
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Edit:
    """One change to the live model and how to undo it (both cheap: reference swaps)."""

    apply: Callable[[], None]
    undo: Callable[[], None]


def set_item(container: MutableMapping, key: Any, value: Any) -> Edit:
    """``container[key] = value`` (``value`` ``_MISSING``: delete the key), undone to what it held."""
    old = container[key] if key in container else _MISSING

    def put(item: Any) -> None:
        if item is _MISSING:
            if key in container:
                del container[key]
        else:
            container[key] = item

    return Edit(lambda: put(value), lambda: put(old))


def delete_item(container: MutableMapping, key: Any) -> Edit:
    """``del container[key]``, undone by putting the old value back."""
    return set_item(container, key, _MISSING)


def set_attribute(owner: Any, name: str, value: Any) -> Edit:
    """``setattr(owner, name, value)``, undone to the old value."""
    old = getattr(owner, name)
    return Edit(lambda: setattr(owner, name, value), lambda: setattr(owner, name, old))


@contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (once each) as usual.

    Outside the main thread Python cannot install handlers; the block then runs unguarded (its
    exceptions still roll back, see :meth:`LiveEdits.commit`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):  # re-delivered to the handlers the program had, in this
            signal.raise_signal(number)  # thread (os.kill may land on another thread, and the main thread move on)


@dataclass
class LiveEdits:
    """The changes of one action, built aside, applied by :meth:`commit` all at once.

    Attributes:
        edits: in the order they are applied (undone in reverse).
        committed: whether :meth:`commit` ran to the end (and :meth:`rollback` did not follow).
    """

    edits: list[Edit] = field(default_factory=list)
    committed: bool = False

    def add(self, *edits: Edit) -> None:
        self.edits.extend(edits)

    def commit(self) -> None:
        """Apply every edit, signals held; on any exception undo those applied and re-raise."""
        applied: list[Edit] = []
        with held_signals():
            try:
                for edit in self.edits:
                    edit.apply()
                    applied.append(edit)
            except BaseException:
                for edit in reversed(applied):
                    edit.undo()
                raise
            self.committed = True  # before a held signal is delivered on leaving the block

    def rollback(self) -> None:
        """Undo a committed action (signals held): the live model is as it was before."""
        if not self.committed:
            return
        with held_signals():
            for edit in reversed(self.edits):
                edit.undo()
            self.committed = False
