"""Training across ranks (one per GPU; gloo ranks on CPU): which samples a rank trains on, and the
collectives that make N ranks take exactly the step one process takes on the whole batch.

Every rank holds every sample of the step and runs forward and backward on its share only (groups
kept whole, balanced by packed tokens). The loss is normalised over the whole minibatch on every
rank, so the sum of the ranks' gradients is the one-process gradient. The weights, gradients and
Adam's moments are sharded over the ranks with FSDP2 (`shard`): each decoder layer's weights are
gathered for its forward and backward, and its gradients reduce-scattered (summed) after. LoRA
adapters are replicated instead and their gradients summed (`sum_gradients`). Every rank gathers
the full weights to push into its own engine; checkpoints hold full tensors (`full`), so any
number of ranks resumes from one (`shard_like`).

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


def shard(root: torch.nn.Module, blocks: Sequence[torch.nn.Module]) -> None:
    """FSDP2 over every rank: each of `blocks` (the decoder layers) a unit of its own, the rest of
    `root` (embeddings, final norm, LM head) the root unit. Gradients are summed, not averaged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    for unit in [*blocks, root]:
        unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]  # a plain SUM: gloo has no PREMUL_SUM


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `like`: this rank's shard of it where `like` is sharded (no communication:
    every rank holds `whole`), else `whole` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a shard stays a shard (only its local part moves: no communication)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.to(device, non_blocking=True)
    return DTensor.from_local(t.to_local().to(device, non_blocking=True), t.device_mesh, t.placements,
                              run_check=False, shape=t.shape, stride=t.stride())


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
