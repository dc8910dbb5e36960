"""Moving each sample of a step's global batch from the data rank that read it to the unit that trains it.

Reading follows the lanes and training follows the plan, so a sample usually changes rank: one
all-to-all per step over the data ranks (each SP rank index has its own), carrying full-resolution uint8
crops with their labels (and, for text models, captions or embeddings) packed into the same rows. Every
rank knows from the plan and the lane rule who sends what, so no sizes are exchanged first (payloads agree
on their padded width with one all-reduce).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pixelflow.data.loader import ReadShare
from pixelflow.data.planner import StepPlan
from pixelflow.devices import to_device

LABEL_BYTES = 8  # an int64 label travels as 8 uint8 columns after the image's


def exchange(
    share: ReadShare,
    plan: StepPlan,
    readers: np.ndarray,
    unit: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
    with_payloads: bool,
    host_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, list[bytes]]:
    """(images (n, 3, R, R) uint8, labels (n,), payloads) on `device` of the unit's samples,
    `plan.samples_of(unit)` in that order. `readers[j]` is the data rank that read slot j; `share` is what
    this rank read. Payloads (captions or embeddings) travel when asked, padded to the longest over
    `host_group` (a gloo group holding the exchange group's ranks: agreeing on the width waits on no device)."""
    if group is None:  # one data rank read every slot and trains them all
        images, labels = share.images.to(device, non_blocking=True), share.labels.to(device, non_blocking=True)
        return images, labels, list(share.payloads)
    shape = share.images.shape[1:]
    flat = share.images.reshape(len(share.slots), int(np.prod(shape)))
    columns = [flat, share.labels.reshape(-1, 1).view(torch.uint8)]
    width = 0
    if with_payloads:
        longest = torch.tensor([max((len(p) for p in share.payloads), default=0)])
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=host_group)
        width = int(longest.item())
        columns.append(payload_columns(share.payloads, width))
    rows = torch.cat(columns, dim=1)
    destination = plan.units[share.slots]
    order = np.argsort(destination, kind="stable")
    send = to_device(rows[torch.from_numpy(order)], device)  # pinned: the host does not wait for the copy
    send_sizes = np.bincount(destination, minlength=plan.settings.units).tolist()
    mine = plan.samples_of(unit)
    sources = readers[mine]
    receive_sizes = np.bincount(sources, minlength=plan.settings.units).tolist()
    received = send.new_empty((len(mine), rows.shape[1]))
    dist.all_to_all_single(received, send, receive_sizes, send_sizes, group=group)
    # rows arrive grouped by source rank, each group by slot: put them back in slot order
    arrival = mine[np.argsort(sources, kind="stable")]
    back = to_device(torch.from_numpy(np.argsort(arrival, kind="stable")), device)
    received = received[back]
    pixels = flat.shape[1]
    images = received[:, :pixels].reshape(len(mine), *shape)
    # a fresh copy: a slice's storage offset and row stride need not be multiples of 8 (one odd-width row)
    labels = received[:, pixels : pixels + LABEL_BYTES].flatten().clone().view(torch.int64)
    payloads = read_payloads(received[:, pixels + LABEL_BYTES :]) if with_payloads else []
    return images, labels, payloads


def payload_columns(payloads: list[bytes], width: int) -> torch.Tensor:
    """(n, 4 + width) uint8: each payload's length (int32) then its bytes, zero-padded."""
    out = np.zeros((len(payloads), 4 + width), dtype=np.uint8)
    for row, payload in enumerate(payloads):
        out[row, :4] = np.frombuffer(np.int32(len(payload)).tobytes(), dtype=np.uint8)
        out[row, 4 : 4 + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    return torch.from_numpy(out)


def read_payloads(columns: torch.Tensor) -> list[bytes]:
    data = columns.cpu().numpy()
    lengths = data[:, :4].copy().view(np.int32).reshape(-1)
    return [data[row, 4 : 4 + int(n)].tobytes() for row, n in enumerate(lengths)]
