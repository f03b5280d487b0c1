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
import torch.nn.functional as F
from torch import Tensor

from grpo.lora import LoraSettings, load_adapter_state, save_adapter, with_lora
from grpo.loss import METRIC_KEYS, LossConfig, policy_loss
from grpo.packing import Pack, build_pack, plan_packs
from grpo.ranks import merge_lists, rank, share, sum_floats, sum_gradients, world_size

PAD_ID = 0  # any valid id: padded positions are masked out of attention and of the loss


@dataclass
class TrainerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: measure the norm, never clip
    warmup_steps: int = 0  # linear warmup over this many optimizer steps, then constant
    micro_batch_tokens: int = 4096  # tokens per forward/backward (packed; or batch x longest, padded)
    pack_shared_prefix: bool = True  # grpo/packing.py: shared prompts once, no padding
    gradient_checkpointing: bool = False
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
    kl: float  # the rest: means over model tokens
    entropy: float
    clip_low_frac: float
    clip_high_frac: float
    grad_norm: float  # mean over minibatches, before clipping; nan: a step was skipped
    token_mult_prob_error: float
    gen_kl_error: float
    num_tokens: int
    num_model_tokens: int
    train_logprobs: list[list[float]]  # trainer logprobs before the update, 0.0 where mask is 0
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

        self._trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            self._trained,
            lr=cfg.lr,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        if world_size() > 1:
            # Ranks sum their gradients themselves (grpo/ranks.py): a DDP wrapper would average
            # them and expects every forward through itself, not through the decoder and LM head.
            self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)
            self.model = model
        else:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.step = 0  # optimizer steps taken
        self._offloaded = False
        self._check_selective_forward(model_path)

    def _check_selective_forward(self, model_path: str) -> None:
        """Refuse a model whose forward post-processes logits in a way `output_logits` does not know:
        training would silently use other logprobs than the engine samples from."""
        n = min(12, self.vocab_size)
        ids = torch.arange(1, n + 1, device=self.device)[None] % self.vocab_size
        attn = torch.ones_like(ids)
        need = torch.ones_like(ids)
        need[:, 0] = 0
        with torch.no_grad():
            self.model.eval()
            full, _ = self._forward(self.model, ids, attn)
            selective, _ = self._forward(self.model, ids, attn, need=need)
        gap = float((full - selective).abs().max())
        if gap > (2e-2 if self.bf16 else 1e-3):
            raise ValueError(
                f"{model_path}: the model's forward changes its logits after the LM head in a way this trainer "
                f"does not reproduce (logprobs differ by {gap:.3g}); add its post-processing to grpo.policy.output_logits")

    # ---------------------------------------------------------------- forward

    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _forward(
        self, model: torch.nn.Module, ids: Tensor, attn: Tensor, entropy_mask: Tensor | None = None,
        need: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token logprobs [B, L] (position 0: 0.0) and, where `entropy_mask` is set, the entropy
        of the sampling distribution there (no gradient: it is a metric).

        With `need` [B, L], only those positions get a logprob (the rest 0.0): the vocab projection
        and log-softmax then run on the model tokens alone instead of every position, which on a
        49k vocab is most of the memory traffic of a training step.
        """
        if need is None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            logp_all = torch.log_softmax(logits[:, :-1].float() / self.cfg.temperature, dim=-1)
            lp = F.pad(logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
            where = entropy_mask[:, 1:].bool() if entropy_mask is not None else None
            rows = logp_all.detach()[where] if where is not None else None
        else:
            inner = self.accelerator.unwrap_model(model)
            where = need[:, 1:].bool()  # the logprob of token t comes from position t-1
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                hidden = inner.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
                logits = output_logits(inner, hidden[:, :-1][where])
            logp = torch.log_softmax(logits.float() / self.cfg.temperature, dim=-1)
            picked = logp.gather(-1, ids[:, 1:][where][:, None]).squeeze(-1)
            lp = F.pad(torch.zeros(where.shape, dtype=picked.dtype, device=ids.device).masked_scatter(where, picked),
                       (1, 0))
            if entropy_mask is not None and not torch.equal(entropy_mask[:, 1:].bool(), where):
                raise ValueError("entropy_mask must equal need")
            rows = logp.detach() if entropy_mask is not None else None
        ent = None
        if where is not None and rows is not None:
            with torch.no_grad():
                ent = torch.zeros_like(lp)
                ent[:, 1:][where] = -(rows.exp() * rows).sum(-1)
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

    def _run(self, model: torch.nn.Module, rows: Sequence[Sequence[int]], members: list[int], pack: Pack | None,
             need: Tensor | None = None, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """[B, L] logprobs (and entropy) of `members`, padded like `_forward`'s."""
        if pack is None:
            ids, attn = self._ids([rows[i] for i in members])
            return self._forward(model, ids, attn, entropy_mask=need if entropy else None, need=need)
        return self._forward_packed(model, pack, rows, members, need, entropy)

    def _forward_packed(self, model: torch.nn.Module, pack: Pack, rows: Sequence[Sequence[int]], members: list[int],
                        need: Tensor | None, entropy: bool) -> tuple[Tensor, Tensor | None]:
        """`_forward` on a shared-prefix pack: one row, its own position ids and attention mask; the
        logprob of each member's token t comes from the packed position of its token t-1."""
        inner = self.accelerator.unwrap_model(model)
        ids = torch.tensor([pack.ids], device=self.device)
        positions = torch.tensor([pack.positions], device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = inner.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False,
                                         attention_mask=pack.attention_mask(self.device)).last_hidden_state[0]
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
        width = max(len(rows[i]) for i in members)
        as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        at = (as_index(rows_at), as_index(cols_at))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = output_logits(inner, hidden[as_index(src)])
        logp = torch.log_softmax(logits.float() / self.cfg.temperature, dim=-1)
        picked = logp.gather(-1, as_index(tgt)[:, None]).squeeze(-1)
        lp = torch.zeros(len(members), width, dtype=picked.dtype, device=self.device).index_put(at, picked)
        ent = None
        if entropy:
            with torch.no_grad():
                rows_lp = logp.detach()
                ent = torch.zeros_like(lp).index_put(at, -(rows_lp.exp() * rows_lp).sum(-1))
        return lp, ent

    @torch.no_grad()
    def _no_grad_logprobs(self, model: torch.nn.Module, rows: Sequence[Sequence[int]]) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(rows)
        for members, pack in self._micro_batches(rows, range(len(rows))):
            lp, _ = self._run(model, rows, members, pack)
            for j, i in enumerate(members):
                out[i] = lp[j, : len(rows[i])].detach()
        return out  # type: ignore[return-value]

    def logprobs(self, token_ids_batch: list[list[int]]) -> list[list[float]]:
        """logprob of token i given tokens < i at the training temperature; position 0 gets 0.0."""
        for r in token_ids_batch:
            self._check_ids(r)
        with self._lock:
            self.model.eval()
            return [t.float().cpu().tolist() for t in self._no_grad_logprobs(self.model, token_ids_batch)]

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
        old_all: list[Tensor] | None = None
        if min(cfg.num_minibatches, len(samples)) > 1:
            # later minibatches train on weights that earlier ones moved: their ratio needs the
            # logprobs from before the first update
            self.model.eval()
            old_all = self._no_grad_logprobs(self.model, rows)

        n = len(samples)
        # Filtering (zero-variance groups, truncation, masked samples) can leave fewer samples than
        # configured minibatches: then each sample is its own minibatch (reported in the stats).
        minibatches = min(cfg.num_minibatches, n)
        bounds = [round(k * n / minibatches) for k in range(minibatches + 1)]
        sums = dict.fromkeys(METRIC_KEYS, 0.0)
        train_logprobs: list[list[float]] = [[] for _ in samples]
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
            mine = share(rows, idx, world_size(), rank())  # all of idx with one process
            for members, pack in self._micro_batches(rows, mine):
                mask = _pad([samples[i].loss_mask for i in members], 0, torch.float32, self.device)
                gen = _pad([samples[i].gen_logprobs for i in members], 0.0, torch.float32, self.device)
                adv = torch.tensor([samples[i].advantage for i in members], dtype=torch.float32, device=self.device)
                lp, ent = self._run(self.model, rows, members, pack, need=mask, entropy=True)
                if old_all is None:
                    old = lp.detach()  # one update per batch: exactly on-policy, ratio 1
                else:
                    old = _pad([old_all[i].tolist() for i in members], 0.0, torch.float32, self.device)
                ref = None
                if cfg.loss.kl_beta > 0.0:
                    with torch.no_grad(), self._reference() as ref_model:
                        ref, _ = self._run(ref_model, rows, members, pack, need=mask)
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
            sum_gradients(self._trained)
            [mb_loss] = sum_floats([mb_loss])
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm else math.inf
            norm = float(self.accelerator.clip_grad_norm_(self._trained, max_norm))
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
        return TrainStats(
            loss=sum(losses) / len(losses),
            kl=sums["kl"] / tokens,
            entropy=sums["entropy"] / tokens,
            clip_low_frac=sums["clip_low"] / tokens,
            clip_high_frac=sums["clip_high"] / tokens,
            clip_dual_frac=sums["clip_dual"] / tokens,
            grad_norm=sum(norms) / len(norms),
            token_mult_prob_error=sums["token_mult_prob_error"] / tokens,
            gen_kl_error=sums["gen_kl_error"] / tokens,
            num_tokens=sum(len(r) for r in rows),
            num_model_tokens=int(tokens),
            train_logprobs=train_logprobs,
            tis_capped_frac=sums["tis_capped"] / tokens,
            lr=lr,
            skipped_steps=skipped,
            num_minibatches=minibatches,
        )

    @contextlib.contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference policy for the KL term."""
        if self.peft is None:
            yield self.ref_model
            return
        with self.peft.disable_adapter():
            yield self.model

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
            params = {name: p.detach() for name, p in self._unwrapped().named_parameters()}
            try:  # transformers 5 renames some architectures' weights on load; undo that
                from transformers.core_model_loading import revert_weight_conversion

                params = revert_weight_conversion(self._unwrapped(), params)
            except ImportError:
                pass
            items = [(k, v if dtype is None else v.to(dtype)) for k, v in params.items()]
        return iter(items)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, dir: Path) -> None:
        """Model, optimizer, scheduler, step and RNG states; a crash mid-save leaves the old one."""
        dir = Path(dir)
        tmp = dir.with_name(dir.name + ".tmp")
        old = dir.with_name(dir.name + ".old")
        with self._lock:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if self.peft is not None:  # the adapter alone: the base weights never change
                save_adapter(self.peft, tmp)
            else:
                # In-memory names (not the original checkpoint layout): load_checkpoint reads them
                # back with load_state_dict, exactly, for every architecture.
                self._unwrapped().save_pretrained(tmp, save_original_format=False)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "step": self.step,
                },
                tmp / "trainer_state.pt",
            )
            torch.save(_rng_state(), tmp / "rng_state.pt")
        if dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            dir.rename(old)
        tmp.rename(dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, dir: Path) -> None:
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
                model = self._unwrapped()
                missing, unexpected = model.load_state_dict(state, strict=False)
                if unexpected or set(missing) - _tied_names(model):
                    raise ValueError(f"checkpoint does not match the model: missing {missing}, "
                                     f"unexpected {unexpected} (was it trained with model.lora set?)")
            trainer = torch.load(dir / "trainer_state.pt", map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(trainer["optimizer"])
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
            self._unwrapped().to(device)
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
                        state[k] = v.to(device, non_blocking=True)
            torch.cuda.synchronize()
            if device.type == "cpu":
                torch.cuda.empty_cache()


def _tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names that alias an earlier tensor (a tied lm_head): save_pretrained drops them."""
    seen: set[int] = set()
    tied: set[str] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        ptr = t.data_ptr()
        if ptr in seen:
            tied.add(name)
        seen.add(ptr)
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
