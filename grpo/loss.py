"""The GRPO policy loss for one micro-batch, normalised over the whole batch.

Gradient accumulation must give exactly the full-batch loss. Averaging per-micro-batch means does
not (micro-batches hold different numbers of tokens), so the caller passes the batch totals and
each micro-batch returns its share: summing the micro-batch losses IS the batch loss.

All tensors are [B, L] and aligned to the token ids: position i holds the logprob of token i given
the tokens before it; `mask` is 1 on model (generated) tokens, the only ones that count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

METRIC_KEYS = (
    "tokens",  # model tokens in this micro-batch
    "clip_low",  # tokens where A<0 and rho < 1-clip_low: the clipped branch wins, no gradient
    "clip_high",  # tokens where A>0 and rho > 1+clip_high (gspo: of a clipped sequence; cispo: any A)
    "clip_dual",  # tokens where A<0 and the dual clip (ratio_clip_c) capped the loss
    "kl",  # k3 KL to the reference policy (0 without one)
    "entropy",  # entropy of the sampling distribution (0 when not given)
    "token_mult_prob_error",  # exp(|gen - train|): 1.0 when engine and trainer agree
    "gen_kl_error",  # k3 estimate of KL(gen || train) from the generated tokens
    "tis_capped",  # tokens whose truncated IS weight hit the cap
)


LossKind = Literal["grpo", "dr_grpo", "gspo", "cispo"]
LOSS_KINDS: tuple[str, ...] = ("grpo", "dr_grpo", "gspo", "cispo")


@dataclass
class LossConfig:
    # grpo: PPO-clipped token ratios. dr_grpo: the same, summed and divided by a constant
    # (batch sequences x constant_normalizer) instead of lengths. gspo: one ratio per sequence, the
    # geometric mean of its token ratios, clipped per sequence. cispo: the clipped ratio as a
    # stop-gradient weight on the token log-likelihood (no token loses its gradient).
    kind: LossKind = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO's clip-higher: room for low-probability tokens to rise
    normalization: Literal["token", "sequence"] = "token"
    kl_beta: float = 0.0
    tis_cap: float | None = None  # truncated importance sampling cap C; None = no IS weight
    # NeMo RL's defaults: a token the reference finds near-impossible must not blow the KL up
    kl_log_ratio_clamp: float | None = 20.0  # |log(ref/policy)| before k3; None = no clamp
    kl_max: float | None = 10.0  # per-token KL after k3; None = no clamp
    ratio_clip_c: float | None = None  # dual clip: for A<0 the loss is at most -A*c (c > 1); None = off
    constant_normalizer: int = 1  # dr_grpo: the constant per-sequence length (the generation budget)

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {self.kind!r}")
        if self.ratio_clip_c is not None and self.ratio_clip_c <= 1.0:
            raise ValueError(f"ratio_clip_c must be > 1, got {self.ratio_clip_c}")
        if self.constant_normalizer < 1:
            raise ValueError(f"constant_normalizer must be >= 1, got {self.constant_normalizer}")
        if self.normalization not in ("token", "sequence"):
            raise ValueError(f"normalization must be 'token' or 'sequence', got {self.normalization!r}")
        if not 0.0 <= self.clip_low < 1.0 or self.clip_high < 0.0:
            raise ValueError(f"bad clip range: clip_low={self.clip_low}, clip_high={self.clip_high}")
        if self.kl_beta < 0.0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if self.tis_cap is not None and self.tis_cap <= 0.0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")
        for name in ("kl_log_ratio_clamp", "kl_max"):
            v = getattr(self, name)
            if v is not None and v <= 0.0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")


def moves_loss(advantage: float, cfg: LossConfig) -> bool:
    """Whether a sequence with this advantage can change the loss or its gradient. Every loss kind
    multiplies each token's term by the advantage, so with no KL term an advantage of 0 (a group
    whose rewards are all equal) contributes exactly 0: its forward and backward can be skipped."""
    return advantage != 0.0 or cfg.kl_beta > 0.0


def k3(log_ratio: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL from log(q/p) on samples of p: exp(x) - x - 1 (>= 0)."""
    return torch.exp(log_ratio) - log_ratio - 1.0


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    gen_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    *,
    batch_tokens: int,
    batch_sequences: int,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's share of the batch loss, and metric SUMS over its model tokens.

    logprobs: current policy (carries the gradient). old_logprobs: the policy before this step's
    updates (rho = exp(logprobs - old_logprobs)). gen_logprobs: what the engine reported.
    advantages: [B] (one per sequence) or [B, L]. batch_tokens / batch_sequences: model tokens and
    sequences (with at least one model token) in the whole batch, for the normalisation.
    Divide the metric sums by the batch's model tokens for means.
    """
    if cfg.kl_beta > 0.0 and ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs")
    if batch_tokens <= 0 or batch_sequences <= 0:
        raise ValueError(f"empty batch: {batch_tokens} tokens, {batch_sequences} sequences")
    m = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    adv = advantages.to(logprobs.dtype)

    # Zero the inputs outside the mask before any exp: padding / prompt positions may hold values
    # whose exp overflows, and inf * 0 would turn the loss (or its gradient) into nan.
    def sel(x: Tensor) -> Tensor:
        return torch.where(m, x.to(logprobs.dtype), torch.zeros((), dtype=logprobs.dtype, device=x.device))

    logp, old, gen = sel(logprobs), sel(old_logprobs.detach()), sel(gen_logprobs)

    ratio = torch.exp(logp - old)
    n_tokens = m.sum(dim=-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)

    # truncated IS: the engine sampled from pi_gen, not pi_old. The weight is capped so one token
    # the engine found unlikely cannot dominate the batch; a constant, no gradient through it.
    weight = torch.ones_like(logp)
    capped = torch.zeros_like(m)
    if cfg.tis_cap is not None:
        raw = torch.exp(old - gen)
        if cfg.kind == "gspo":  # one weight per sequence: the geometric mean, like the ratio
            raw = torch.exp((old - gen).sum(-1) / n_tokens.clamp(min=1))[:, None].expand_as(logp)
        capped = m & (raw > cfg.tis_cap)
        weight = raw.clamp(max=cfg.tis_cap).detach()

    low, high = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    dual = torch.zeros_like(m)
    if cfg.kind == "gspo":
        seq_ratio = torch.exp((logp - old).sum(-1) / n_tokens.clamp(min=1))
        seq_adv = (adv * m).sum(-1) / n_tokens.clamp(min=1)
        per_seq = torch.maximum(-seq_adv * seq_ratio, -seq_adv * seq_ratio.clamp(low, high)) * weight[:, 0]
        clip_low = m & ((seq_adv < 0) & (seq_ratio < low))[:, None]
        clip_high = m & ((seq_adv > 0) & (seq_ratio > high))[:, None]
        per_token = torch.zeros_like(logp)
    else:
        if cfg.kind == "cispo":
            per_token = -adv * ratio.clamp(low, high).detach() * logp
            clip_low, clip_high = ratio < low, ratio > high
        else:
            per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high))
            clip_low, clip_high = (adv < 0) & (ratio < low), (adv > 0) & (ratio > high)
        if cfg.ratio_clip_c is not None:
            cap = -adv * cfg.ratio_clip_c
            dual = m & (adv < 0) & (per_token > cap)
            per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
        per_token = per_token * weight

    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        log_ratio = sel(ref_logprobs.detach()) - logp
        if cfg.kl_log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-cfg.kl_log_ratio_clamp, cfg.kl_log_ratio_clamp)
        kl = k3(log_ratio)
        if cfg.kl_max is not None:
            kl = kl.clamp(max=cfg.kl_max)

    per_token = torch.where(m, per_token, zero)
    kl_term = torch.where(m, cfg.kl_beta * kl, zero) if cfg.kl_beta > 0.0 else torch.zeros_like(per_token)
    if cfg.kind == "gspo":
        loss = torch.where(n_tokens > 0, per_seq, zero).sum() / batch_sequences + kl_term.sum() / batch_tokens
    elif cfg.kind == "dr_grpo":
        loss = (per_token + kl_term).sum() / (batch_sequences * cfg.constant_normalizer)
    elif cfg.normalization == "token":
        loss = (per_token + kl_term).sum() / batch_tokens
    else:
        loss = ((per_token + kl_term).sum(dim=-1) / n_tokens.clamp(min=1)).sum() / batch_sequences

    with torch.no_grad():
        gen_log_ratio = old - gen

        def total(x: Tensor) -> float:
            return float(torch.where(m, x.to(torch.float64), 0.0).sum())

        metrics = {
            "tokens": float(m.sum()),
            "clip_low": total(clip_low.double()),
            "clip_high": total(clip_high.double()),
            "clip_dual": float(dual.sum()),
            "kl": total(kl.detach()),
            "entropy": total(entropy.detach()) if entropy is not None else 0.0,
            "token_mult_prob_error": total(torch.exp(gen_log_ratio.abs())),
            "gen_kl_error": total(k3(gen_log_ratio)),
            "tis_capped": float(capped.sum()),
        }
    return loss, metrics
