"""Which cascade stage each sample of a step trains at.

Every micro-batch gets exact stage shares (floor or ceil of its size / stages, the remainder rotating with
the step), so micro-batches of a size divisible by the stage count all have the same token layout (one
compiled graph) and the step's shares are exact. The plan is a pure function of (seed, step).
"""

from __future__ import annotations

import numpy as np


def plan_stages(step: int, count: int, stages: int, seed: int, micro_batch: int = 0) -> list[int]:
    micro = micro_batch or count
    plan: list[int] = []
    for index, first in enumerate(range(0, count, micro)):
        per_stage, remainder = divmod(min(micro, count - first), stages)
        extra = {((step + index) * remainder + i) % stages for i in range(remainder)}
        shares = [s for s in range(stages) for _ in range(per_stage + (s in extra))]
        plan += np.random.default_rng([seed, step, index, 0x57A6E]).permutation(shares).tolist()
    return plan
