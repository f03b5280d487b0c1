"""Training across ranks (one per GPU; gloo ranks on CPU): which samples a rank trains on, and the
collectives that make N ranks take exactly the step one process takes on the whole batch.

Every rank holds the whole model and optimizer (replicated) and every sample of the step; it runs
forward and backward on its share only (groups kept whole, balanced by packed tokens). The loss is
normalised over the whole minibatch on every rank, so the sum of the ranks' gradients is the
one-process gradient: gradients are summed across ranks before clipping, and every rank then takes
the same optimizer step. Weights stay identical on every rank, so each pushes its own into its own
engine and any rank's checkpoint is the run's.

With one process (no process group) every function here is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from grpo.packing import packed_length, plan_groups


def init() -> int:
    """Join the process group torchrun / `accelerate launch` describe (RANK, WORLD_SIZE, ...);
    gloo on CPU, NCCL with one GPU per rank. Returns the world size (1: a plain process)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if gpu else "gloo")
    return world_size()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def share(rows: Sequence[Sequence[int]], idx: Sequence[int], ranks: int, me: int) -> list[int]:
    """The indices (from `idx`) that rank `me` of `ranks` trains on: groups of rows that share a
    prompt stay on one rank (packing does their prompt once), heaviest group first onto the
    least-loaded rank. Deterministic: every rank computes every rank's share identically."""
    if ranks == 1:
        return list(idx)
    sub = [rows[i] for i in idx]
    groups = [[idx[j] for j in g] for g in plan_groups(sub)]
    load = [0] * ranks
    mine: list[int] = []
    for g in sorted(groups, key=lambda g: (-packed_length(rows, g), g[0])):
        r = min(range(ranks), key=lambda k: (load[k], k))
        load[r] += packed_length(rows, g)
        if r == me:
            mine += g
    return sorted(mine)


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over ranks (a rank without a sample contributes zeros)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(summed)


def sum_floats(values: Sequence[float]) -> list[float]:
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def merge_lists(lists: list[list[Any]]) -> list[list[Any]]:
    """Per sample, the list the rank that trained on it filled (others leave it empty)."""
    if world_size() == 1:
        return lists
    gathered: list[list[list[Any]] | None] = [None] * world_size()
    dist.all_gather_object(gathered, lists)
    return [next((g[i] for g in gathered if g and g[i]), []) for i in range(len(lists))]
