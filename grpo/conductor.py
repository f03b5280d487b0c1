"""Several ranks, one loop: rank 0 conducts, every other rank follows.

Under `torchrun --nproc_per_node N trainer.py config.yaml` each rank has its own engine (on its own
GPU) behind its own OpenAI endpoint, and its own replica of the trainer. Rank 0 alone runs the Gym
servers (given every rank's endpoint: Gym spreads sessions over them), the step loop, the store
and the dashboard. The loop drives its engine, trainer and sampling pin through the `Leader*`
stand-ins below, which first tell the followers to do the same (a broadcast over the process
group), so every rank sleeps, wakes, trains (its share; grpo/ranks.py), gathers the full weights
and pushes them into its own engine, and checkpoints at the same point of the step: the sharded
trainer's collectives must meet in the same order on every rank. A follower's endpoint serves Gym's
requests from its event loop meanwhile: the blocking collectives run in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from engine.engine import KEEP_WEIGHTS, SLEEP_TAGS, Engine
from engine.server import SamplingPin
from grpo.policy import PolicyTrainer, TrainSample, TrainStats

log = logging.getLogger("conductor")

WAKE, SLEEP, PIN, TRAIN, PUSH, SAVE, LOAD, OPTIMIZER, PARAMS, STOP = (
    "wake", "sleep", "pin", "train", "push", "save", "load", "optimizer", "params", "stop")


def tell(*command: Any) -> None:
    """Rank 0: send a command to every follower (blocks until they all took it)."""
    dist.broadcast_object_list([command], src=0)


def hear() -> tuple[Any, ...]:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_endpoints(url: str | None) -> list[str]:
    """Every serving rank's endpoint, in rank order (each rank passes its own; None: it serves none,
    a tensor-parallel group's other members)."""
    urls: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(urls, url)
    return [u for u in urls if u]


class LeaderEngine:
    """Rank 0's engine: each lifecycle call is first told to the followers."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def wake(self, tags: Iterable[str] = SLEEP_TAGS) -> None:
        tags = tuple(tags)
        await asyncio.to_thread(tell, WAKE, tags)
        await self._engine.wake(tags)

    async def sleep(self, level: int = KEEP_WEIGHTS) -> int:
        await asyncio.to_thread(tell, SLEEP, level)
        return await self._engine.sleep(level)


class LeaderPolicy:
    """Rank 0's trainer: training and state changes are first told to the followers (the loop calls
    these from worker threads, where the blocking broadcast is fine)."""

    def __init__(self, policy: PolicyTrainer) -> None:
        self._policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def train_step(self, samples: list[TrainSample]) -> TrainStats:
        tell(TRAIN, samples)
        return self._policy.train_step(samples)

    def named_weights(self) -> Any:
        # a push starts here (grpo.loop.push_policy): the gather is a collective when sharded
        tell(PUSH)
        return self._policy.named_weights()

    def save_adapter(self, folder: Path) -> Path:
        tell(PUSH)
        return self._policy.save_adapter(folder)

    def save_checkpoint(self, folder: Path) -> None:
        tell(SAVE, str(folder))
        self._policy.save_checkpoint(folder)

    def load_checkpoint(self, folder: Path) -> None:
        tell(LOAD, str(folder))
        self._policy.load_checkpoint(folder)

    def offload_optimizer(self) -> None:
        tell(OPTIMIZER, "offload")
        self._policy.offload_optimizer()

    def reload_optimizer(self) -> None:
        tell(OPTIMIZER, "reload")
        self._policy.reload_optimizer()

    def offload_params(self) -> None:
        tell(PARAMS, "offload")
        self._policy.offload_params()

    def reload_params(self) -> None:
        tell(PARAMS, "reload")
        self._policy.reload_params()


class LeaderPin(SamplingPin):
    """Rank 0's sampling pin: once `armed` (the followers listen), the followers' endpoints refuse
    the same temperatures."""

    armed = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "temperature" and self.armed:
            tell(PIN, value)  # followers wait in hear(): this returns at once
        super().__setattr__(name, value)


async def follow(engine: Engine, policy: PolicyTrainer | None, pin: SamplingPin, adapters: Path) -> None:
    """A follower's whole run: do what rank 0 tells, until it says stop."""
    from grpo.loop import push_policy

    while True:
        command = await asyncio.to_thread(hear)
        kind, args = command[0], command[1:]
        if kind == STOP:
            return
        if kind == WAKE:
            await engine.wake(args[0])
        elif kind == SLEEP:
            await engine.sleep(args[0])
        elif kind == PIN:
            pin.temperature = args[0]
        elif policy is None:
            raise RuntimeError(f"rank {dist.get_rank()} has no trainer for command {kind!r}")
        elif kind == TRAIN:
            await asyncio.to_thread(policy.train_step, args[0])
        elif kind == PUSH:
            await push_policy(engine, policy, adapters)
        elif kind == SAVE:
            await asyncio.to_thread(policy.save_checkpoint, Path(args[0]))  # gathers; rank 0 writes
        elif kind == LOAD:
            await asyncio.to_thread(policy.load_checkpoint, Path(args[0]))
        elif kind == OPTIMIZER:
            await asyncio.to_thread(policy.offload_optimizer if args[0] == "offload" else policy.reload_optimizer)
        elif kind == PARAMS:
            await asyncio.to_thread(policy.offload_params if args[0] == "offload" else policy.reload_params)
        else:
            raise RuntimeError(f"unknown command {kind!r} from rank 0")
