"""Progress of long commands (ingest, encode-text, sample, eval): a tqdm bar on a terminal, plain lines
(every `every_s` seconds and at the end) when output goes to a file or a SLURM log, and nothing on ranks
other than 0, so a 64-rank job writes one report, not 64.

Training reports through its metrics logger instead (a bar on a terminal, one metrics line per log step
otherwise).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def is_rank_zero() -> bool:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return rank == 0


class Progress:
    """Counts units of work towards `total`; use as a context manager."""

    def __init__(
        self, total: int, description: str, unit: str = "it", initial: int = 0, enabled: bool = True, every_s=30.0
    ) -> None:
        self.total, self.description, self.unit, self.done = total, description, unit, initial
        self.every_s, self.enabled = every_s, enabled and is_rank_zero()
        self._bar = None
        if self.enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True)
        self._start = self._last = time.monotonic()
        self._start_done = initial

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled and (time.monotonic() - self._last >= self.every_s or self.done >= self.total):
            self._print()

    def _print(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"{self.description}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.3g} {self.unit}/s, "
            f"{elapsed:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
