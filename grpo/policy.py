"""The policy trainer: a Hugging Face causal LM, AdamW and the GRPO loss, driven by Accelerate.

One `train_step` is one GRPO step over a batch of token sequences (prompt, model and tool tokens
together; `loss_mask` marks the model's). The batch is cut into `num_minibatches` optimizer steps;
each is cut into micro-batches of at most `micro_batch_tokens` tokens, whose gradients accumulate:
by default shared-prefix packs (grpo/packing.py: a group's prompt once, no padding), else padded
batches. The loss is normalised over the whole minibatch (see grpo/loss.py), so the micro-batching
changes memory and speed, never the update.

Logprobs are taken from `log_softmax(logits / temperature)` in fp32: the engine samples at that
temperature, and ratios, the IS weight and the health metrics all compare against its logprobs.

The methods are synchronous and serialised by a lock: the loop calls them from a worker thread.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from grpo.lora import LoraSettings, load_adapter_state, save_adapter, with_lora
from grpo.loss import METRIC_KEYS, LossConfig, moves_loss, policy_loss
from grpo.packing import Pack, build_pack, plan_packs
from grpo.ranks import full, merge_lists, moved, rank, shard, share, shard_like, sum_floats, sum_gradients, world_size

PAD_ID = 0  # any valid id: padded positions are masked out of attention and of the loss


@dataclass
class TrainerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: measure the norm, never clip
    warmup_steps: int = 0  # linear warmup over this many optimizer steps, then `lr_schedule`
    lr_schedule: Literal["constant", "linear"] = "constant"  # linear: to 0 at optimizer step `total_steps`
    total_steps: int | None = None  # optimizer steps of the whole run (needed by "linear")
    micro_batch_tokens: int = 4096  # tokens per forward/backward (packed; or batch x longest, padded)
    pack_shared_prefix: bool = True  # grpo/packing.py: shared prompts once, no padding
    gradient_checkpointing: bool = False
    measure_zero_advantage: bool = True  # forward-only metrics for samples that cannot move the loss
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    temperature: float = 1.0  # must equal the sampling temperature
    loss: LossConfig = field(default_factory=LossConfig)
    num_minibatches: int = 1
    lora: LoraSettings | None = None  # train LoRA adapters (grpo/lora.py) instead of every weight

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):  # straight from YAML
            self.loss = LossConfig(**self.loss)
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.micro_batch_tokens < 1 or self.num_minibatches < 1:
            raise ValueError("micro_batch_tokens and num_minibatches must be >= 1")


@dataclass
class TrainSample:
    token_ids: list[int]
    loss_mask: list[int]  # 1 on model tokens; position 0 is never one (nothing predicts it)
    gen_logprobs: list[float]  # engine logprobs aligned to token_ids, 0.0 where the mask is 0
    advantage: float


@dataclass
class TrainStats:
    loss: float  # mean over minibatches of the (normalised) minibatch loss
    kl: float  # the rest: means over the measured model tokens (nan: none was)
    entropy: float
    clip_low_frac: float
    clip_high_frac: float
    grad_norm: float  # mean over minibatches, before clipping; nan: a step was skipped
    token_mult_prob_error: float
    gen_kl_error: float
    num_tokens: int
    num_model_tokens: int
    train_logprobs: list[list[float]]  # trainer logprobs before the update, 0.0 where mask is 0; [] unmeasured
    backward_model_tokens: int = 0  # of num_model_tokens, those run backward (the rest: forward only)
    tis_capped_frac: float = 0.0
    lr: float = 0.0
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient norm
    clip_dual_frac: float = 0.0
    num_minibatches: int = 1  # optimizer steps planned this step (fewer than configured when few samples)


def output_logits(model: torch.nn.Module, hidden: Tensor) -> Tensor:
    """The model's logits for these final hidden states: its LM head, then whatever its own forward
    does after the head (the token-selective forward calls the head directly and must not skip it)."""
    logits = model.get_output_embeddings()(hidden)
    cfg = model.config
    if getattr(cfg, "logits_scaling", None):  # Granite
        logits = logits / cfg.logits_scaling
    scale = getattr(model, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)):
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2 / 3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# Logits are made for at most this many (position x vocab) elements at a time (128 MB in fp32): a
# micro-batch's whole [positions, vocab] logits, log-softmax and their gradients (5 GB each for 8k
# positions of a 152k vocab) never exist. Fewer positions (680 of SmolLM2's 49k vocab) are one
# chunk, kept for backward as before: recomputing it cost 16% of a CPU training step here.
LOGIT_CHUNK_ELEMENTS = 2**25


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """The lr multiplier for optimizer step `step` (0-based): linear warmup, then the schedule."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "linear":
        if cfg.total_steps is None:
            raise ValueError("lr_schedule 'linear' needs total_steps")
        return max(0.0, (cfg.total_steps - step) / max(1, cfg.total_steps - warmup))
    return 1.0


