"""Agreed stop on the signals a scheduler sends before it kills a job (SIGTERM, SIGUSR2 by default).

A signal only sets a flag. At every step boundary the ranks agree on it with one small all-reduce (MAX of
the signal numbers) over a CPU group of their own, so all ranks stop after the same step however many of
them were signalled, save together and exit with EXIT_STOPPED; which signal it was tells a launcher why
(SIGUSR2: time limit, SIGTERM: preemption or cancel). A second signal during the save changes nothing.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

from pixelflow.parallel.world import World

log = logging.getLogger(__name__)

EXIT_FINISHED = 0  # trained to train.steps
EXIT_FAILED = 1  # an error: see the log
EXIT_USER_ERROR = 2  # bad config, data or checkpoint: one line on stderr says what and where
EXIT_STOPPED = 75  # stopped by a signal after a committed checkpoint: resume me (EX_TEMPFAIL)


def signal_numbers(names: list[str]) -> list[int]:
    return [int(getattr(signal, name)) for name in names]


class StopSignals:
    """Context manager: installs the handlers (main thread), restores the previous ones on exit."""

    def __init__(self, names: list[str], world: World):
        self.world, self.names = world, names
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._flag = torch.zeros(1, dtype=torch.int32)
        # gloo, never the training backend's group: no device sync, no interleaving with training traffic
        self.group = dist.new_group(backend="gloo") if world.distributed else None

    def __enter__(self) -> StopSignals:
        for number in signal_numbers(self.names):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = number

    def agreed(self) -> str | None:
        """The signal that stops the run, the same on every rank (collective, every step): SIGTERM wins
        over SIGUSR2 when ranks got different ones; None when no rank was signalled."""
        self._flag.fill_(self.received or 0)
        if self.world.distributed:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group)
        number = int(self._flag.item())
        if not number:
            return None
        name = signal.Signals(number).name
        origin = "here" if self.received else "on another rank"
        log.warning("%s received %s: saving a checkpoint, then exiting with %d", name, origin, EXIT_STOPPED)
        return name
