"""`python -m tests.stalled_commit STEP:SECONDS ARGS...`: `python -m pixelflow ARGS...` whose rank 0 waits
SECONDS before committing step STEP's save (every rank's files written, no manifest yet), so a test can
kill a run in the middle of a save. The hook lives here, not in the checkpoint code."""

from __future__ import annotations

import sys
import time

from pixelflow.cli import main
from pixelflow.train.checkpoint import Checkpointer


def hold_back_commit(step: int, seconds: float) -> None:
    commit = Checkpointer._commit

    def stalled(self, temporary, at: int) -> None:
        if at == step:
            time.sleep(seconds)
        commit(self, temporary, at)

    Checkpointer._commit = stalled


if __name__ == "__main__":
    step, seconds = sys.argv[1].split(":")
    hold_back_commit(int(step), float(seconds))
    sys.exit(main(sys.argv[2:]))
