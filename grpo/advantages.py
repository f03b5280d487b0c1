"""Group-relative advantages (GRPO).

Rewards arrive flat, the G rollouts of one dataset row side by side:
`[r(row0,0) .. r(row0,G-1), r(row1,0) .. ]`. Every rollout is judged only against its own group,
so no value model is needed: `A = r - baseline`, optionally divided by the group's std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Baseline = Literal["mean", "leave_one_out"]


def _groups(rewards: Sequence[float], group_size: int) -> list[list[float]]:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    flat = [float(r) for r in rewards]
    for r in flat:
        if not math.isfinite(r):
            raise ValueError(f"reward {r} is not finite")
    return [flat[i : i + group_size] for i in range(0, len(flat), group_size)]


def group_advantages(
    rewards: Sequence[float],
    group_size: int,
    baseline: Baseline = "mean",
    normalize_std: bool = True,
    eps: float = 1e-6,
    include: Sequence[bool] | None = None,
) -> list[float]:
    """One advantage per rollout, in the order of `rewards`.

    baseline "mean": the group mean. "leave_one_out" (RLOO): the mean of the other G-1 rewards,
    so a rollout's own reward never lowers its own advantage's bar.
    normalize_std divides by the group's sample std (Bessel-corrected, G-1) plus eps; a group whose
    rewards are all equal has std 0 and is left undivided (its advantages are 0 anyway).
    `include` (one flag per rollout) leaves rollouts out of their group's statistics: they get
    advantage 0 and the rest of the group is judged as if they had never been sampled.
    """
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"unknown baseline {baseline!r}")
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError("leave_one_out needs group_size >= 2")
    flags = [True] * len(rewards) if include is None else list(include)
    if len(flags) != len(rewards):
        raise ValueError(f"include has {len(flags)} flags for {len(rewards)} rewards")
    out: list[float] = []
    for k, group in enumerate(_groups(rewards, group_size)):
        inc = flags[k * group_size:(k + 1) * group_size]
        g = [r for r, i in zip(group, inc) if i]
        n = len(g)
        if n == 0 or (baseline == "leave_one_out" and n < 2):
            out.extend([0.0] * len(group))  # no baseline to judge against
            continue
        total = sum(g)
        mean = total / n
        if baseline == "mean":
            adv = [r - mean for r in g]
        else:
            adv = [r - (total - r) / (n - 1) for r in g]
        if normalize_std and n > 1:
            std = math.sqrt(sum((r - mean) ** 2 for r in g) / (n - 1))
            if std > 0.0:
                adv = [a / (std + eps) for a in adv]
        it = iter(adv)
        out.extend(next(it) if i else 0.0 for i in inc)
    return out


def overlong_penalty(generated: int, max_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment, added to a rollout's reward: 0 up to `max_tokens - buffer`
    generated tokens, then falling linearly to -factor at `max_tokens` (and -factor beyond)."""
    if buffer <= 0:
        return 0.0
    start = max_tokens - buffer
    if generated <= start:
        return 0.0
    return -factor * min(1.0, (generated - start) / buffer)


def zero_variance_groups(rewards: Sequence[float], group_size: int) -> list[bool]:
    """Per group: True when all its rewards are equal, i.e. it carries no policy gradient.

    Dynamic sampling drops such groups; the loop also logs their share (a collapsing policy shows
    up here first).
    """
    return [all(r == g[0] for r in g) for g in _groups(rewards, group_size)]