class SelectedLogprobs(torch.nn.Module):
    """A causal LM's logprobs of chosen target tokens at chosen positions: the decoder runs on every
    token, the LM head and the log-softmax only on the positions whose next token is scored, a chunk
    of positions at a time. When there are several, each chunk is recomputed in backward (activation
    checkpointing), so only its hidden states are kept: the price is a second LM-head matmul.

    The whole forward is one call of this module, so that FSDP's hooks (grpo/ranks.shard) gather
    and free the weights outside the decoder layers (embeddings, final norm, tied LM head) around it.
    """

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, at: tuple[Tensor, Tensor], targets: Tensor, entropy: bool,
                **inputs: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logprob of each target, the sampling distribution's entropy there or None); the entropy
        carries no gradient (a metric)."""
        hidden = self.model.get_decoder()(use_cache=False, **inputs).last_hidden_state[at]
        rows = max(1, LOGIT_CHUNK_ELEMENTS // self.model.get_output_embeddings().weight.shape[0])
        # Equal chunks: a remainder of 8 rows or fewer takes a CPU matmul kernel that sums the vocab
        # in one long fp32 chain (gradients 1e-4 off fp64, where chunks of 13+ rows agree to 1e-6).
        chunks = max(1, -(-len(targets) // rows))
        picked, entropies = [], []
        for h, t in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks)):
            if h.requires_grad and chunks > 1:
                from torch.utils.checkpoint import checkpoint

                p, e = checkpoint(self._chunk, h, t, entropy, use_reentrant=False)
            else:
                p, e = self._chunk(h, t, entropy)
            picked.append(p)
            entropies.append(e)
        if not picked:  # no scored position
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty if entropy else None
        return torch.cat(picked), torch.cat(entropies) if entropy else None

    def _chunk(self, hidden: Tensor, targets: Tensor, entropy: bool) -> tuple[Tensor, Tensor | None]:
        logp = torch.log_softmax(output_logits(self.model, hidden).float() / self.temperature, dim=-1)
        picked = logp.gather(-1, targets[:, None]).squeeze(-1)
        if not entropy:
            return picked, None
        with torch.no_grad():
            return picked, -(logp.exp() * logp).sum(-1)


def pack_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices so that len(group) * longest <= max_tokens.

    Longest first, so sequences of similar length share a micro-batch (little padding). A
    sequence longer than max_tokens gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        # sorted descending: the group's first member is its longest
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _pad(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out.to(device)


class PolicyTrainer:
    def __init__(self, model_path: str, cfg: TrainerConfig, seed: int) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self._lock = threading.Lock()
        set_seed(seed)
        on_gpu = torch.cuda.is_available()
        self.bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and on_gpu)
        # Accelerate's own mixed_precision setting is process-global (AcceleratorState) and refuses
        # a second value, so two trainers of different dtypes could not share a process (tests do):
        # the same bf16 autocast is applied here, per trainer.
        self.accelerator = Accelerator(cpu=not on_gpu)
        self.device = self.accelerator.device

        # fp32 master weights; bf16 compute comes from autocast.
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With LoRA the PEFT wrapper injects its layers into `model` in place; the trainer keeps
        # driving `model` (its decoder, its LM head) and the wrapper saves and toggles the adapters.
        self.peft = with_lora(model, cfg.lora) if cfg.lora is not None else None
        model.to(self.device)
        self.vocab_size = model.get_input_embeddings().num_embeddings

        self.ref_model = None  # with LoRA the reference is the same model with its adapters off
        if cfg.loss.kl_beta > 0.0 and self.peft is None:
            ref_dtype = torch.bfloat16 if self.bf16 else torch.float32  # frozen: no master copy needed
            self.ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=ref_dtype).to(self.device)
            self.ref_model.eval().requires_grad_(False)

        self.model = model
        self._net = SelectedLogprobs(model, cfg.temperature)
        self._ref_net = SelectedLogprobs(self.ref_model, cfg.temperature) if self.ref_model is not None else None
        self._check_selective_forward(model_path)
        # Several ranks shard the weights, gradients and Adam's moments (FSDP2); LoRA adapters are
        # small enough to replicate (grpo/ranks.sum_gradients), and the frozen reference stays whole.
        self.sharded = world_size() > 1 and self.peft is None
        if self.sharded:
            shard(self._net, [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or ())])
        self._trained = [p for p in model.parameters() if p.requires_grad]  # after shard(): its DTensors
        optimizer = torch.optim.AdamW(
            self._trained,
            lr=cfg.lr,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        # The model is not prepare()d: every forward goes through `SelectedLogprobs`, and ranks
        # reduce gradients themselves (FSDP's reduce-scatter, or sum_gradients), summing, not averaging.
        self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)
        self.step = 0  # optimizer steps taken
        self._offloaded = False

    def _check_selective_forward(self, model_path: str) -> None:
        """Refuse a model whose forward post-processes logits in a way `output_logits` does not know:
        training would silently use other logprobs than the engine samples from."""
        n = min(12, self.vocab_size)
        ids = torch.arange(1, n + 1, device=self.device)[None] % self.vocab_size
        attn = torch.ones_like(ids)
        with torch.no_grad():
            self.model.eval()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits[0, :-1]
            full = torch.log_softmax(logits.float() / self.cfg.temperature, -1).gather(-1, ids[0, 1:, None])[:, 0]
            selective, _ = self._forward(self._net, ids, attn)
        gap = float((full - selective[0, 1:]).abs().max())
        if gap > (2e-2 if self.bf16 else 1e-3):
            raise ValueError(
                f"{model_path}: the model's forward changes its logits after the LM head in a way this trainer "
                f"does not reproduce (logprobs differ by {gap:.3g}); add its post-processing to grpo.policy.output_logits")

    # ---------------------------------------------------------------- forward

    def _forward(self, net: SelectedLogprobs, ids: Tensor, attn: Tensor, need: Tensor | None = None,
                 entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-token logprobs [B, L] of a padded batch: at the positions `need` marks (None: every
        real token but the first), 0.0 elsewhere; with `entropy`, the entropy of the sampling
        distribution at the same positions (no gradient: it is a metric)."""
        where = (attn if need is None else need)[:, 1:].bool()  # the logprob of token t comes from position t-1
        b, c = where.nonzero(as_tuple=True)
        return self._score(net, (b, c), ids[b, c + 1], (b, c + 1), ids.shape, entropy,
                           input_ids=ids, attention_mask=attn)

    def _score(self, net: SelectedLogprobs, at: tuple[Tensor, Tensor], targets: Tensor,
               out_at: tuple[Tensor, Tensor], shape: Sequence[int], entropy: bool,
               **inputs: Tensor) -> tuple[Tensor, Tensor | None]:
        """The logprobs of `targets` under the logits at hidden positions `at`, put at `out_at` of a
        zero tensor of `shape` (and their entropies likewise)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            picked, ent = net(at, targets, entropy, **inputs)
        lp = torch.zeros(tuple(shape), dtype=picked.dtype, device=self.device).index_put(out_at, picked)
        if ent is not None:
            ent = torch.zeros_like(lp).index_put(out_at, ent)
        return lp, ent

    def _ids(self, rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        ids = _pad(rows, PAD_ID, torch.long, self.device)
        attn = _pad([[1] * len(r) for r in rows], 0, torch.long, self.device)
        return ids, attn

    def _check_ids(self, token_ids: Sequence[int]) -> None:
        # an out-of-range id is a device-side assert on GPU, which kills the process
        if len(token_ids) < 1 or min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise ValueError(f"token ids must be non-empty and in [0, {self.vocab_size})")

    def _micro_batches(self, rows: Sequence[Sequence[int]], idx: Sequence[int]) -> list[tuple[list[int], Pack | None]]:
        """The forwards that cover rows[i] for i in idx: (members, their pack) with shared-prefix
        packing, else (members, None) for a padded batch."""
        sub = [rows[i] for i in idx]
        if self.cfg.pack_shared_prefix:
            out = []
            for groups in plan_packs(sub, self.cfg.micro_batch_tokens):
                pack = build_pack(rows, [[idx[j] for j in g] for g in groups])
                out.append((pack.sequences, pack))
            return out
        return [([idx[j] for j in group], None)
                for group in pack_micro_batches([len(r) for r in sub], self.cfg.micro_batch_tokens)]

    def _run(self, net: SelectedLogprobs, rows: Sequence[Sequence[int]], members: list[int], pack: Pack | None,
             need: Tensor | None = None, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """[B, L] logprobs (and entropy) of `members`, padded like `_forward`'s."""
        if pack is None:
            ids, attn = self._ids([rows[i] for i in members])
            return self._forward(net, ids, attn, need=need, entropy=entropy)
        return self._forward_packed(net, pack, rows, members, need, entropy)

    def _forward_packed(self, net: SelectedLogprobs, pack: Pack, rows: Sequence[Sequence[int]], members: list[int],
                        need: Tensor | None, entropy: bool) -> tuple[Tensor, Tensor | None]:
        """`_forward` on a shared-prefix pack: one row, its own position ids and attention mask; the
        logprob of each member's token t comes from the packed position of its token t-1."""
        src, tgt, rows_at, cols_at = [], [], [], []
        for b, i in enumerate(members):
            index, row = pack.index[i], rows[i]
            wanted = need[b].tolist() if need is not None else None
            for t in range(1, len(row)):
                if wanted is None or wanted[t]:
                    src.append(index[t - 1])
                    tgt.append(row[t])
                    rows_at.append(b)
                    cols_at.append(t)
        as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        width = max(len(rows[i]) for i in members)
        return self._score(net, (as_index([0] * len(src)), as_index(src)), as_index(tgt),
                           (as_index(rows_at), as_index(cols_at)), (len(members), width), entropy,
                           input_ids=as_index([pack.ids]), position_ids=as_index([pack.positions]),
                           attention_mask=pack.attention_mask(self.device))

    def _idle_micro_batch(self, backward: bool = True) -> None:
        """What a sharded rank runs for each micro-batch its peers have and it has not: FSDP's weight
        gathers and gradient reductions are collectives every rank must join (its gradient is zero)."""
        ids = torch.full((1, 2), PAD_ID, device=self.device)
        with torch.set_grad_enabled(backward):
            lp, _ = self._forward(self._net, ids, torch.ones_like(ids))
        if backward:
            (lp.sum() * 0.0).backward()

    @torch.no_grad()
    def _measure_only(self, samples: Sequence[TrainSample], idx: Sequence[int], sums: dict[str, float],
                      train_logprobs: list[list[float]]) -> None:
        """Forward only, for samples that cannot move the loss (`loss.moves_loss`: advantage 0 and no
        KL term; at a few steps in, most groups): their gradient is exactly zero, so the backward
        (and the checkpointed recompute) is skipped, but their trainer logprobs, entropy and the
        on-policy metrics are still measured, so the metrics and the store cover every sample."""
        rows = [s.token_ids for s in samples]
        self.model.eval()
        plans = {r: self._micro_batches(rows, share(rows, idx, world_size(), r))
                 for r in (range(world_size()) if self.sharded else [rank()])}
        mine = plans[rank()]
        for members, pack in mine:
            mask = _pad([samples[i].loss_mask for i in members], 0, torch.float32, self.device)
            gen = _pad([samples[i].gen_logprobs for i in members], 0.0, torch.float32, self.device)
            adv = torch.zeros(len(members), dtype=torch.float32, device=self.device)
            lp, ent = self._run(self._net, rows, members, pack, need=mask, entropy=True)
            _, metrics = policy_loss(lp, lp, gen, adv, mask, self.cfg.loss, batch_tokens=1, batch_sequences=1,
                                     entropy=ent)
            for k, v in metrics.items():
                sums[k] += v
            kept = torch.where(mask.bool(), lp, 0.0).cpu()
            for j, i in enumerate(members):
                train_logprobs[i] = kept[j, : len(rows[i])].tolist()
        for _ in range(max(map(len, plans.values())) - len(mine)):
            self._idle_micro_batch(backward=False)

    @torch.no_grad()
    def _no_grad_logprobs(self, net: SelectedLogprobs, rows: Sequence[Sequence[int]],
                          idx: Sequence[int] | None = None) -> list[Tensor | None]:
        """Logprobs of rows[i] for i in idx (all rows by default); None for the others."""
        out: list[Tensor | None] = [None] * len(rows)
        for members, pack in self._micro_batches(rows, range(len(rows)) if idx is None else idx):
            lp, _ = self._run(net, rows, members, pack)
            for j, i in enumerate(members):
                out[i] = lp[j, : len(rows[i])].detach()
        return out  # type: ignore[return-value]

    def logprobs(self, token_ids_batch: list[list[int]]) -> list[list[float]]:
        """logprob of token i given tokens < i at the training temperature; position 0 gets 0.0."""
        for r in token_ids_batch:
            self._check_ids(r)
        with self._lock:
            self.model.eval()
            return [t.float().cpu().tolist() for t in self._no_grad_logprobs(self._net, token_ids_batch)]  # type: ignore[union-attr]

    # ---------------------------------------------------------------- training

    def _validate(self, samples: Sequence[TrainSample]) -> None:
        if not samples:
            raise ValueError("train_step needs at least one sample")
        for k, s in enumerate(samples):
            self._check_ids(s.token_ids)
            if not len(s.token_ids) == len(s.loss_mask) == len(s.gen_logprobs):
                raise ValueError(f"sample {k}: token_ids, loss_mask and gen_logprobs differ in length")
            if s.loss_mask[0]:
                raise ValueError(f"sample {k}: position 0 cannot be a model token")
            if any(m not in (0, 1) for m in s.loss_mask):
                raise ValueError(f"sample {k}: loss_mask must hold 0/1")
            if not math.isfinite(s.advantage):
                raise ValueError(f"sample {k}: advantage {s.advantage} is not finite")
        if sum(sum(s.loss_mask) for s in samples) == 0:
            raise ValueError("the batch has no model tokens")

    def train_step(self, samples: list[TrainSample]) -> TrainStats:
        self._validate(samples)
        if self._offloaded:  # a forgotten reload would fail inside Adam with a device mismatch
            self.reload_optimizer()
        with self._lock:
            return self._train_step(samples)

    def _train_step(self, samples: list[TrainSample]) -> TrainStats:
        cfg = self.cfg
        rows = [s.token_ids for s in samples]
        live = {i for i, s in enumerate(samples) if any(s.loss_mask) and moves_loss(s.advantage, cfg.loss)}
        sums = dict.fromkeys(METRIC_KEYS, 0.0)
        train_logprobs: list[list[float]] = [[] for _ in samples]
        # before any update: what the others are measured on is the policy that sampled them
        if cfg.measure_zero_advantage:
            frozen = [i for i, s in enumerate(samples) if i not in live and any(s.loss_mask)]
            self._measure_only(samples, frozen, sums, train_logprobs)
        old_all: list[Tensor | None] | None = None
        if min(cfg.num_minibatches, len(samples)) > 1:
            # later minibatches train on weights that earlier ones moved: their ratio needs the
            # logprobs from before the first update
            self.model.eval()
            old_all = self._no_grad_logprobs(self._net, rows, sorted(live))  # every rank, every live row: in step

        n = len(samples)
        # Filtering (zero-variance groups, truncation, masked samples) can leave fewer samples than
        # configured minibatches: then each sample is its own minibatch (reported in the stats).
        minibatches = min(cfg.num_minibatches, n)
        bounds = [round(k * n / minibatches) for k in range(minibatches + 1)]
        backward_tokens = 0
        losses: list[float] = []
        norms: list[float] = []
        skipped = 0
        lr = self.scheduler.get_last_lr()[0]
        for start, end in zip(bounds[:-1], bounds[1:]):
            idx = list(range(start, end))
            batch_tokens = sum(sum(samples[i].loss_mask) for i in idx)
            batch_sequences = sum(1 for i in idx if any(samples[i].loss_mask))
            if batch_tokens == 0:  # no model tokens: nothing to learn from, nothing to report
                for i in idx:
                    train_logprobs[i] = [0.0] * len(rows[i])
                continue
            self.model.train()
            mb_loss = 0.0
            # The normalisation above counts every sample; only those that move the loss run backward.
            run = [i for i in idx if i in live]
            backward_tokens += sum(sum(samples[i].loss_mask) for i in run)
            # Sharded ranks plan every rank's micro-batches (cheap, deterministic) to run as many.
            plans = {r: self._micro_batches(rows, share(rows, run, world_size(), r))
                     for r in (range(world_size()) if self.sharded else [rank()])}
            mine = plans[rank()]
            for members, pack in mine:
                mask = _pad([samples[i].loss_mask for i in members], 0, torch.float32, self.device)
                gen = _pad([samples[i].gen_logprobs for i in members], 0.0, torch.float32, self.device)
                adv = torch.tensor([samples[i].advantage for i in members], dtype=torch.float32, device=self.device)
                lp, ent = self._run(self._net, rows, members, pack, need=mask, entropy=True)
                if old_all is None:
                    old = lp.detach()  # one update per batch: exactly on-policy, ratio 1
                else:
                    old = _pad([old_all[i].tolist() for i in members], 0.0, torch.float32, self.device)
                ref = None
                if cfg.loss.kl_beta > 0.0:
                    with torch.no_grad(), self._reference() as ref_net:
                        ref, _ = self._run(ref_net, rows, members, pack, need=mask)
                loss, metrics = policy_loss(
                    lp, old, gen, adv, mask, cfg.loss,
                    batch_tokens=batch_tokens, batch_sequences=batch_sequences,
                    ref_logprobs=ref, entropy=ent,
                )
                self.accelerator.backward(loss)
                mb_loss += loss.item()
                for k, v in metrics.items():
                    sums[k] += v
                kept = torch.where(mask.bool(), old, 0.0).cpu()
                for j, i in enumerate(members):
                    train_logprobs[i] = kept[j, : len(rows[i])].tolist()
            for _ in range(max(map(len, plans.values())) - len(mine)):
                self._idle_micro_batch()
            if not run:  # Adam still steps (its moments move the weights), as it would on zeros
                for p in self._trained:
                    p.grad = torch.zeros_like(p)
            if not self.sharded:  # FSDP reduced them in backward
                sum_gradients(self._trained)
            [mb_loss] = sum_floats([mb_loss])
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm else math.inf
            norm = float(full(torch.nn.utils.clip_grad_norm_(self._trained, max_norm)))
            if math.isfinite(norm):
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
            else:
                skipped += 1  # a nan/inf gradient would poison Adam's moments for good
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(mb_loss)
            norms.append(norm)

        sums = dict(zip(sums, sum_floats(list(sums.values()))))
        train_logprobs = merge_lists(train_logprobs)
        tokens = sums["tokens"]

        def mean(key: str) -> float:  # over the measured tokens; nan (not measured) when none was
            return sums[key] / tokens if tokens else math.nan

        return TrainStats(
            loss=sum(losses) / len(losses),
            kl=mean("kl"),
            entropy=mean("entropy"),
            clip_low_frac=mean("clip_low"),
            clip_high_frac=mean("clip_high"),
            clip_dual_frac=mean("clip_dual"),
            grad_norm=sum(norms) / len(norms),
            token_mult_prob_error=mean("token_mult_prob_error"),
            gen_kl_error=mean("gen_kl_error"),
            num_tokens=sum(len(r) for r in rows),
            num_model_tokens=sum(sum(s.loss_mask) for s in samples),
            backward_model_tokens=backward_tokens,
            train_logprobs=train_logprobs,
            tis_capped_frac=mean("tis_capped"),
            lr=lr,
            skipped_steps=skipped,
            num_minibatches=minibatches,
        )

    @contextlib.contextmanager
    def _reference(self) -> Iterator[SelectedLogprobs]:
        """The frozen reference policy for the KL term."""
        if self._ref_net is not None:
            yield self._ref_net
            return
        with self.peft.disable_adapter():
            yield self._net

    # ---------------------------------------------------------------- weights

    @property
    def lora(self) -> bool:
        return self.peft is not None

    def save_adapter(self, folder: Path) -> Path:
        """The LoRA adapter in PEFT's layout, as vLLM loads it (engine.load_adapter)."""
        if self.peft is None:
            raise ValueError("save_adapter needs a trainer built with lora settings")
        with self._lock:
            save_adapter(self.peft, folder)
        return folder

    def named_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) in the checkpoint's names, as vLLM's reload_weights expects.

        named_parameters() yields a tied lm_head/embedding pair once, under the embedding's name, so
        a tied lm_head is never emitted. Tensors are views of the live weights unless `dtype` casts.
        With LoRA the engine keeps the base weights and gets the adapter (save_adapter) instead.
        """
        if self.peft is not None:
            raise ValueError("a LoRA trainer pushes its adapter (save_adapter), not full weights")
        with self._lock:
            # sharded: every rank gathers every weight (a collective: all ranks push together)
            params = {name: full(p.detach()) for name, p in self.model.named_parameters()}
            try:  # transformers 5 renames some architectures' weights on load; undo that
                from transformers.core_model_loading import revert_weight_conversion

                params = revert_weight_conversion(self.model, params)
            except ImportError:
                pass
            items = [(k, v if dtype is None else v.to(dtype)) for k, v in params.items()]
        return iter(items)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, dir: Path) -> None:
        """Model, optimizer, scheduler, step and RNG states as full (unsharded) tensors, so that any
        number of ranks resumes from it; a crash mid-save leaves the old one. Every rank calls it
        (sharded ranks gather together); rank 0 writes."""
        dir = Path(dir)
        tmp = dir.with_name(dir.name + ".tmp")
        old = dir.with_name(dir.name + ".old")
        with self._lock:
            weights = None if self.peft is not None else {  # LoRA: the adapter alone, the base never changes
                k: full(v.detach()) for k, v in self.model.state_dict(keep_vars=True).items()
                if k not in _tied_names(self.model)}
            optimizer = self.optimizer.state_dict()
            optimizer["state"] = {i: {k: full(v) for k, v in st.items()} for i, st in optimizer["state"].items()}
            if rank() > 0:
                return
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if weights is None:
                save_adapter(self.peft, tmp)
            else:
                # In-memory names (not the original checkpoint layout): load_checkpoint reads them
                # back exactly, for every architecture.
                self.model.save_pretrained(tmp, state_dict=weights, save_original_format=False)
            torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "step": self.step},
                       tmp / "trainer_state.pt")
            torch.save(_rng_state(), tmp / "rng_state.pt")
        if dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            dir.rename(old)
        tmp.rename(dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, dir: Path) -> None:
        """A checkpoint of any number of ranks into this trainer (sharded ranks keep their shard)."""
        from safetensors.torch import load_file

        dir = Path(dir)
        files = sorted(dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors in {dir}")
        with self._lock:
            if self.peft is not None:
                load_adapter_state(self.peft, dir)
            else:
                state: dict[str, Tensor] = {}
                for f in files:
                    state.update(load_file(f))
                own = {k: v for k, v in self.model.state_dict(keep_vars=True).items()
                       if k not in _tied_names(self.model)}
                if own.keys() != state.keys():
                    raise ValueError(f"checkpoint does not match the model: missing {sorted(own.keys() - state.keys())}, "
                                     f"unexpected {sorted(state.keys() - own.keys())} (was it trained with model.lora set?)")
                with torch.no_grad():
                    for k, v in own.items():
                        v.copy_(shard_like(state[k].to(v.dtype), v))
            trainer = torch.load(dir / "trainer_state.pt", map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(trainer["optimizer"])
            for p in self._trained:  # full moments from the file: this rank keeps its shard
                st = self.optimizer.state.get(p, {})
                for k, v in st.items():
                    if isinstance(v, Tensor) and v.dim() > 0:
                        st[k] = shard_like(v, p)
            self.scheduler.load_state_dict(trainer["scheduler"])
            self.step = int(trainer["step"])
            _set_rng_state(torch.load(dir / "rng_state.pt", map_location="cpu", weights_only=False))

    # ---------------------------------------------------------------- memory

    def offload_optimizer(self) -> None:
        """Move Adam's moments to CPU so that vLLM's weights can come back for the push; no-op on CPU."""
        self._move_optimizer_state(torch.device("cpu"))

    def reload_optimizer(self) -> None:
        self._move_optimizer_state(self.device)

    def offload_params(self) -> None:
        """Move the trainer's parameters (and the reference model) to CPU while vLLM generates.

        For models where the trainer and vLLM's KV cache do not both fit; costs a host round trip
        of the weights per step. The optimizer's state is keyed by the same Parameter objects, so it
        needs no rewiring. A no-op on CPU.
        """
        self._move_params(torch.device("cpu"))

    def reload_params(self) -> None:
        self._move_params(self.device)

    def _move_params(self, device: torch.device) -> None:
        if self.device.type != "cuda":
            return
        with self._lock:
            self.model.to(device)
            if self.ref_model is not None:
                self.ref_model.to(device)
            torch.cuda.synchronize()
            if device.type == "cpu":
                torch.cuda.empty_cache()

    def _move_optimizer_state(self, device: torch.device) -> None:
        if self.device.type != "cuda":
            return
        with self._lock:
            self._offloaded = device.type == "cpu"
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    # Adam's `step` counter lives on CPU unless fused/capturable: leave it there
                    if isinstance(v, Tensor) and v.dim() > 0:
                        state[k] = moved(v, device)
            torch.cuda.synchronize()
            if device.type == "cpu":
                torch.cuda.empty_cache()


def _tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of a tensor an earlier name holds too (a tied lm_head): checkpoints leave them out."""
    seen: set[int] = set()
    tied: set[str] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied.add(name)
        seen.add(id(t))
    return tied


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
