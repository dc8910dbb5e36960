"""Moving each sample of a step's global batch from the data rank that read it to the unit that trains it.

Reading follows the lanes and training follows the plan, so a sample usually changes rank: one
all-to-all per step over the data ranks (each SP rank index has its own), carrying full-resolution uint8
crops with their labels packed into the same rows. Every rank knows from the plan and the lane rule who
sends what, so no sizes are exchanged first.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pixelflow.data.loader import ReadShare
from pixelflow.data.planner import StepPlan

LABEL_BYTES = 8  # an int64 label travels as 8 uint8 columns after the image's


def exchange(
    share: ReadShare,
    plan: StepPlan,
    readers: np.ndarray,
    unit: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, R, R) uint8, labels (n,)) on `device` of the unit's samples, `plan.samples_of(unit)`
    in that order. `readers[j]` is the data rank that read slot j; `share` is what this rank read."""
    if group is None:  # one data rank read every slot and trains them all
        return share.images.to(device, non_blocking=True), share.labels.to(device, non_blocking=True)
    shape = share.images.shape[1:]
    flat = share.images.reshape(len(share.slots), int(np.prod(shape)))
    rows = torch.cat([flat, share.labels.reshape(-1, 1).view(torch.uint8)], dim=1)
    destination = plan.units[share.slots]
    order = np.argsort(destination, kind="stable")
    send = rows[torch.from_numpy(order)].to(device, non_blocking=True)
    send_sizes = np.bincount(destination, minlength=plan.settings.units).tolist()
    mine = plan.samples_of(unit)
    sources = readers[mine]
    receive_sizes = np.bincount(sources, minlength=plan.settings.units).tolist()
    received = send.new_empty((len(mine), rows.shape[1]))
    dist.all_to_all_single(received, send, receive_sizes, send_sizes, group=group)
    # rows arrive grouped by source rank, each group by slot: put them back in slot order
    arrival = mine[np.argsort(sources, kind="stable")]
    back = torch.from_numpy(np.argsort(arrival, kind="stable")).to(device)
    received = received[back]
    images = received[:, :-LABEL_BYTES].reshape(len(mine), *shape)
    labels = received[:, -LABEL_BYTES:].contiguous().view(torch.int64).reshape(-1)
    return images, labels
