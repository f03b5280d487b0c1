"""build_sequence / episode_shape on Gym /run results.

The results below were captured from real NeMo Gym 0.7.0 servers (string_match, blackjack,
example_single_tool_call) and trimmed to the fields gym/sequence.py reads; their token ids are
small made-up numbers so every expected value can be written out.
"""

from __future__ import annotations

import copy

import pytest

from gym.sequence import ContiguityError, MissingTokenIdsError, build_sequence, episode_shape
from gym.rollout import ModelCall


def _text(t: str) -> list[dict]:
    return [{"type": "output_text", "text": t}]


SINGLE_TURN = {
    "reward": 1.0, "mask_sample": False, "failure_kind": None, "failure_reason": None,
    "response": {"status": "completed", "incomplete_details": None, "output": [
        {"type": "message", "role": "assistant", "prompt_token_ids": [11, 12, 13],
         "generation_token_ids": [7, 8, 2], "generation_log_probs": [-0.1, -0.2, -0.3],
         "content": _text("The answer is \\boxed{Paris}.")},
    ]},
}

TOOL_CALL = {
    "reward": 1.0, "mask_sample": False, "failure_kind": None, "failure_reason": None,
    "response": {"status": "completed", "incomplete_details": None, "output": [
        {"type": "function_call", "name": "get_weather", "arguments": "{\"city\": \"sf\"}", "call_id": "call_1",
         "prompt_token_ids": [11, 12, 13], "generation_token_ids": [7, 8, 2],
         "generation_log_probs": [-0.1, -0.2, -0.3]},
        {"type": "function_call_output", "call_id": "call_1",
         "output": "{\"city\":\"sf\",\"weather_description\":\"The weather in sf is cold.\"}"},
        {"type": "message", "role": "assistant", "prompt_token_ids": [11, 12, 13, 7, 8, 2, 21, 22, 23],
         "generation_token_ids": [9, 2], "generation_log_probs": [-0.4, -0.5],
         "content": _text("It is cold.")},
    ]},
}

BLACKJACK = {
    "reward": 1.0, "mask_sample": False, "failure_kind": None, "failure_reason": None,
    "terminated": True, "truncated": False, "info": {"result": "win"},
    "response": {"status": "completed", "incomplete_details": None, "output": [
        {"type": "message", "role": "assistant", "prompt_token_ids": [11, 12, 13],
         "generation_token_ids": [7, 8, 2], "generation_log_probs": [-0.1, -0.2, -0.3],
         "content": _text("<action>hit</action>")},
        {"type": "message", "role": "user",
         "content": "Your hand: [A, Q, Q] = 21\nDealer shows: 5\nRespond with <action>hit</action> or <action>stand</action>."},
        {"type": "message", "role": "assistant", "prompt_token_ids": [11, 12, 13, 7, 8, 2, 31, 32, 33],
         "generation_token_ids": [5, 2], "generation_log_probs": [-0.6, -0.7],
         "content": _text("<action>stand</action>")},
    ]},
}

# What Gym returns when the policy answered HTTP 400 "maximum context length": an empty
# assistant message without token ids, and the episode ends.
CONTEXT_OVERFLOW = {
    "reward": 0.0, "mask_sample": False, "failure_kind": None, "failure_reason": None,
    "response": {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}, "output": [
        {"type": "message", "role": "assistant", "content": _text("")},
    ]},
}

# finish_reason "length": the ids are there, the response says incomplete.
MAX_TOKENS = {
    "reward": 0.0, "mask_sample": False, "failure_kind": None, "failure_reason": None,
    "response": {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}, "output": [
        {"type": "message", "role": "assistant", "prompt_token_ids": [11, 12, 13],
         "generation_token_ids": [7, 8, 9], "generation_log_probs": [-0.1, -0.2, -0.3],
         "content": _text("The answer is")},
    ]},
}


def test_single_turn_sequence_is_prompt_then_generation():
    seq = build_sequence(SINGLE_TURN, "sm/row0/g0")
    assert seq.token_ids == [11, 12, 13, 7, 8, 2]
    assert seq.loss_mask == [0, 0, 0, 1, 1, 1]
    assert seq.gen_logprobs == [0.0, 0.0, 0.0, -0.1, -0.2, -0.3]
    assert seq.calls == [ModelCall(prompt_len=3, generation_len=3, tool_calls=0)]


def test_tool_call_episode_masks_the_tool_output_and_keeps_both_generations():
    seq = build_sequence(TOOL_CALL, "tool/row0/g0")
    assert seq.token_ids == [11, 12, 13, 7, 8, 2, 21, 22, 23, 9, 2]
    assert seq.loss_mask == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]
    assert seq.gen_logprobs == [0.0, 0.0, 0.0, -0.1, -0.2, -0.3, 0.0, 0.0, 0.0, -0.4, -0.5]
    assert seq.calls == [ModelCall(3, 3, tool_calls=1), ModelCall(9, 2, tool_calls=0)]


def test_multi_turn_episode_masks_the_observation():
    seq = build_sequence(BLACKJACK, "bj/row0/g0")
    assert seq.token_ids == [11, 12, 13, 7, 8, 2, 31, 32, 33, 5, 2]
    assert seq.loss_mask == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]
    assert [c.prompt_len for c in seq.calls] == [3, 9]


