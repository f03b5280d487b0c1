"""One Gym result -> one token sequence for training, plus what the episode looked like.

Gym's `vllm_model` adapter puts `prompt_token_ids`, `generation_token_ids` and
`generation_log_probs` on the LAST output item of each policy call (an assistant message, a
function call or a reasoning item; the items before it in that call carry none). Tool outputs and
environment observations sit between calls and carry no ids: they reach the sequence through the
next call's prompt. So the sequence is built call by call: the part of each prompt not seen before
(mask 0), then the call's generation (mask 1, its sampling logprobs). Each prompt must begin with
every id seen before it; otherwise training would see a context the model never saw.

A call that overflowed the context comes back as an assistant message with no ids (Gym turns the
policy's HTTP 400 into an empty reply) and ends the episode: that is truncation, as is a call that
stopped at its token limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gym.rollout import ModelCall, TokenSequence

# Output items the model produced. Everything else (function_call_output, user/observation
# messages) came from the agent or the environment.
_MODEL_ITEM_TYPES = frozenset({"function_call", "reasoning"})


class ContiguityError(ValueError):
    """A call's prompt does not begin with the ids of the calls before it."""


class MissingTokenIdsError(ValueError):
    """A rollout carries no token ids at all: the policy model adapter was not asked for them."""


@dataclass
class _Call:
    """One policy call found in the output items."""

    items: list[dict[str, Any]] = field(default_factory=list)
    ids_item: dict[str, Any] | None = None   # the item carrying the three token fields

    @property
    def tool_calls(self) -> int:
        return sum(1 for it in self.items if it.get("type") == "function_call")

    @property
    def injected(self) -> bool:
        """Assistant text the agent wrote into the output itself: the policy never sampled it."""
        return self.ids_item is None and (_has_text(self) or self.tool_calls > 0)

    @property
    def says_something(self) -> bool:
        """A reply (not only tool calls) that the model actually generated (an overflow did not)."""
        return self.ids_item is not None and any(_is_assistant_message(it) for it in self.items)


@dataclass
class EpisodeShape:
    num_model_calls: int      # policy calls, including one that overflowed the context
    num_tool_calls: int       # function_call items the model emitted
    num_turns: int            # generated calls that answered with a message (not only tool calls)
    truncated: bool
    truncation: str | None    # "context_overflow" | "max_output_tokens" | None
    num_injected: int = 0     # assistant items with text but no ids (written by the agent, not sampled)


def _is_assistant_message(item: dict[str, Any]) -> bool:
    return item.get("type", "message") == "message" and item.get("role") == "assistant"


def _is_model_item(item: dict[str, Any]) -> bool:
    return _is_assistant_message(item) or item.get("type") in _MODEL_ITEM_TYPES or "generation_token_ids" in item


def _output_items(result: dict[str, Any]) -> list[dict[str, Any]]:
    response = result.get("response") or {}
    return list(response.get("output") or [])


def split_calls(result: dict[str, Any]) -> list[_Call]:
    """Group the result's output items into policy calls, in order."""
    calls: list[_Call] = []
    current: _Call | None = None
    for item in _output_items(result):
        if not _is_model_item(item):
            if current is not None:      # a call that ended without ids (context overflow)
                calls.append(current)
                current = None
            continue
        if current is None:
            current = _Call()
        current.items.append(item)
        if item.get("generation_token_ids") is not None:
            current.ids_item = item
            calls.append(current)
            current = None
    if current is not None:
        calls.append(current)
    return calls


def episode_shape(result: dict[str, Any]) -> EpisodeShape:
    calls = split_calls(result)
    truncation = None
    if any(c.ids_item is None and not c.injected for c in calls):
        truncation = "context_overflow"
    else:
        response = result.get("response") or {}
        reason = (response.get("incomplete_details") or {}).get("reason")
        limit = (result.get("responses_create_params") or {}).get("max_output_tokens")
        # The final `response` is the last call's; a multi-turn agent may carry on after an
        # earlier call hit the limit, which only the generation length shows.
        hit_limit = limit is not None and any(len(c.ids_item["generation_token_ids"]) >= limit for c in calls)
        if reason == "max_output_tokens" or hit_limit:
            truncation = "max_output_tokens"
    return EpisodeShape(
        num_model_calls=sum(1 for c in calls if not c.injected),
        num_tool_calls=sum(c.tool_calls for c in calls if not c.injected),
        num_turns=sum(1 for c in calls if c.says_something),
        truncated=truncation is not None,
        truncation=truncation,
        num_injected=sum(1 for c in calls if c.injected),
    )


def build_sequence(result: dict[str, Any], rollout_name: str) -> TokenSequence:
    """The rollout's ids once each, in order: prompt/tool/template ids mask 0, sampled ids mask 1."""
    calls = split_calls(result)
    # An overflowed call is an empty message. Text without ids is either the agent's own (an
    # injected message, kept as context: it reaches the sequence through the next call's prompt,
    # mask 0) or, when no call at all carries ids, an adapter that never asked the policy for them.
    if any(c.injected for c in calls) and all(c.ids_item is None for c in calls):
        raise MissingTokenIdsError(
            f"{rollout_name}: the model answered but its output carries no token ids; the policy "
            "model config needs return_token_id_information: true")
    with_ids = [c for c in calls if c.ids_item is not None]
    seq = TokenSequence(token_ids=[], loss_mask=[], gen_logprobs=[], calls=[])
    for n, call in enumerate(with_ids):
        item = call.ids_item
        prompt = list(item["prompt_token_ids"])
        gen = list(item["generation_token_ids"])
        logprobs = [float(x) for x in item["generation_log_probs"]]
        if len(gen) != len(logprobs):
            raise ValueError(f"{rollout_name}: call {n} has {len(gen)} generated ids but {len(logprobs)} logprobs")
        seen = len(seq.token_ids)
        if prompt[:seen] != seq.token_ids:
            at = next((i for i in range(min(seen, len(prompt))) if prompt[i] != seq.token_ids[i]), min(seen, len(prompt)))
            got = prompt[at] if at < len(prompt) else "end of prompt"
            raise ContiguityError(
                f"{rollout_name}: call {n}'s prompt ({len(prompt)} ids) does not begin with the {seen} ids of "
                f"the calls before it; first difference at position {at}: expected {seq.token_ids[at]}, got {got}. "
                f"context: expected {seq.token_ids[max(0, at - 5):at + 5]}, got {prompt[max(0, at - 5):at + 5]}")
        fresh = prompt[seen:]
        seq.token_ids += fresh + gen
        seq.loss_mask += [0] * len(fresh) + [1] * len(gen)
        seq.gen_logprobs += [0.0] * len(fresh) + logprobs
        seq.calls.append(ModelCall(prompt_len=len(prompt), generation_len=len(gen), tool_calls=call.tool_calls))
    return seq


def _has_text(call: _Call) -> bool:
    for item in call.items:
        for part in item.get("content") or []:
            if isinstance(part, dict) and part.get("text"):
                return True
    return False
