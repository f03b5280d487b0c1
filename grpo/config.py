"""config.yaml, validated before anything starts.

Every section is a pydantic model with `extra="forbid"`: an unknown key, a wrong type, a missing
file or an impossible combination becomes one line naming the key (`load_config` raises
`ConfigError`; trainer.py prints it and exits with code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from grpo.lora import LoraSettings
from gym.config import GymConfig


class ConfigError(ValueError):
    """One line naming the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSection(_Section):
    name: str = "run"
    dir: str = "runs"                       # runs/<name>/ holds rollouts.db, checkpoints, gym logs
    seed: int = 0
    export: bool = True                     # a finished run writes runs/<name>/model/ (plain HF folder)
    # CPU: allocations of at least this many MiB get their own mmap, returned when freed (grpo/loop.py
    # limit_heap_fragmentation); null: glibc's default. 1: -0.3 GiB at the peak, ~15% slower steps
    cpu_heap_mmap_mib: float | None = Field(default=None, gt=0)
    # CPU: preload this C allocator instead of glibc's malloc (engine/cpu_allocator.py); null: glibc.
    # jemalloc: ~17% faster steps than glibc with a 1 MiB mmap threshold, +0.1 GiB at the peak
    cpu_allocator: Literal["jemalloc", "tcmalloc"] | None = None

    @model_validator(mode="after")
    def _one_allocator_setting(self) -> "RunSection":
        if self.cpu_allocator is not None and self.cpu_heap_mmap_mib is not None:
            raise ValueError("run.cpu_heap_mmap_mib: a glibc malloc setting, which has no effect with "
                             "run.cpu_allocator set; set one of them to null")
        return self


class ModelSection(_Section):
    name: str = "embedded:smollm2-135m-instruct"   # the embedded default, a local folder or a hub name
    max_model_len: int = Field(default=1024, ge=64)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    lora: LoraSettings | None = None         # {r, alpha, dropout, target_modules}: train adapters; null: full


class EngineSection(_Section):
    max_num_seqs: int = Field(default=64, ge=1)
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    cpu_kv_cache_gib: float = Field(default=2.0, gt=0)   # CPU: KV cache size, allocated whole at start
    enforce_eager: bool | None = None          # None: eager on CPU, CUDA graphs + compile on GPU
    max_num_batched_tokens: int | None = Field(default=None, ge=16)   # None: vLLM's default
    # ranks that shard one model's engine (a model too big for one GPU); must divide the number of
    # ranks; only each group's first rank serves an endpoint (engine/tp.py)
    tensor_parallel_size: int = Field(default=1, ge=1)


class ServerSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    model_name: str = "policy"
    api_key: str | None = None
    dashboard_token: str | None = None       # required when host is not loopback
    tool_parser: str | None = "hermes"

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "ServerSection":
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.dashboard_token:
            raise ValueError("dashboard_token: binding to a non-loopback host requires a token")
        return self


class GRPOSection(_Section):
    steps: int = Field(default=40, ge=1)
    rows_per_step: int = Field(default=8, ge=1)
    group_size: int = Field(default=4, ge=2)
    temperature: float = Field(default=1.0, gt=0)
    max_tokens: int = Field(default=128, ge=1)
    baseline: Literal["mean", "leave_one_out"] = "mean"
    normalize_std: bool = True
    drop_zero_variance_groups: bool = False   # dynamic sampling: skip groups with equal rewards
    # Rollouts with advantage 0 never run backward (their gradient is exactly 0). true: they still run
    # forward, so token_mult_prob_error and the stored train_logprob cover every rollout; false: not
    # even that (faster; those metrics then cover the trained rollouts, NULL when none was)
    measure_zero_advantage: bool = True
    truncated: Literal["keep", "mask", "drop"] = "keep"   # rollouts that hit the context / max tokens
    overlong_buffer: int = Field(default=0, ge=0)    # DAPO soft overlong punishment over the last N tokens; 0: off
    overlong_penalty: float = Field(default=1.0, ge=0)   # the penalty at max_tokens
    clip_low: float = Field(default=0.2, ge=0)
    clip_high: float = Field(default=0.28, ge=0)
    normalization: Literal["token", "sequence"] = "token"
    # grpo | dr_grpo (no std normalisation, constant normaliser) | gspo (sequence ratio) | cispo (clipped IS weight)
    loss: Literal["grpo", "dr_grpo", "gspo", "cispo"] = "grpo"
    ratio_clip_c: float | None = Field(default=None, gt=1)      # dual clip for negative advantages
    dr_grpo_normalizer: int | None = Field(default=None, ge=1)  # dr_grpo's constant length; null: max_tokens
    kl_beta: float = Field(default=0.0, ge=0)
    kl_log_ratio_clamp: float | None = Field(default=20.0, gt=0)   # |log(ref/policy)| per token; null: none
    kl_max: float | None = Field(default=10.0, gt=0)               # per-token KL; null: none
    tis_cap: float | None = Field(default=None, gt=0)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    # after warmup: constant, or linear decay to 0 at the last step (TRL's default)
    lr_schedule: Literal["constant", "linear"] = "constant"
    micro_batch_tokens: int = Field(default=2048, ge=16)
    pack_shared_prefix: bool = True   # a group's shared prompt once per forward, no padding (grpo/packing.py)
    num_minibatches: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    offload_params: bool = False              # GPU: trainer weights (and reference) on CPU while vLLM generates
    checkpoint_every: int = Field(default=10, ge=1)
    eval_every: int = Field(default=0, ge=0)    # 0: no evaluation during training; N: after every N-th step
    eval_group_size: int = Field(default=1, ge=1)        # rollouts per eval row
    eval_temperature: float = Field(default=0.0, ge=0, le=2)   # 0: greedy
    eval_max_rows: int | None = Field(default=None, ge=1)     # first N eval rows of every env (None: all)

    @model_validator(mode="after")
    def _combos(self) -> "GRPOSection":
        if self.baseline == "leave_one_out" and self.group_size < 2:
            raise ValueError("group_size: leave_one_out needs at least 2")
        if (self.rows_per_step * self.group_size) % self.num_minibatches:
            raise ValueError("num_minibatches: must divide rows_per_step * group_size")
        return self


class Config(_Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    server: ServerSection = Field(default_factory=ServerSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    gym: GymConfig

    @model_validator(mode="after")
    def _fits(self) -> "Config":
        if self.grpo.max_tokens >= self.model.max_model_len:
            raise ValueError("grpo.max_tokens: must be smaller than model.max_model_len")
        if self.grpo.overlong_buffer > self.grpo.max_tokens:
            raise ValueError("grpo.overlong_buffer: must not exceed grpo.max_tokens")
        if self.grpo.eval_every and not any(e.eval_data for e in self.gym.envs):
            raise ValueError("grpo.eval_every: no environment in gym.envs has eval_data to evaluate on")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "model"


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Parse and validate config.yaml; raises ConfigError with one line naming the key."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        _set_path(raw, dotted, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "config"
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"config: unknown key {key}") from None
        # a section's own validator names the key inside it: "grpo: group_size: ..."
        where = f"{key}: " if err["loc"] else ""
        raise ConfigError(f"config: {where}{msg}") from None
    except ValueError as e:  # GymConfigError raised outside pydantic's wrapping
        raise ConfigError(f"config: {e}") from None


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested mappings and lists (list items by index), creating mappings."""
    node: Any = raw
    *parents, leaf = dotted.split(".")
    try:
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    except (ValueError, IndexError, TypeError, AttributeError):
        raise ConfigError(f"config: --set {dotted}: no such key") from None