def test_a_prompt_that_rewrites_an_earlier_id_is_a_contiguity_error_naming_the_rollout():
    broken = copy.deepcopy(TOOL_CALL)
    broken["response"]["output"][2]["prompt_token_ids"] = [11, 12, 13, 7, 99, 2, 21, 22, 23]
    with pytest.raises(ContiguityError, match=r"tool/row3/g1: call 1's prompt .* position 4: expected 8, got 99"):
        build_sequence(broken, "tool/row3/g1")


def test_a_prompt_shorter_than_what_came_before_is_a_contiguity_error():
    broken = copy.deepcopy(BLACKJACK)
    broken["response"]["output"][2]["prompt_token_ids"] = [11, 12, 13, 7]
    with pytest.raises(ContiguityError, match="bj/row0/g0: call 1's prompt \\(4 ids\\)"):
        build_sequence(broken, "bj/row0/g0")


def test_context_overflow_gives_an_empty_sequence_and_counts_as_truncated():
    seq = build_sequence(CONTEXT_OVERFLOW, "sm/row0/g0")
    assert (seq.token_ids, seq.loss_mask, seq.calls) == ([], [], [])
    shape = episode_shape(CONTEXT_OVERFLOW)
    assert (shape.truncated, shape.truncation, shape.num_model_calls, shape.num_turns) == (True, "context_overflow", 1, 0)


def test_overflow_after_a_tool_call_keeps_the_first_call():
    result = copy.deepcopy(TOOL_CALL)
    result["response"]["output"][2] = {"type": "message", "role": "assistant", "content": _text("")}
    seq = build_sequence(result, "tool/row0/g0")
    assert seq.token_ids == [11, 12, 13, 7, 8, 2]
    shape = episode_shape(result)
    assert (shape.truncated, shape.truncation, shape.num_model_calls, shape.num_tool_calls) == (True, "context_overflow", 2, 1)


def test_a_generation_stopped_by_max_tokens_counts_as_truncated():
    shape = episode_shape(MAX_TOKENS)
    assert (shape.truncated, shape.truncation) == (True, "max_output_tokens")
    assert build_sequence(MAX_TOKENS, "sm/row0/g0").loss_mask == [0, 0, 0, 1, 1, 1]


def test_an_earlier_call_at_the_token_limit_counts_as_truncated():
    # A multi-turn agent carries on after a call hits max_output_tokens; only the length shows it.
    result = copy.deepcopy(BLACKJACK)
    result["responses_create_params"] = {"max_output_tokens": 3}
    assert episode_shape(result).truncation == "max_output_tokens"
    result["responses_create_params"] = {"max_output_tokens": 4}
    assert episode_shape(result).truncated is False


def test_episode_counts():
    assert episode_shape(SINGLE_TURN).__dict__ == {
        "num_model_calls": 1, "num_tool_calls": 0, "num_turns": 1, "truncated": False, "truncation": None, "num_injected": 0}
    assert episode_shape(TOOL_CALL).__dict__ == {
        "num_model_calls": 2, "num_tool_calls": 1, "num_turns": 1, "truncated": False, "truncation": None, "num_injected": 0}
    assert episode_shape(BLACKJACK).__dict__ == {
        "num_model_calls": 2, "num_tool_calls": 0, "num_turns": 2, "truncated": False, "truncation": None, "num_injected": 0}


def test_a_reply_without_token_ids_means_the_adapter_was_not_asked_for_them():
    result = copy.deepcopy(SINGLE_TURN)
    for key in ("prompt_token_ids", "generation_token_ids", "generation_log_probs"):
        del result["response"]["output"][0][key]
    with pytest.raises(MissingTokenIdsError, match="sm/row0/g0: .*return_token_id_information"):
        build_sequence(result, "sm/row0/g0")


def test_logprobs_must_match_generated_ids():
    result = copy.deepcopy(SINGLE_TURN)
    result["response"]["output"][0]["generation_log_probs"] = [-0.1]
    with pytest.raises(ValueError, match="3 generated ids but 1 logprobs"):
        build_sequence(result, "sm/row0/g0")


def test_reasoning_and_message_of_one_call_are_one_call():
    # The adapter puts the ids on the LAST item of a call; a reasoning item before it has none.
    result = copy.deepcopy(SINGLE_TURN)
    result["response"]["output"].insert(0, {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}]})
    assert episode_shape(result).num_model_calls == 1
    assert build_sequence(result, "sm/row0/g0").token_ids == [11, 12, 13, 7, 8, 2]


def test_assistant_text_the_agent_injected_is_context_not_a_model_call():
    # the agent wrote an assistant message itself (no ids); the next call's prompt holds its tokens
    result = copy.deepcopy(BLACKJACK)
    out = result["response"]["output"]
    out.insert(1, {"type": "message", "role": "assistant", "content": _text("(dealer is thinking)")})
    out[3]["prompt_token_ids"] = [11, 12, 13, 7, 8, 2, 41, 42, 31, 32, 33]
    seq = build_sequence(result, "bj/row0/g0")
    assert seq.token_ids == [11, 12, 13, 7, 8, 2, 41, 42, 31, 32, 33, 5, 2]
    assert seq.loss_mask == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    shape = episode_shape(result)
    assert (shape.num_injected, shape.num_model_calls, shape.truncated) == (1, 2, False)
