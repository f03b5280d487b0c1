"""Post dataset rows to NeMo Gym agents and turn the results into Rollouts, in input order.

Every row goes out `group_size` times (one GRPO group). Posts run concurrently under a semaphore,
each with a timeout. A post that fails for a reason a restart can cure (the connection dropped,
the agent answered 5xx because a server behind it died, a timeout) waits until the watchdog sees
every server up again and is retried; each (row, group index) ends as exactly one Rollout, built
from the one attempt that succeeded.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from gym.sequence import build_sequence, episode_shape
from gym.rollout import Rollout

if TYPE_CHECKING:
    from gym.config import GymConfig
    from gym.servers import GymServers

# Our tags on a row; stripped before the row goes to Gym.
ENV_KEY = "_grpo_env"
_PRIVATE_PREFIX = "_grpo_"
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
RETRY_SETTLE_S = 2.0


class GymRunError(RuntimeError):
    """A rollout could not be collected (bad row, or retries exhausted); names the rollout."""


class _Retryable(Exception):
    pass


# -- datasets ---------------------------------------------------------------------------------
def load_rows(path: str | Path, env: str | None = None, agent: str | None = None) -> list[dict[str, Any]]:
    """Gym JSONL rows; with `env`/`agent`, each row is tagged with its environment and routed to
    that agent (`agent_ref`), overriding whatever agent the file names."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            if not isinstance(row, dict) or "responses_create_params" not in row:
                raise ValueError(f"{path}:{n}: a Gym row needs `responses_create_params`")
            if env is not None:
                row[ENV_KEY] = env
            if agent is not None:
                row["agent_ref"] = {"type": "responses_api_agents", "name": agent}
            rows.append(row)
    return rows


def load_env_rows(config: GymConfig, split: str = "train") -> list[dict[str, Any]]:
    """The rows of every configured environment, tagged; `split` is "train" or "eval"."""
    rows: list[dict[str, Any]] = []
    for env in config.envs:
        path = env.train_data if split == "train" else env.eval_data
        if path is not None:
            rows += load_rows(path, env=env.name, agent=env.agent)
    return rows


def row_env(row: dict[str, Any]) -> str:
    return row.get(ENV_KEY) or row_agent(row)


def row_agent(row: dict[str, Any]) -> str:
    try:
        return row["agent_ref"]["name"]
    except (KeyError, TypeError):
        raise GymRunError("row has no agent_ref.name; load rows with load_rows(path, env=, agent=)") from None


def gym_body(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith(_PRIVATE_PREFIX)}


def with_sampling(body: dict[str, Any], sampling: dict[str, Any] | None) -> dict[str, Any]:
    if not sampling:
        return body
    params = {**(body.get("responses_create_params") or {}), **sampling}
    return {**body, "responses_create_params": params}


