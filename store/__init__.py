"""The run store: every step, rollout and token of a run in one SQLite file.

Each run writes `runs/<run>/rollouts.db` (SQLite, WAL mode, so you can query it while the run
trains). The trainer writes a step's metrics and all of its rollouts and tokens in one
transaction; a resumed run first deletes the steps after its checkpoint.

Schema:

    runs      one row (id = 1): name, model, config (JSON), started_at, finished_at (unix
              seconds), status (running | finished | failed | ...)
    steps     step (primary key), policy_version, started_at, finished_at, duration_s,
              metrics (JSON with the trainer's original keys) and one REAL column per metric,
              named by replacing every character outside [A-Za-z0-9_] with "_":
              reward_mean, loss, kl, entropy, clip_low_frac, clip_high_frac,
              token_mult_prob_error, gen_kl_error, tokens_per_s, time_generation_s,
              time_training_s, time_weight_sync_s, time_logging_s, and per environment
              reward/<env>_mean as reward_<env>_mean
    rollouts  id, step, policy_version, env, agent, row_index, group_index (0..G-1), row_id,
              reward, advantage, num_turns, num_model_calls, num_tool_calls, truncated (0/1),
              mask_sample (0/1), failure, latency_s, num_tokens, num_model_tokens,
              result (the Gym result as JSON: json_extract(result, '$.response.output'); null
              fields dropped, each item's token arrays replaced by num_prompt_token_ids and
              num_generation_token_ids: the ids and logprobs are in tokens)
    tokens    (a view) rollout_id, position (0-based in the rollout's token sequence), token_id,
              token_text (the decoded piece), is_model (1 = sampled by the policy, trained on),
              turn (which model call the token belongs to), gen_logprob (at sampling time),
              train_logprob (under the trainer; NULL when not computed)

`tokens` reads three compact tables (see store/db.py): token_rows (one row per model token),
token_spans (each run of prompt / tool tokens as a JSON array of ids) and token_texts.
Indexes: rollouts(step, env), rollouts(step, reward), rollouts(env, step), rollouts(num_tokens);
one rollout's tokens are read by key.

Forensic queries (each runs as written: `sqlite3 runs/<run>/rollouts.db "<query>"`):

    -- lowest_reward_last_step: the ten worst rollouts of the last step
    SELECT id, env, row_id, group_index, reward, advantage, num_tokens, truncated, failure
    FROM rollouts
    WHERE step = (SELECT max(step) FROM rollouts)
    ORDER BY reward, id
    LIMIT 10;

    -- logprob_disagreement: model tokens where trainer and generator disagree most
    SELECT t.rollout_id, r.step, r.env, t.position, t.token_id, t.token_text,
           t.gen_logprob, t.train_logprob,
           abs(t.train_logprob - t.gen_logprob) AS gap
    FROM tokens t JOIN rollouts r ON r.id = t.rollout_id
    WHERE t.is_model = 1
    ORDER BY abs(t.train_logprob - t.gen_logprob) DESC
    LIMIT 20;

    -- reward_by_env: mean reward of each environment at each step
    SELECT step, env, count(*) AS rollouts, avg(reward) AS reward_mean
    FROM rollouts
    GROUP BY step, env
    ORDER BY step, env;

    -- truncation_rate: share of rollouts cut at the context or token limit, per step
    SELECT step, count(*) AS rollouts, avg(truncated) AS truncation_rate
    FROM rollouts
    GROUP BY step
    ORDER BY step;

    -- longest_rollouts: the ten longest token sequences
    SELECT id, step, env, num_tokens, num_model_tokens, num_turns, truncated, reward
    FROM rollouts
    ORDER BY num_tokens DESC, id
    LIMIT 10;

Python: `RunStore.open(path)` writes; `open_readonly(path)` and `ro_query(path, sql, ...)` read
(the dashboard's SQL console uses `ro_query`: one statement, no writes, a time limit).
"""

from __future__ import annotations

import re

from store.db import (
    DB_NAME,
    QueryError,
    QueryTimeout,
    RunStore,
    metric_column,
    open_readonly,
    ro_query,
)
from store.records import RolloutRecord, StepRecord

__all__ = [
    "DB_NAME", "QueryError", "QueryTimeout", "RunStore", "RolloutRecord", "StepRecord",
    "forensic_queries", "metric_column", "open_readonly", "ro_query",
]

_QUERY_RE = re.compile(r"^    -- (\w+): (.*)\n((?:    .*\n)*?    .*;)$", re.M)


def forensic_queries() -> dict[str, tuple[str, str]]:
    """The queries documented above, {name: (description, sql)}, read from this docstring so
    the documented text is exactly what tests run and the dashboard offers."""
    return {
        m.group(1): (m.group(2), "\n".join(line[4:] for line in m.group(3).splitlines()))
        for m in _QUERY_RE.finditer(__doc__ or "")
    }
