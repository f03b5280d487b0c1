"""Real NeMo Gym servers against the real engine (tiny model): rollouts, faults, shutdown.

One Gym group serves the module: string_match (single turn), example_single_tool_call (a tool
call, then an answer), example_multi_turn_gymnasium (scripted follow-up turns) and blackjack
(a game, multi-step when the model hits). Every rollout of every test is checked the same way:
each call's prompt begins with all ids seen before it, and the sequence is exactly the fresh prompt
ids (mask 0) followed by the generated ids (mask 1, their logprobs), call after call.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from gym.config import GymConfig
from gym.rollouts import collect, env_metrics, load_rows
from gym.servers import GymServers
from gym.rollout import Rollout

pytestmark = pytest.mark.slow

def _with_params(rows: list[dict], **params) -> list[dict]:
    out = copy.deepcopy(rows)
    for row in out:
        row["responses_create_params"].update(params)
    return out


@pytest.fixture(scope="module")
def gym(policy_server, tmp_path_factory):
    config = GymConfig(
        envs=[
            {"name": "string_match", "config": "string_match",
             "train_data": "resources_servers/string_match/data/example.jsonl"},
            {"name": "tool", "config": "example_single_tool_call",
             "train_data": "resources_servers/example_single_tool_call/data/example.jsonl",
             # a model that keeps calling tools would otherwise go on until the context is full
             "overrides": {"example_single_tool_call_simple_agent": {
                 "responses_api_agents": {"simple_agent": {"max_steps": 3}}}}},
            {"name": "multi_turn", "config": "example_multi_turn_gymnasium",
             "train_data": "resources_servers/example_multi_turn_gymnasium/data/example.jsonl"},
            {"name": "blackjack", "config": "blackjack",
             "train_data": "resources_servers/blackjack/data/example.jsonl"},
        ],
        head_port=0, concurrency=8, request_timeout_s=180, max_retries=3, startup_timeout_s=300,
    )
    servers = GymServers(config)
    log_dir = tmp_path_factory.mktemp("gym")
    policy_server.run(servers.start(policy_server.base_url, policy_server.model_name, None, log_dir))
    yield config, servers
    policy_server.run(servers.stop())


def _collect(policy_server, servers: GymServers, rows: list[dict], group_size: int) -> list[Rollout]:
    async def go() -> list[Rollout]:
        async with aiohttp.ClientSession() as session:
            return await collect(rows, group_size, servers, session, concurrency=8, timeout_s=180, max_retries=3)

    return policy_server.run(go())


def _rows(config: GymConfig, env: str, n: int, **params) -> list[dict]:
    e = config.env(env)
    return _with_params(load_rows(e.train_data, env=e.name, agent=e.agent)[:n], **params)


def assert_exact_layout(r: Rollout) -> None:
    """Rebuild the sequence from the raw result, independently of gym/sequence.py."""
    items = [it for it in r.result["response"]["output"] if it.get("generation_token_ids") is not None]
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    for n, it in enumerate(items):
        prompt, gen = it["prompt_token_ids"], it["generation_token_ids"]
        assert prompt[: len(ids)] == ids, f"{r.env}/row{r.row_index}/g{r.group_index}: call {n} breaks contiguity"
        assert len(gen) >= 1 and len(it["generation_log_probs"]) == len(gen)
        fresh = prompt[len(ids):]
        assert fresh, "every call after the first adds template glue or an observation"
        ids += fresh + gen
        mask += [0] * len(fresh) + [1] * len(gen)
        logprobs += [0.0] * len(fresh) + list(it["generation_log_probs"])
    assert items, "every rollout here has at least one generated call"
    assert ids == items[-1]["prompt_token_ids"] + items[-1]["generation_token_ids"]
    assert r.sequence.token_ids == ids
    assert r.sequence.loss_mask == mask
    assert r.sequence.gen_logprobs == pytest.approx(logprobs)
    assert all(lp <= 0.0 for lp, m in zip(r.sequence.gen_logprobs, mask) if m)
    assert [(c.prompt_len, c.generation_len) for c in r.sequence.calls] == [
        (len(it["prompt_token_ids"]), len(it["generation_token_ids"])) for it in items]


def assert_input_order(rollouts: list[Rollout], n_rows: int, group_size: int) -> None:
    assert [(r.row_index, r.group_index) for r in rollouts] == [
        (i, g) for i in range(n_rows) for g in range(group_size)]


def test_string_match_single_turn(gym, policy_server):
    config, servers = gym
    rows = _rows(config, "string_match", 4, max_output_tokens=16, temperature=1.0)
    rollouts = _collect(policy_server, servers, rows, group_size=2)
    assert_input_order(rollouts, 4, 2)
    from transformers import AutoTokenizer

    from tests.tiny_model import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    for r in rollouts:
        assert_exact_layout(r)
        assert (r.env, r.agent, r.num_model_calls, r.num_turns, r.num_tool_calls) == (
            "string_match", "string_match_simple_agent", 1, 1, 0)
        assert r.reward in (0.0, 1.0)
        assert sum(r.sequence.loss_mask) <= 16
        # hitting max_output_tokens is truncation; stopping earlier is not
        assert r.truncated == (sum(r.sequence.loss_mask) == 16)
        # the mask-0 part is exactly the chat template of the row's question
        question = rows[r.row_index]["responses_create_params"]["input"][0]["content"][0]["text"]
        expected = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
        assert tok.decode(r.sequence.token_ids[: r.sequence.calls[0].prompt_len]) == expected
    metrics = env_metrics(rollouts)
    assert metrics["string_match/turns_mean"] == 1.0
    assert metrics["string_match/rollouts"] == 8.0


def test_tool_call_then_answer(gym, policy_server):
    config, servers = gym
    # the shipped rows: a developer prompt, a question about sf, the get_weather tool
    rows = _rows(config, "tool", 3, max_output_tokens=48, temperature=0.0)
    rollouts = _collect(policy_server, servers, rows, group_size=2)
    assert_input_order(rollouts, 3, 2)
    for r in rollouts:
        assert_exact_layout(r)
    with_tools = [r for r in rollouts if r.num_tool_calls]
    assert with_tools, "the tiny model was trained to call get_weather on these rows (tests/tiny_model.py)"
    for r in with_tools:
        output = r.result["response"]["output"]
        assert [it["type"] for it in output][:2] == ["function_call", "function_call_output"]
        assert output[0]["name"] == "get_weather"
        assert 2 <= r.num_model_calls <= 3                       # max_steps: 3
        assert len(r.sequence.calls) == r.num_model_calls        # no overflow: 3 x 48 tokens fit
        assert r.sequence.calls[0].tool_calls == 1
        assert r.reward == 1.0
        # the tool's answer sits in the mask-0 stretch between the two generations
        first = r.sequence.calls[0]
        between = r.sequence.loss_mask[first.prompt_len + first.generation_len: r.sequence.calls[1].prompt_len]
        assert between and set(between) == {0}


def test_scripted_multi_turn(gym, policy_server):
    config, servers = gym
    rows = _rows(config, "multi_turn", 2, max_output_tokens=12, temperature=1.0)
    rollouts = _collect(policy_server, servers, rows, group_size=2)
    assert_input_order(rollouts, 2, 2)
    for r in rollouts:
        assert_exact_layout(r)
        follow_ups = rows[r.row_index]["follow_ups"]
        assert r.num_model_calls == len(follow_ups) + 1 == len(r.sequence.calls) == r.num_turns
        user_turns = [it for it in r.result["response"]["output"] if it.get("role") == "user"]
        assert [it["content"] for it in user_turns] == follow_ups


def test_blackjack(gym, policy_server):
    config, servers = gym
    rows = _rows(config, "blackjack", 2, max_output_tokens=12, temperature=1.0)
    rollouts = _collect(policy_server, servers, rows, group_size=3)
    assert_input_order(rollouts, 2, 3)
    for r in rollouts:
        assert_exact_layout(r)
        assert r.reward in (-1.0, 0.0, 1.0)
        assert r.result["terminated"] or r.result["truncated"]
        observations = [it for it in r.result["response"]["output"] if it.get("role") == "user"]
        assert len(observations) == r.num_model_calls - 1


def _resources_server_python(servers: GymServers, name: str) -> int:
    for pid in servers.server_pids(name):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if any(part.endswith(b"python") for part in cmdline[:1]) and b"app.py" in cmdline:
            return pid
    raise AssertionError(f"no python process serving {name}: {servers.server_pids(name)}")


def test_a_resources_server_killed_mid_batch_is_restarted_and_every_rollout_arrives_once(gym, policy_server):
    config, servers = gym
    rows = _rows(config, "string_match", 5, max_output_tokens=24, temperature=1.0)
    rows = copy.deepcopy([rows[i % 5] for i in range(8)])   # the file has 5 rows; a batch of 8
    restarts_before = servers.restarts
    victim = _resources_server_python(servers, "string_match")

    async def go() -> tuple[list[Rollout], bool]:
        async with aiohttp.ClientSession() as session:
            task = asyncio.ensure_future(
                collect(rows, 4, servers, session, concurrency=8, timeout_s=180, max_retries=3))
            await asyncio.sleep(0.3)  # posts are out: agents are seeding sessions and calling the model
            os.kill(victim, signal.SIGKILL)
            killed_mid_batch = not task.done()
            return await task, killed_mid_batch

    rollouts, killed_mid_batch = policy_server.run(go())
    assert killed_mid_batch
    assert_input_order(rollouts, 8, 4)            # all 32, each (row, group) exactly once
    assert len({id(r.result) for r in rollouts}) == 32
    for r in rollouts:
        assert_exact_layout(r)
    assert servers.restarts >= restarts_before + 1
    assert _resources_server_python(servers, "string_match") != victim
    status = {s.name: s for s in servers.status()}
    assert status["string_match"].restarts >= 1 and status["string_match"].up


def test_a_hung_resources_server_is_noticed_restarted_and_its_rollouts_retried(gym, policy_server):
    # SIGSTOP: the process lives and the kernel still accepts connections on its port, it just never
    # answers; only an HTTP probe with a deadline can tell
    config, servers = gym
    rows = _rows(config, "string_match", 5, max_output_tokens=24, temperature=1.0)
    rows = copy.deepcopy([rows[i % 5] for i in range(8)])
    restarts_before = servers.restarts
    victim = _resources_server_python(servers, "string_match")

    async def go() -> tuple[list[Rollout], bool, float]:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            task = asyncio.ensure_future(
                collect(rows, 4, servers, session, concurrency=8, timeout_s=180, max_retries=3))
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGSTOP)
            stopped_mid_batch = not task.done()
            return await task, stopped_mid_batch, time.monotonic() - started

    try:
        rollouts, stopped_mid_batch, took = policy_server.run(go())
    finally:
        try:
            os.kill(victim, signal.SIGKILL)   # if the launcher has not already
        except ProcessLookupError:
            pass
    assert stopped_mid_batch
    assert took < 60, f"the batch took {took:.0f} s"
    assert_input_order(rollouts, 8, 4)
    assert len({id(r.result) for r in rollouts}) == 32
    assert servers.restarts >= restarts_before + 1
    assert _resources_server_python(servers, "string_match") != victim


def test_status_lists_every_server_up(gym, policy_server):
    _, servers = gym
    # the tests before this one kill and hang servers: wait until the watchdog has seen them all back
    policy_server.run(servers.wait_healthy(120))
    status = {s.name: s for s in servers.status()}
    assert {"launcher", "head", "string_match", "string_match_simple_agent", "example_single_tool_call",
            "example_single_tool_call_simple_agent", "example_multi_turn_gymnasium",
            "example_multi_turn_gymnasium_agent", "blackjack", "blackjack_gymnasium_agent",
            "policy_model"} <= set(status)
    assert status["policy_model"].kind == "model" and status["blackjack"].kind == "resources"
    assert all(s.up for s in status.values())
    assert all(Path(s.log_path).exists() for s in status.values())


def test_stop_leaves_no_process(gym, policy_server):
    """Last in the module: ends the group the other tests used."""
    _, servers = gym
    assert len(servers.processes()) > 5
    policy_server.run(servers.stop())
    deadline = time.monotonic() + 10
    while servers.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert servers.processes() == []
