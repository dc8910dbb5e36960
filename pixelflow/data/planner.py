"""Which cascade stage each sample of a step trains at.

Stage shares are exact per step (each stage gets floor or ceil of count / stages samples, the remainder
rotating with the step) and the assignment is a pure function of (seed, step), so resume reproduces it.
"""

from __future__ import annotations

import numpy as np


def plan_stages(step: int, count: int, stages: int, seed: int) -> list[int]:
    per_stage, remainder = divmod(count, stages)
    extra = {(step * remainder + i) % stages for i in range(remainder)}
    plan = [s for s in range(stages) for _ in range(per_stage + (s in extra))]
    return np.random.default_rng([seed, step, 0x57A6E]).permutation(plan).tolist()
