"""The GRPO step loop: rows -> rollouts through Gym -> advantages -> train -> weight sync -> log.

Everything runs on the one event loop; training compute and store writes run in worker threads so
the policy server and the dashboard keep answering while a step trains.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from engine.engine import DISCARD_WEIGHTS, KEEP_WEIGHTS, Engine
from engine.server import SamplingPin
from gym.rollouts import collect, env_metrics, row_env
from gym.servers import GymServers
from gym.rollout import Rollout
from store import metrics as M
from store.db import RunStore
from store.records import RolloutRecord, StepRecord

from .advantages import group_advantages, overlong_penalty, zero_variance_groups
from .config import Config
from .export import CHECKPOINTS, POLICY, latest_checkpoint
from .policy import PolicyTrainer, TrainSample

log = logging.getLogger("grpo")


class LoopLag:
    """Measures how late the event loop wakes a 10 ms sleeper: the lag every request would see."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period_s)
            self.samples.append(max(0.0, loop.time() - t - self.period_s))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def take_p99_ms(self) -> float:
        s, self.samples = sorted(self.samples), []
        return 1000 * s[min(len(s) - 1, int(0.99 * len(s)))] if s else 0.0

    def stop(self) -> None:
        if self._task:
            self._task.cancel()


def first_rows_per_env(rows: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    if n is None:
        return list(rows)
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        env = row_env(row)
        if seen.get(env, 0) < n:
            out.append(row)
            seen[env] = seen.get(env, 0) + 1
    return out


def peak_memory_gib() -> float:
    """Peak accelerator memory the trainer's torch allocated (GPU), else the process's peak RSS (CPU).

    On a GPU vLLM's pools come from its own allocator and are not in this figure; see bench/gpu_check.py
    for free memory as the device reports it.
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def limit_heap_fragmentation(threshold_mib: float) -> None:
    """Serve every allocation of at least `threshold_mib` MiB from its own mmap, unmapped when freed
    (CPU). glibc's threshold otherwise climbs to 32 MiB after the first large free, and a step's
    activations and vLLM's batches (1-30 MiB each) then fragment the heap, which holds the holes."""
    libc = _libc()
    m_mmap_threshold = -3  # malloc.h
    if libc is None or not hasattr(libc, "mallopt") or not libc.mallopt(m_mmap_threshold, int(threshold_mib * 2**20)):
        log.warning("run.cpu_heap_mmap_mib: this C library has no glibc mallopt; the setting has no effect")


def return_free_memory() -> None:
    """Hand the heap's free pages back to the OS after training (CPU). glibc keeps the freed
    activations of a step in its arenas, and the next step's generation and training each find
    them fragmented: without this the process's RSS grows step after step."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


@dataclass
class DataCursor:
    """Deterministic walk over the training rows: reshuffled each epoch, resumable by position."""

    rows: list[dict[str, Any]]
    seed: int
    position: int = 0

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.rows))
            order = list(range(len(self.rows)))
            random.Random(self.seed + epoch).shuffle(order)
            out.append(self.rows[order[i]])
            self.position += 1
        return out


def turn_index(rollout: Rollout) -> list[int]:
    """For each token, the model call whose prompt or generation it first appears in."""
    starts = [c.prompt_len for c in rollout.sequence.calls]
    out, k = [], 0
    for i in range(len(rollout.sequence.token_ids)):
        while k + 1 < len(starts) and i >= starts[k + 1]:
            k += 1
        out.append(k)
    return out


def overlong_penalties(rollouts: list[Rollout], cfg: Config) -> list[float]:
    """Each rollout's soft overlong penalty, from its longest model call (max_tokens is per call)."""
    g = cfg.grpo
    return [overlong_penalty(max((c.generation_len for c in r.sequence.calls), default=0), g.max_tokens,
                             g.overlong_buffer, g.overlong_penalty) for r in rollouts]


def advantages_for(rollouts: list[Rollout], cfg: Config) -> tuple[list[float], list[bool]]:
    """Group advantages of the shaped rewards (environment reward + overlong penalty), and which
    rollouts train.

    Truncated rollouts: "keep" trains on them; "mask" keeps their reward in the group's baseline but
    leaves them out of the loss; "drop" leaves them out of both, as if never sampled.
    """
    g = cfg.grpo
    rewards = [r.reward + p for r, p in zip(rollouts, overlong_penalties(rollouts, cfg))]
    in_baseline = [not (g.truncated == "drop" and r.truncated) for r in rollouts]
    normalize_std = g.normalize_std and g.loss != "dr_grpo"  # Dr.GRPO's point: no std normalisation
    adv = group_advantages(rewards, g.group_size, g.baseline, normalize_std, include=in_baseline)
    # an episode that overflowed on its first call has no tokens: nothing to train on
    keep = [not r.mask_sample and any(r.sequence.loss_mask) for r in rollouts]
    if g.drop_zero_variance_groups:
        flat = zero_variance_groups(rewards, g.group_size)
        keep = [k and not flat[i // g.group_size] for i, k in enumerate(keep)]
    if g.truncated != "keep":
        keep = [k and not r.truncated for k, r in zip(keep, rollouts)]
    return adv, keep


async def push_policy(engine: Engine, policy: PolicyTrainer, adapters: Path) -> None:
    """The trainer's weights into the engine: every weight, or with LoRA the adapter alone (saved
    under `adapters`, where vLLM reads it; older ones are removed)."""
    if not policy.lora:
        await engine.update_weights(policy.named_weights())
        return
    folder = await asyncio.to_thread(policy.save_adapter, adapters / f"step_{policy.step:06d}")
    await engine.load_adapter(folder)
    for old in adapters.glob("step_*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


class GRPOLoop:
    def __init__(self, cfg: Config, engine: Engine, gym: GymServers, store: RunStore, policy: PolicyTrainer,
                 rows: list[dict[str, Any]], progress: Callable[[int, dict[str, float]], None] | None = None,
                 pin: SamplingPin | None = None, eval_rows: list[dict[str, Any]] | None = None) -> None:
        self.cfg, self.engine, self.gym, self.store, self.policy = cfg, engine, gym, store, policy
        self.eval_rows = first_rows_per_env(eval_rows or [], cfg.grpo.eval_max_rows)
        self.pin = pin or SamplingPin()  # shared with the policy server: it refuses other temperatures
        self.cursor = DataCursor(rows, cfg.run.seed)
        self.step = 0
        self.progress = progress
        self.lag = LoopLag()

    # ---- checkpoints ------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.cfg.run_dir / CHECKPOINTS

    def save_checkpoint(self) -> None:
        final = self.ckpt_root / f"step_{self.step:06d}"
        tmp = self.ckpt_root / f".tmp_step_{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.policy.save_checkpoint(tmp / POLICY)
        (tmp / "loop.json").write_text(json.dumps({"step": self.step, "data_position": self.cursor.position}))
        tmp.rename(final)  # a checkpoint folder exists only once complete
        for old in sorted(self.ckpt_root.glob("step_*"))[:-1]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.cfg.run_dir)

    async def resume(self) -> bool:
        """Load the last checkpoint, drop store rows written after it, push its weights to vLLM."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            self.store.truncate_after(0)
            return False
        state = json.loads((ckpt / "loop.json").read_text())
        await asyncio.to_thread(self.policy.load_checkpoint, ckpt / POLICY)
        self.step, self.cursor.position = state["step"], state["data_position"]
        await asyncio.to_thread(self.store.truncate_after, self.step)
        await asyncio.to_thread(self.policy.offload_optimizer)  # its moments came back on the GPU
        await self.push_weights()
        log.info("resumed from %s (step %d)", ckpt, self.step)
        return True

    async def push_weights(self) -> None:
        await push_policy(self.engine, self.policy, self.cfg.run_dir / "adapters")

    @property
    def sampling(self) -> dict[str, float]:
        """What every training row is sampled with: the trainer's temperature and no truncation."""
        return {"temperature": self.cfg.grpo.temperature, "top_p": 1.0}

    # ---- one step ---------------------------------------------------------------------------------
    async def run(self, session: aiohttp.ClientSession) -> None:
        self.lag.start()
        try:
            while self.step < self.cfg.grpo.steps:
                metrics = await self.train_step(session)
                if self.progress:
                    self.progress(self.step, metrics)
                if self.step % self.cfg.grpo.checkpoint_every == 0 or self.step == self.cfg.grpo.steps:
                    await asyncio.to_thread(self.save_checkpoint)
        finally:
            self.lag.stop()

    async def train_step(self, session: aiohttp.ClientSession) -> dict[str, float]:
        g, gym = self.cfg.grpo, self.cfg.gym
        started = time.time()
        rows = self.cursor.take(g.rows_per_step)
        version = self.step  # the policy that generates has had `step` optimizer updates

        # The order matters on a GPU (see engine.Engine's lifecycle): the engine sleeps before the
        # trainer touches the GPU and its weights wake for the push only after the optimizer left.
        t0 = time.perf_counter()
        if g.offload_params:
            await asyncio.to_thread(self.policy.offload_params)
        restarts_before = self.gym.restarts
        t_wake = time.perf_counter()
        await self.engine.wake()
        t_wake = time.perf_counter() - t_wake
        self.pin.temperature = g.temperature
        try:
            rollouts = await collect(rows, g.group_size, self.gym, session, gym.concurrency, gym.request_timeout_s,
                                     gym.max_retries, sampling=self.sampling)
        finally:
            self.pin.temperature = None
        adv, keep = advantages_for(rollouts, self.cfg)
        samples = [TrainSample(r.sequence.token_ids, r.sequence.loss_mask, r.sequence.gen_logprobs, a)
                   for r, a, k in zip(rollouts, adv, keep) if k]
        trains = any(any(s.loss_mask) for s in samples)
        t_sleep = time.perf_counter()
        # a step that pushes every weight has no use for the engine's old ones: drop them, not copy them
        aborted = await self.engine.sleep(DISCARD_WEIGHTS if trains and not self.policy.lora else KEEP_WEIGHTS)
        t_sleep = time.perf_counter() - t_sleep
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        await asyncio.to_thread(return_free_memory)  # generation's buffers, before training's
        if g.offload_params:
            await asyncio.to_thread(self.policy.reload_params)
        train_logprobs: list[list[float]] = [[] for _ in rollouts]
        stats = None
        if trains:
            await asyncio.to_thread(self.policy.reload_optimizer)
            stats = await asyncio.to_thread(self.policy.train_step, samples)
            await asyncio.to_thread(self.policy.offload_optimizer)
            await asyncio.to_thread(return_free_memory)
            kept = iter(stats.train_logprobs)
            train_logprobs = [next(kept) if k else [] for k in keep]
        t_train = time.perf_counter() - t0

        t0 = time.perf_counter()
        if stats is not None:
            await self.push_weights()
        t_sync = time.perf_counter() - t0

        self.step += 1
        eval_metrics: dict[str, float] = {}
        eval_records: list[RolloutRecord] = []
        if g.eval_every and self.step % g.eval_every == 0 and self.eval_rows:
            eval_metrics, eval_records = await self.evaluate(session)
        metrics = self._metrics(rollouts, adv, keep, stats)
        metrics.update(eval_metrics)
        metrics[M.GYM_RESTARTS] = float(self.gym.restarts - restarts_before)
        metrics.update({M.TIME_GENERATION_S: t_gen, M.TIME_TRAINING_S: t_train, M.TIME_WEIGHT_SYNC_S: t_sync,
                        M.TIME_WAKE_S: t_wake, M.TIME_SLEEP_S: t_sleep, M.REQUESTS_ABORTED_AT_SLEEP: float(aborted),
                        M.PEAK_MEMORY_GIB: peak_memory_gib()})
        t0 = time.perf_counter()
        penalties = overlong_penalties(rollouts, self.cfg)
        metrics[M.OVERLONG_PENALTY_MEAN] = statistics.fmean(penalties)
        records = await asyncio.to_thread(self._records, rollouts, adv, train_logprobs, version, "train", penalties)
        records += eval_records
        metrics[M.TIME_LOGGING_S] = time.perf_counter() - t0
        metrics[M.TIME_STEP_S] = time.time() - started
        metrics[M.LOOP_LAG_P99_MS] = self.lag.take_p99_ms()
        gen_tokens = sum(sum(r.sequence.loss_mask) for r in rollouts)
        metrics[M.TOKENS_PER_S] = gen_tokens / t_gen if t_gen > 0 else 0.0
        await asyncio.to_thread(self.store.write_step,
                                StepRecord(self.step, version, metrics, started, time.time()), records)
        return metrics

    async def evaluate(self, session: aiohttp.ClientSession) -> tuple[dict[str, float], list[RolloutRecord]]:
        """The eval rows of every environment on the current policy, never trained on: their
        metrics and their store records (kind "eval", at this step)."""
        g, gym = self.cfg.grpo, self.cfg.gym
        t0 = time.perf_counter()
        await self.engine.wake()
        self.pin.temperature = g.eval_temperature
        try:
            rollouts = await collect(self.eval_rows, g.eval_group_size, self.gym, session, gym.concurrency,
                                     gym.request_timeout_s, gym.max_retries,
                                     sampling={"temperature": g.eval_temperature, "top_p": 1.0})
        finally:
            self.pin.temperature = None
        m = {M.EVAL_REWARD_MEAN: statistics.fmean(r.reward for r in rollouts)}
        for k, v in env_metrics(rollouts).items():
            env, name = k.split("/", 1)
            if name == "reward_mean":
                m[M.eval_env_reward(env)] = v
        records = await asyncio.to_thread(self._records, rollouts, [0.0] * len(rollouts),
                                          [[] for _ in rollouts], self.step, "eval")
        m[M.TIME_EVAL_S] = time.perf_counter() - t0
        return m, records

    def _metrics(self, rollouts: list[Rollout], adv: list[float], keep: list[bool], stats: Any) -> dict[str, float]:
        rewards = [r.reward for r in rollouts]
        flat = zero_variance_groups(rewards, self.cfg.grpo.group_size)
        m: dict[str, float] = {
            M.REWARD_MEAN: statistics.fmean(rewards),
            M.REWARD_STD: statistics.pstdev(rewards),
            M.ZERO_VARIANCE_GROUP_FRAC: sum(flat) / len(flat),
            M.TRUNCATION_RATE: sum(r.truncated for r in rollouts) / len(rollouts),
            M.ROLLOUTS_TRAINED: float(sum(keep)),
            M.GENERATED_TOKENS_MEAN: statistics.fmean(sum(r.sequence.loss_mask) for r in rollouts),
            M.TURNS_MEAN: statistics.fmean(r.num_turns for r in rollouts),
            M.INJECTED_MESSAGES: float(sum(r.num_injected for r in rollouts)),
            M.ROLLOUTS_RETRIED: float(sum(r.attempts > 1 for r in rollouts)),
            M.ADVANTAGE_ABS_MEAN: statistics.fmean(abs(a) for a in adv),
        }
        for k, v in env_metrics(rollouts).items():
            env, name = k.split("/", 1)
            m[M.env_reward(env) if name == "reward_mean" else M.env_metric(env, name)] = v
        if stats is not None:
            m.update({
                M.LOSS: stats.loss, M.KL: stats.kl, M.ENTROPY: stats.entropy,
                M.CLIP_LOW_FRAC: stats.clip_low_frac, M.CLIP_HIGH_FRAC: stats.clip_high_frac,
                M.CLIP_FRAC: stats.clip_low_frac + stats.clip_high_frac, M.CLIP_DUAL_FRAC: stats.clip_dual_frac,
                M.GRAD_NORM: stats.grad_norm,
                M.TOKEN_MULT_PROB_ERROR: stats.token_mult_prob_error, M.GEN_KL_ERROR: stats.gen_kl_error,
                M.LR: stats.lr, M.TIS_CAPPED_FRAC: stats.tis_capped_frac,
                M.MINIBATCHES: float(stats.num_minibatches), M.SKIPPED_OPTIMIZER_STEPS: float(stats.skipped_steps),
                M.TRAINED_TOKENS: float(stats.num_tokens), M.TRAINED_MODEL_TOKENS: float(stats.num_model_tokens),
                M.BACKWARD_MODEL_TOKENS: float(stats.backward_model_tokens),
            })
        return m

    def _records(self, rollouts: list[Rollout], adv: list[float], train_logprobs: list[list[float]],
                 version: int, kind: str = "train", penalties: list[float] | None = None) -> list[RolloutRecord]:
        tok = self.engine.tokenizer
        prefix = "" if kind == "train" else f"{kind}:"
        out = []
        for r, a, tl, pen in zip(rollouts, adv, train_logprobs, penalties or [0.0] * len(rollouts)):
            ids = r.sequence.token_ids
            out.append(RolloutRecord(
                step=self.step, policy_version=version, env=r.env, agent=r.agent, row_index=r.row_index,
                group_index=r.group_index, row_id=prefix + f"{self.step}:{r.row_index}:{r.group_index}", reward=r.reward,
                advantage=a, num_turns=r.num_turns, num_model_calls=r.num_model_calls,
                num_tool_calls=r.num_tool_calls, truncated=r.truncated, mask_sample=r.mask_sample,
                failure=r.failure, latency_s=r.latency_s, result=r.result, token_ids=ids,
                token_text=tok.batch_decode([[t] for t in ids]), loss_mask=r.sequence.loss_mask,
                turn_index=turn_index(r), gen_logprobs=r.sequence.gen_logprobs, train_logprobs=tl, kind=kind,
                overlong_penalty=pen,
            ))
        return out
