"""`pixelflow-launch local`: the same job on this machine without SLURM.

The ranks are started the way srun starts tasks (one process each, RANK/LOCAL_RANK/WORLD_SIZE and a
rendezvous on 127.0.0.1) rather than through torchrun, so the trainer's exit status survives (75:
stopped by a signal, resume me) and SIGTERM/SIGUSR2/SIGINT reach every rank, as a scheduler's would. Each
rank dies with the launcher (PIXELFLOW_LAUNCHER_PID: the trainer asks the kernel for SIGTERM when its parent
dies), so a launcher killed with SIGKILL leaves no rank training.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pixelflow.errors import EXIT_FINISHED, EXIT_SIGNAL_BASE, EXIT_STOPPED

FORWARDED = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shell_status(code: int) -> int:
    """A process's exit status as a shell reports it: 128 + n when signal n killed it."""
    return EXIT_SIGNAL_BASE - code if code < 0 else code


def run_local(config: Path, nproc: int) -> int:
    """Train config (a run directory's snapshot) on nproc local ranks; returns the job's exit status:
    0 finished, 75 stopped by a signal (every rank), else the status of the rank seen failing first (128 + n
    for signal n); the others are then stopped."""
    port = str(free_port())
    ranks = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PIXELFLOW_LAUNCHER_PID=str(os.getpid()))
        env.setdefault("OMP_NUM_THREADS", "1")
        ranks.append(subprocess.Popen([sys.executable, "-m", "pixelflow", "train", str(config)], env=env))
    previous = {
        number: signal.signal(number, lambda number, _: [r.send_signal(number) for r in ranks]) for number in FORWARDED
    }
    try:
        codes = [None] * nproc
        while None in codes:
            codes = [rank.poll() for rank in ranks]
            failed = [code for code in codes if code not in (None, EXIT_FINISHED, EXIT_STOPPED)]
            if failed:  # a rank died: the others would wait for it in a collective until their timeout
                time.sleep(5)
                for rank in ranks:
                    if rank.poll() is None:
                        rank.kill()
                    rank.wait()
                return shell_status(failed[0])
            time.sleep(0.2)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return EXIT_STOPPED if EXIT_STOPPED in codes else EXIT_FINISHED
