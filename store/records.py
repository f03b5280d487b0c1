"""What the trainer hands the store: one step's metrics and every rollout of that step.

Plain data on purpose: grpo builds these from its own types, so store never imports gym or grpo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


ROLLOUT_KINDS = ("train", "eval")


@dataclass
class StepRecord:
    """One optimizer step: when it ran, which policy generated its rollouts, its metrics."""

    step: int
    policy_version: int
    metrics: dict[str, float]
    started_at: float           # unix time
    finished_at: float


@dataclass
class RolloutRecord:
    """One finished episode with its flattened tokens.

    The per-token lists are parallel: `token_ids[i]` was decoded to `token_text[i]`, belongs to
    model call `turn_index[i]`, is a sampled model token when `loss_mask[i] == 1`, and had logprob
    `gen_logprobs[i]` at sampling time and `train_logprobs[i]` under the trainer. `train_logprobs`
    may be empty when the trainer did not compute them (the column is then NULL).
    """

    step: int
    policy_version: int
    env: str
    agent: str
    row_index: int
    group_index: int
    row_id: str
    reward: float
    advantage: float
    num_turns: int
    num_model_calls: int
    num_tool_calls: int
    truncated: bool
    mask_sample: bool
    failure: str | None
    latency_s: float
    result: dict[str, Any]      # the full Gym /run result
    token_ids: list[int] = field(default_factory=list)
    token_text: list[str] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turn_index: list[int] = field(default_factory=list)
    gen_logprobs: list[float] = field(default_factory=list)
    train_logprobs: list[float] = field(default_factory=list)
    overlong_penalty: float = 0.0   # added to `reward` (the environment's) for the advantage
    kind: str = "train"         # ROLLOUT_KINDS: "eval" rollouts measure the policy and are never trained on

    def check_lengths(self) -> None:
        """Raise ValueError when the per-token lists disagree in length (a silent misalignment
        would put logprobs on the wrong tokens in every forensic query)."""
        n = len(self.token_ids)
        lengths = {
            "token_text": len(self.token_text),
            "loss_mask": len(self.loss_mask),
            "turn_index": len(self.turn_index),
            "gen_logprobs": len(self.gen_logprobs),
        }
        if self.train_logprobs:
            lengths["train_logprobs"] = len(self.train_logprobs)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"rollout {self.row_id!r}: {len(self.token_ids)} token_ids but {bad}")
