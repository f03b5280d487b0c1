"""Shared-prefix, padding-free packing of training sequences.

The G rollouts of a GRPO group repeat the same prompt (in agentic environments, a long system
prompt and tool schemas). A pack puts several groups of sequences into ONE row with no padding:
each group's shared prefix once, then every member's continuation, with position ids continuing
from the prefix and an attention mask under which a token sees its own group's prefix and its own
continuation only. Forward and backward then do the prefix's work once instead of G times; every
member's logprobs and gradients equal the unpacked ones (the gradient through the prefix sums over
the members, as it does unpacked).

The mask is an arbitrary boolean [T, T] matrix: it needs an attention kernel that takes one. The
trainer loads models with PyTorch SDPA (transformers' default), which does; flash-attention kernels
do not (on GPU use SDPA or flex attention with this mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PREFIX = -1  # member id of a group's shared prefix tokens


@dataclass
class Pack:
    """One packed row. Group g's tokens carry group id g; member id PREFIX on its shared prefix,
    else the index (into the caller's rows) of the sequence the continuation belongs to."""

    ids: list[int]
    positions: list[int]
    group: list[int]
    member: list[int]
    index: dict[int, list[int]]   # sequence -> packed position of each of its tokens, in order

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sequences(self) -> list[int]:
        return list(self.index)

    def attention_mask(self, device: torch.device | str = "cpu") -> Tensor:
        """[1, 1, T, T] bool, True where query row i may attend to key column j."""
        group = torch.tensor(self.group, device=device)
        member = torch.tensor(self.member, device=device)
        n = len(self.ids)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        same_group = group[:, None] == group[None, :]
        visible = (member[None, :] == PREFIX) | (member[:, None] == member[None, :])
        return (causal & same_group & visible)[None, None]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_groups(rows: Sequence[Sequence[int]], min_shared: int = 8) -> list[list[int]]:
    """Runs of consecutive rows that share a prefix worth sharing (the loop keeps a GRPO group's
    rollouts side by side). A row joins the current group when the prefix the group would share
    stays at least `min_shared` tokens and at least half of what it shares now."""
    groups: list[list[int]] = []
    shared = 0
    for i, row in enumerate(rows):
        if groups:
            first = rows[groups[-1][0]]
            lcp = min(common_prefix(first, row), shared if len(groups[-1]) > 1 else len(first))
            if lcp >= min_shared and (len(groups[-1]) == 1 or 2 * lcp >= shared):
                groups[-1].append(i)
                shared = lcp
                continue
        groups.append([i])
        shared = len(row)
    return groups


def group_prefix(rows: Sequence[Sequence[int]], members: list[int]) -> int:
    """Tokens every member shares, leaving each at least one token of its own (a member's first
    token after the prefix is predicted from the prefix's last position)."""
    first = rows[members[0]]
    p = min(len(rows[i]) for i in members) - 1
    for i in members[1:]:
        p = min(p, common_prefix(first, rows[i]))
    return max(p, 0) if len(members) > 1 else 0


def packed_length(rows: Sequence[Sequence[int]], members: list[int]) -> int:
    p = group_prefix(rows, members)
    return p + sum(len(rows[i]) - p for i in members)


def plan_packs(rows: Sequence[Sequence[int]], max_tokens: int, min_shared: int = 8) -> list[list[list[int]]]:
    """Packs of groups of row indices, each pack at most `max_tokens` packed tokens (a group that
    alone exceeds it is split into smaller groups, a single longer row gets a pack of its own)."""
    groups: list[list[int]] = []
    for g in plan_groups(rows, min_shared):
        while g:  # split a group that does not fit one pack
            take = 1
            while take < len(g) and packed_length(rows, g[:take + 1]) <= max_tokens:
                take += 1
            groups.append(g[:take])
            g = g[take:]
    packs: list[list[list[int]]] = []
    used = 0
    for g in groups:
        n = packed_length(rows, g)
        if packs and used + n <= max_tokens:
            packs[-1].append(g)
            used += n
        else:
            packs.append([g])
            used = n
    return packs


def build_pack(rows: Sequence[Sequence[int]], groups: list[list[int]]) -> Pack:
    pack = Pack(ids=[], positions=[], group=[], member=[], index={})
    for g, members in enumerate(groups):
        p = group_prefix(rows, members)
        start = len(pack.ids)
        prefix = list(rows[members[0]][:p])
        pack.ids += prefix
        pack.positions += list(range(p))
        pack.group += [g] * p
        pack.member += [PREFIX] * p
        for i in members:
            rest = list(rows[i][p:])
            at = len(pack.ids)
            pack.ids += rest
            pack.positions += list(range(p, p + len(rest)))
            pack.group += [g] * len(rest)
            pack.member += [i] * len(rest)
            pack.index[i] = list(range(start, start + p)) + list(range(at, at + len(rest)))
    return pack
