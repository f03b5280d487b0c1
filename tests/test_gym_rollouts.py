"""Rows in, Rollouts out: loading Gym rows, result -> Rollout, and per-env metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gym.rollouts import ENV_KEY, env_metrics, gym_body, load_rows, to_rollout
from tests.test_gym_sequence import BLACKJACK, CONTEXT_OVERFLOW, SINGLE_TURN, TOOL_CALL


def test_load_rows_tags_env_and_routes_to_the_agent(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"responses_create_params": {"input": "2+2?"}, "expected_answer": "4",
                    "agent_ref": {"type": "responses_api_agents", "name": "other"}}) + "\n\n"
        + json.dumps({"responses_create_params": {"input": "3+3?"}, "expected_answer": "6"}) + "\n")
    rows = load_rows(path, env="math", agent="string_match_simple_agent")
    assert [r["expected_answer"] for r in rows] == ["4", "6"]
    assert all(r[ENV_KEY] == "math" for r in rows)
    assert all(r["agent_ref"] == {"type": "responses_api_agents", "name": "string_match_simple_agent"} for r in rows)
    # our tag never reaches Gym
    assert gym_body(rows[0]) == {"responses_create_params": {"input": "2+2?"}, "expected_answer": "4",
                                 "agent_ref": {"type": "responses_api_agents", "name": "string_match_simple_agent"}}


def test_load_rows_names_the_bad_line(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"responses_create_params": {"input": "a"}}\n{"input": "b"}\n')
    with pytest.raises(ValueError, match="rows.jsonl:2: a Gym row needs `responses_create_params`"):
        load_rows(path)


def test_a_result_becomes_a_rollout():
    r = to_rollout(TOOL_CALL, row_index=3, group_index=1, env="tool", agent="example_single_tool_call_simple_agent",
                   latency_s=0.25, attempts=2)
    assert (r.row_index, r.group_index, r.env, r.reward, r.attempts, r.latency_s) == (3, 1, "tool", 1.0, 2, 0.25)
    assert (r.num_model_calls, r.num_tool_calls, r.num_turns, r.truncated, r.mask_sample, r.failure) == (
        2, 1, 1, False, False, None)
    assert r.sequence.loss_mask == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]
    assert r.result is TOOL_CALL


def test_gym_failure_fields_are_kept():
    result = dict(SINGLE_TURN, mask_sample=True, failure_kind="judge_unavailable", failure_reason="judge timed out")
    r = to_rollout(result, 0, 0, "sm", "a", 0.1)
    assert (r.mask_sample, r.failure) == (True, "judge_unavailable judge timed out")


def test_env_metrics_per_environment():
    rollouts = [
        to_rollout(SINGLE_TURN, 0, 0, "sm", "a", 1.0),
        to_rollout(dict(SINGLE_TURN, reward=0.0), 0, 1, "sm", "a", 3.0),
        to_rollout(CONTEXT_OVERFLOW, 1, 0, "sm", "a", 2.0),
        to_rollout(dict(SINGLE_TURN, reward=1.0), 1, 1, "sm", "a", 2.0),
        to_rollout(BLACKJACK, 0, 0, "bj", "b", 1.0),
        to_rollout(dict(BLACKJACK, reward=-1.0, failure_reason="env error"), 0, 1, "bj", "b", 1.0),
    ]
    m = env_metrics(rollouts)
    assert m["sm/reward_mean"] == 0.5
    assert m["sm/reward_std"] == 0.5
    assert (m["sm/reward_min"], m["sm/reward_max"]) == (0.0, 1.0)
    assert m["sm/turns_mean"] == 0.75        # the overflowed rollout never got to answer
    assert m["sm/truncation_rate"] == 0.25
    assert m["sm/failure_count"] == 0.0
    assert m["sm/latency_mean_s"] == 2.0
    assert m["bj/reward_mean"] == 0.0
    assert m["bj/reward_std"] == 1.0
    assert m["bj/turns_mean"] == 2.0
    assert m["bj/failure_count"] == 1.0
    assert m["bj/rollouts"] == 2.0


def test_every_numeric_field_of_a_verify_response_is_averaged_per_environment():
    rollouts = [
        to_rollout(dict(BLACKJACK, judge_score=0.25, note="text is not a metric"), 0, 0, "bj", "b", 1.0),
        to_rollout(dict(BLACKJACK, terminated=False), 0, 1, "bj", "b", 1.0),
        to_rollout(SINGLE_TURN, 0, 0, "sm", "a", 1.0),
    ]
    m = env_metrics(rollouts)
    assert m["bj/verify_terminated"] == 0.5      # a bool counts as 0/1
    assert m["bj/verify_truncated"] == 0.0
    assert m["bj/verify_judge_score"] == 0.25    # over the rollouts that carry it
    assert "bj/verify_note" not in m and "bj/verify_reward" not in m
    assert not any(k.startswith("sm/verify_") for k in m)


def test_training_sampling_overwrites_what_a_row_asks_for():
    from gym.rollouts import with_sampling

    row = {"responses_create_params": {"input": "hi", "temperature": 0.7, "top_p": 0.9}, "agent_ref": {"name": "a"}}
    body = with_sampling(row, {"temperature": 1.0, "top_p": 1.0})
    assert body["responses_create_params"] == {"input": "hi", "temperature": 1.0, "top_p": 1.0}
    assert row["responses_create_params"]["temperature"] == 0.7   # the dataset row itself is untouched
