"""Which cascade stage each sample of a step trains at.

Every consecutive group of `stages` samples of the global batch holds each stage once (a seeded
permutation), and a leftover partial group takes stages rotating with the step. So the step's stage shares
are exact, any micro-batch or rank share whose size divides by the stage count has exact shares too (all
micro-batches share one token layout: one compiled graph), and the plan is a pure function of
(seed, step, global batch): the same however the batch is split over ranks and micro-batches.
"""

from __future__ import annotations

import numpy as np


def plan_stages(step: int, count: int, stages: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, step, 0x57A6E])
    whole, remainder = divmod(count, stages)
    plan = [stage for _ in range(whole) for stage in rng.permutation(stages).tolist()]
    leftover = [(step * remainder + i) % stages for i in range(remainder)]
    return plan + rng.permutation(leftover).tolist()
