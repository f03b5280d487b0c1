"""What a rollout is once it leaves Gym: plain data that grpo trains on and store records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelCall:
    """One policy call inside a rollout, located in the rollout's token sequence."""

    prompt_len: int          # len(prompt_token_ids) of this call (= offset of its first generated id)
    generation_len: int      # number of ids the model sampled in this call
    tool_calls: int = 0      # function calls emitted by this call


@dataclass
class TokenSequence:
    """One rollout flattened for training: every id once, in order.

    `loss_mask[i]` is 1 where the model sampled `token_ids[i]` (then `gen_logprobs[i]` is its
    logprob at sampling time) and 0 for prompt, tool output and template glue (logprob 0.0).
    """

    token_ids: list[int]
    loss_mask: list[int]
    gen_logprobs: list[float]
    calls: list[ModelCall] = field(default_factory=list)


@dataclass
class Rollout:
    """One finished episode of one dataset row (one member of a GRPO group)."""

    row_index: int            # position of the row in the batch's row list
    group_index: int          # 0..G-1 within the row's group
    env: str                  # environment name (resources server / config name)
    agent: str                # agent that ran it
    reward: float
    sequence: TokenSequence
    num_turns: int            # model outputs in the episode
    num_model_calls: int
    num_tool_calls: int
    truncated: bool           # hit the context length or max tokens
    mask_sample: bool         # Gym asked not to train on it
    failure: str | None       # Gym's failure fields, joined, when any
    latency_s: float
    result: dict[str, Any]    # the full Gym /run result, for the store
    attempts: int = 1         # posts needed (retries after connection errors or server restarts)
    num_injected: int = 0     # assistant messages the agent wrote itself (no ids): context, never trained on
