"""Step metric names, defined once: grpo writes them, the dashboard, trainer.py and bench/ read them.

A metric written under one spelling and read under another would show an empty chart and no
error, so every writer and reader imports these names instead of typing the strings.
Each step's metrics land in the `steps` table, one column per metric (`store.db.metric_column`).
"""

from __future__ import annotations

import re

# rewards and the shape of the batch
REWARD_MEAN = "reward_mean"
REWARD_STD = "reward_std"
ZERO_VARIANCE_GROUP_FRAC = "zero_variance_group_frac"   # share of groups with equal rewards (no gradient)
TRUNCATION_RATE = "truncation_rate"
ROLLOUTS_TRAINED = "rollouts_trained"
GENERATED_TOKENS_MEAN = "generated_tokens_mean"
TURNS_MEAN = "turns_mean"
ADVANTAGE_ABS_MEAN = "advantage_abs_mean"
INJECTED_MESSAGES = "injected_messages"      # assistant text an agent wrote itself (never trained on)
ROLLOUTS_RETRIED = "rollouts_retried"        # rollouts that needed more than one post to Gym
OVERLONG_PENALTY_MEAN = "overlong_penalty_mean"   # DAPO soft overlong punishment (grpo.overlong_buffer)
GYM_RESTARTS = "gym_restarts"                # Gym servers restarted during the step (dead or hung)

# the update
LOSS = "loss"
KL = "kl"
ENTROPY = "entropy"
CLIP_LOW_FRAC = "clip_low_frac"
CLIP_HIGH_FRAC = "clip_high_frac"
CLIP_FRAC = "clip_frac"
CLIP_DUAL_FRAC = "clip_dual_frac"            # tokens whose loss the dual clip (grpo.ratio_clip_c) capped
GRAD_NORM = "grad_norm"
LR = "lr"
TIS_CAPPED_FRAC = "tis_capped_frac"
MINIBATCHES = "minibatches"                  # optimizer steps planned (fewer when filtering left few samples)
SKIPPED_OPTIMIZER_STEPS = "skipped_optimizer_steps"   # non-finite gradient norm: update skipped
TRAINED_TOKENS = "trained_tokens"            # tokens in the trained sequences (prompt and model)
TRAINED_MODEL_TOKENS = "trained_model_tokens"
BACKWARD_MODEL_TOKENS = "backward_model_tokens"   # of those, the ones run backward (the rest: forward only)

# engine / trainer agreement (1.0 and 0.0 when exact)
TOKEN_MULT_PROB_ERROR = "token_mult_prob_error"
GEN_KL_ERROR = "gen_kl_error"

# time and resources
TIME_STEP_S = "time_step_s"
TIME_GENERATION_S = "time_generation_s"
TIME_TRAINING_S = "time_training_s"
TIME_WEIGHT_SYNC_S = "time_weight_sync_s"
TIME_LOGGING_S = "time_logging_s"
TIME_SLEEP_S = "time_sleep_s"
TIME_WAKE_S = "time_wake_s"
REQUESTS_ABORTED_AT_SLEEP = "requests_aborted_at_sleep"
PEAK_MEMORY_GIB = "peak_memory_gib"
TOKENS_PER_S = "tokens_per_s"
LOOP_LAG_P99_MS = "loop_lag_p99_ms"

# evaluation during training (grpo.eval_every): eval rows, never trained on
EVAL_REWARD_MEAN = "eval_reward_mean"
TIME_EVAL_S = "time_eval_s"

STEP_TIME_PARTS = (TIME_GENERATION_S, TIME_TRAINING_S, TIME_WEIGHT_SYNC_S, TIME_LOGGING_S)

_ENV_REWARD = re.compile(r"^reward/(.+)_mean$")
_EVAL_ENV_REWARD = re.compile(r"^eval_reward/(.+)_mean$")


def env_reward(env: str) -> str:
    """The mean reward of one environment in a step."""
    return f"reward/{env}_mean"


def env_reward_env(key: str) -> str | None:
    """The environment an `env_reward` key names, or None for any other key."""
    m = _ENV_REWARD.match(key)
    return m.group(1) if m else None


def eval_env_reward(env: str) -> str:
    """The mean reward of one environment's eval rows, at a step that evaluated."""
    return f"eval_reward/{env}_mean"


def eval_env_reward_env(key: str) -> str | None:
    m = _EVAL_ENV_REWARD.match(key)
    return m.group(1) if m else None


def env_metric(env: str, name: str) -> str:
    """Any other per-environment metric (turns, truncation, the verify response's own fields)."""
    return f"env/{env}/{name}"