# -- collection -------------------------------------------------------------------------------
async def collect(
    rows: list[dict[str, Any]],
    group_size: int,
    servers: GymServers,
    session: aiohttp.ClientSession,
    concurrency: int,
    timeout_s: float,
    max_retries: int,
    sampling: dict[str, Any] | None = None,
) -> list[Rollout]:
    """G rollouts of every row, ordered row by row, then by group index.

    `sampling` (e.g. temperature, top_p) overwrites those keys of every row's
    `responses_create_params`: what a row or its agent asks for must not change the distribution
    the trainer assumes.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    semaphore = asyncio.Semaphore(concurrency)
    bodies = [with_sampling(gym_body(row), sampling) for row in rows]

    async def one(row_index: int, group_index: int) -> Rollout:
        row = rows[row_index]
        env, agent = row_env(row), row_agent(row)
        name = f"{env}/row{row_index}/g{group_index}"
        async with semaphore:
            result, latency, attempts = await _post_with_retries(
                name, agent, bodies[row_index], servers, session, timeout_s, max_retries)
        return to_rollout(result, row_index, group_index, env, agent, latency, attempts)

    async with asyncio.TaskGroup() as tg:  # one failure cancels the rest: no half-recorded batch
        tasks = [tg.create_task(one(r, g)) for r in range(len(rows)) for g in range(group_size)]
    return [t.result() for t in tasks]


async def _post_with_retries(
    name: str, agent: str, body: dict[str, Any], servers: GymServers,
    session: aiohttp.ClientSession, timeout_s: float, max_retries: int,
) -> tuple[dict[str, Any], float, int]:
    errors: list[str] = []
    for attempt in range(1, max_retries + 2):
        started = time.monotonic()
        try:
            url = servers.agent_url(agent) + "/run"
            async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status in _RETRY_STATUSES:
                    raise _Retryable(f"HTTP {resp.status}: {(await resp.text())[:500]}")
                if resp.status >= 400:
                    raise GymRunError(f"{name}: agent {agent} answered HTTP {resp.status}: {(await resp.text())[:2000]}")
                result = await resp.json(content_type=None)
            return result, time.monotonic() - started, attempt
        except (_Retryable, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
            errors.append(f"attempt {attempt}: {type(e).__name__}: {e}")
        if attempt <= max_retries:
            # A server behind the agent may have died. Give the launcher and the watchdog time to
            # notice (it may still look healthy this instant), then wait until all answer again.
            await asyncio.sleep(RETRY_SETTLE_S * attempt)
            await servers.wait_healthy()
    raise GymRunError(f"{name}: no result after {max_retries + 1} attempts:\n  " + "\n  ".join(errors))


def to_rollout(
    result: dict[str, Any], row_index: int, group_index: int, env: str, agent: str,
    latency_s: float, attempts: int = 1,
) -> Rollout:
    name = f"{env}/row{row_index}/g{group_index}"
    shape = episode_shape(result)
    failure = " ".join(str(result[k]) for k in ("failure_kind", "failure_reason") if result.get(k)) or None
    return Rollout(
        row_index=row_index,
        group_index=group_index,
        env=env,
        agent=agent,
        reward=float(result["reward"]),
        sequence=build_sequence(result, name),
        num_turns=shape.num_turns,
        num_model_calls=shape.num_model_calls,
        num_tool_calls=shape.num_tool_calls,
        truncated=shape.truncated,
        mask_sample=bool(result.get("mask_sample", False)),
        failure=failure,
        latency_s=latency_s,
        result=result,
        attempts=attempts,
        num_injected=shape.num_injected,
    )


# -- metrics ----------------------------------------------------------------------------------
# Fields of a verify response that env_metrics already reports under its own names.
_REPORTED_FIELDS = frozenset({"reward", "mask_sample"})


def env_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """Per environment: reward mean/std/min/max, turns, tool calls, truncation, failures, and the
    mean of every other numeric field the environment's verify response carries (`verify_<field>`),
    so environment-specific metrics reach the store without a list to keep up to date."""
    by_env: dict[str, list[Rollout]] = defaultdict(list)
    for r in rollouts:
        by_env[r.env].append(r)
    out: dict[str, float] = {}
    for env, rs in sorted(by_env.items()):
        rewards = [r.reward for r in rs]
        mean = sum(rewards) / len(rewards)
        n = float(len(rs))
        out[f"{env}/reward_mean"] = mean
        out[f"{env}/reward_std"] = math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards))
        out[f"{env}/reward_min"] = min(rewards)
        out[f"{env}/reward_max"] = max(rewards)
        out[f"{env}/turns_mean"] = sum(r.num_turns for r in rs) / n
        out[f"{env}/tool_calls_mean"] = sum(r.num_tool_calls for r in rs) / n
        out[f"{env}/truncation_rate"] = sum(r.truncated for r in rs) / n
        out[f"{env}/failure_count"] = float(sum(r.failure is not None for r in rs))
        out[f"{env}/mask_sample_count"] = float(sum(r.mask_sample for r in rs))
        out[f"{env}/injected_messages"] = float(sum(r.num_injected for r in rs))
        out[f"{env}/latency_mean_s"] = sum(r.latency_s for r in rs) / n
        out[f"{env}/rollouts"] = n
        fields: dict[str, list[float]] = defaultdict(list)
        for r in rs:
            for k, v in r.result.items():
                if k not in _REPORTED_FIELDS and isinstance(v, (int, float)) and math.isfinite(v):
                    fields[k].append(float(v))  # bools count as 0/1
        for k, vs in sorted(fields.items()):
            out[f"{env}/verify_{k}"] = sum(vs) / len(vs)  # over the rollouts that carry the field
    return out
