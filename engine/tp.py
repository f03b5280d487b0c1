"""Tensor-parallel engine groups: the ranks whose vLLM engines shard one model between them.

With `distributed_executor_backend="external_launcher"` every rank of a tensor-parallel group runs
its own copy of vLLM's scheduler, and their forwards meet in collectives: the copies must be fed
the same requests, aborts and lifecycle calls, between the same steps, or the text is silently
wrong. So only the group's leader serves HTTP; its engine thread sends, before each of its steps,
what it is about to do to the other members (`Mirror.send`), which do exactly that and step
with it (engine.Engine._mirror). A digest of each step's sampled tokens travels with the next
message: a member that sampled anything else stops with an error instead of drifting.

Groups are consecutive ranks, as vLLM lays out its own tensor-parallel groups over the world.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from typing import Any


def group_ranks(world: int, tp: int, rank: int) -> list[int]:
    """The ranks of `rank`'s tensor-parallel group."""
    if tp < 1 or world % tp:
        raise ValueError(f"engine.tensor_parallel_size {tp} must divide the number of ranks {world}")
    first = rank - rank % tp
    return list(range(first, first + tp))


def remove_stale_cpu_shm(ranks: list[int], rank: int, shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink the CPU shared-memory segment that `rank` is about to create for its group; returns the
    names removed.

    vLLM's CPU tensor-parallel communicator gives each member one segment, named from an instance id,
    the group's ranks and the member's index in it, and creates it exclusively. Under
    external_launcher the instance id is empty (it comes from the init method's port, and env:// has
    none), so every run on a box uses the same names, and a run that ended without vLLM's teardown
    (a crash, a killed rank) leaves them: the next run failed with "create shm in SHMManager failed.
    errno: 17". Each member removes only its own segment before creating it; the others open it after
    vLLM's barrier, so no member can remove one another has already created."""
    suffix = f"-[{'-'.join(map(str, ranks))}]-cpushm_{ranks.index(rank)}"
    removed = []
    for name in os.listdir(shm_dir):
        if name.endswith(suffix):
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
    return removed


class Mirror:
    """One rank's end of its group's command channel (a gloo group of its own: the engine thread
    uses it while the trainer's collectives run on the default group from other threads)."""

    def __init__(self, world: int, tp: int, rank: int) -> None:
        import torch.distributed as dist

        self.rank = rank
        self.ranks = group_ranks(world, tp, rank)
        self.leader = rank == self.ranks[0]
        mine = None
        for first in range(0, world, tp):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(first, first + tp)), backend="gloo")
            if first == self.ranks[0]:
                mine = group
        self._group = mine

    def send(self, commands: list[tuple[str, Any]], digest: int) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([(commands, digest)], src=self.ranks[0], group=self._group)

    def receive(self) -> tuple[list[tuple[str, Any]], int]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=self.ranks[0], group=self._group)
        return box[0]


def step_digest(outputs: Iterable[Any]) -> int:
    """A checksum of one engine step: each request's id and the token ids it has so far."""
    crc = 0
    for out in outputs:
        crc = zlib.crc32(repr((out.request_id, list(out.outputs[0].token_ids), out.finished)).encode(), crc)
    return crc
