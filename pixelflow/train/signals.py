"""Agreed stop on the signals a scheduler sends before it kills a job (SIGTERM, SIGUSR2) and on Ctrl-C (SIGINT).

A signal only sets a flag. At every step boundary the ranks agree on it with one small all-reduce (MAX of
the signal numbers) over the world's CPU control group, so all ranks stop after the same step however many of
them were signalled, save together and exit with EXIT_STOPPED; which signal it was tells a launcher why
(SIGUSR2: time limit, SIGTERM: preemption or cancel). A second signal during the save changes nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from pixelflow.errors import EXIT_STOPPED
from pixelflow.parallel.world import World

log = logging.getLogger(__name__)


def signal_numbers(names: list[str]) -> list[int]:
    return [int(getattr(signal, name)) for name in names]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> None:
    """A rank started by a launcher (torchrun, `pixelflow-launch local`) is sent SIGTERM when the launcher
    dies, however it dies: it then stops as a scheduler's SIGTERM stops it (agreed, saved), rather than
    training on with nobody to stop it. Ranks started by hand or by SLURM are left alone (a shell that exits
    must not stop a nohup'd run)."""
    launcher = os.environ.get("PIXELFLOW_LAUNCHER_PID")
    if (launcher is None and "TORCHELASTIC_RUN_ID" not in os.environ) or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if launcher is not None and os.getppid() != int(launcher):  # it died before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)


class StopSignals:
    """Context manager: installs the handlers (main thread), restores the previous ones on exit."""

    def __init__(self, names: list[str], world: World):
        self.world, self.names = world, names
        self.received: int | None = None
        self._previous: dict[int, Any] = {}  # what signal.signal returned: a handler, an int or None
        self._flag = torch.zeros(2, dtype=torch.int32)

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

    def agreed(self, trouble: bool = False) -> tuple[str | None, bool]:
        """(the signal that stops the run, whether any rank reported trouble), the same on every rank
        (collective, every step: one all-reduce carries both). SIGTERM wins over SIGUSR2 and SIGINT when
        ranks got different ones; None when no rank was signalled. `trouble`: this rank's save in flight
        failed, so every rank stops at this step together."""
        self._flag[0] = self.received or 0
        self._flag[1] = int(trouble)
        if self.world.distributed:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.world.control)
        number, troubled = (int(x) for x in self._flag.tolist())
        if not number:
            return None, bool(troubled)
        name = signal.Signals(number).name
        origin = "here" if self.received else "on another rank"
        log.warning("%s received %s: saving a checkpoint, then exiting with %d", name, origin, EXIT_STOPPED)
        return name, bool(troubled)
