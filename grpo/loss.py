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
    "clip_high",  # tokens where A>0 and rho > 1+clip_high
    "kl",  # k3 KL to the reference policy (0 without one)
    "entropy",  # entropy of the sampling distribution (0 when not given)
    "token_mult_prob_error",  # exp(|gen - train|): 1.0 when engine and trainer agree
    "gen_kl_error",  # k3 estimate of KL(gen || train) from the generated tokens
    "tis_capped",  # tokens whose truncated IS weight hit the cap
)


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO's clip-higher: room for low-probability tokens to rise
    normalization: Literal["token", "sequence"] = "token"
    kl_beta: float = 0.0
    tis_cap: float | None = None  # truncated importance sampling cap C; None = no IS weight
    # NeMo RL's defaults: a token the reference finds near-impossible must not blow the KL up
    kl_log_ratio_clamp: float | None = 20.0  # |log(ref/policy)| before k3; None = no clamp
    kl_max: float | None = 10.0  # per-token KL after k3; None = no clamp

    def __post_init__(self) -> None:
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
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = torch.maximum(-adv * ratio, -adv * clipped)

    capped = torch.zeros_like(m)
    if cfg.tis_cap is not None:
        # The engine sampled from pi_gen, not pi_old: reweight, but cap the weight so one token the
        # engine found unlikely cannot dominate the batch. A constant: no gradient through it.
        raw = torch.exp(old - gen)
        capped = m & (raw > cfg.tis_cap)
        per_token = per_token * raw.clamp(max=cfg.tis_cap).detach()

    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        log_ratio = sel(ref_logprobs.detach()) - logp
        if cfg.kl_log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-cfg.kl_log_ratio_clamp, cfg.kl_log_ratio_clamp)
        kl = k3(log_ratio)
        if cfg.kl_max is not None:
            kl = kl.clamp(max=cfg.kl_max)
        if cfg.kl_beta > 0.0:
            per_token = per_token + cfg.kl_beta * kl

    per_token = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if cfg.normalization == "token":
        loss = per_token.sum() / batch_tokens
    else:
        seq_tokens = m.sum(dim=-1).clamp(min=1)
        loss = (per_token.sum(dim=-1) / seq_tokens).sum() / batch_sequences

    with torch.no_grad():
        gen_log_ratio = old - gen

        def total(x: Tensor) -> float:
            return float(torch.where(m, x.to(torch.float64), 0.0).sum())

        metrics = {
            "tokens": float(m.sum()),
            "clip_low": total(((adv < 0) & (ratio < 1.0 - cfg.clip_low)).double()),
            "clip_high": total(((adv > 0) & (ratio > 1.0 + cfg.clip_high)).double()),
            "kl": total(kl.detach()),
            "entropy": total(entropy.detach()) if entropy is not None else 0.0,
            "token_mult_prob_error": total(torch.exp(gen_log_ratio.abs())),
            "gen_kl_error": total(k3(gen_log_ratio)),
            "tis_capped": float(capped.sum()),
        }
    return loss, metrics
