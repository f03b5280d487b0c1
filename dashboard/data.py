"""What the pages show, read from a run's SQLite file. Every function here blocks: call it off
the event loop (the app runs them in Starlette's thread pool)."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from store import DB_NAME, open_readonly
from store.db import NUM_GENERATION_IDS, NUM_PROMPT_IDS
from store import metrics as M

# Token fields Gym puts on every model output item: shown as counts, not as thousands of numbers.
_TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")


@contextmanager
def reader(db: Path) -> Iterator[sqlite3.Connection]:
    conn = open_readonly(db)
    try:
        yield conn
    finally:
        conn.close()


def _missing_table(e: sqlite3.OperationalError) -> bool:
    # A run whose writer has not created the schema yet reads as empty, not as an error page.
    return "no such table" in str(e)


# -- runs ------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    name: str
    db: Path
    status: str = "unknown"
    model: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None
    last_step: int | None = None
    policy_version: int | None = None
    last_step_at: float | None = None
    num_rollouts: int = 0
    updated_at: float = 0.0     # mtime of the database files

    @property
    def elapsed_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else time.time()
        return max(0.0, end - self.started_at)


def run_names(runs_dir: Path) -> list[str]:
    """Sub-folders of runs_dir that hold a rollouts.db, newest first."""
    if not runs_dir.is_dir():
        return []
    found = [(_mtime(p / DB_NAME), p.name) for p in runs_dir.iterdir() if (p / DB_NAME).is_file()]
    return [name for _, name in sorted(found, key=lambda t: (-t[0], t[1]))]


def _mtime(db: Path) -> float:
    # The WAL file changes on every commit; the main file only at checkpoints.
    return max((p.stat().st_mtime for p in (db, db.with_name(db.name + "-wal")) if p.exists()), default=0.0)


def run_db(runs_dir: Path, run: str) -> Path | None:
    """The database of `run`, or None when no such run exists (names are checked against the
    folder listing, so a request cannot reach outside runs_dir)."""
    return runs_dir / run / DB_NAME if run in run_names(runs_dir) else None


def read_run(runs_dir: Path, run: str) -> RunSummary:
    db = runs_dir / run / DB_NAME
    s = RunSummary(name=run, db=db, updated_at=_mtime(db))
    with reader(db) as conn:
        try:
            row = conn.execute("SELECT name, model, config, started_at, finished_at, status FROM runs "
                               "ORDER BY id DESC LIMIT 1").fetchone()
            if row:
                _, s.model, config, s.started_at, s.finished_at, s.status = row
                s.config = json.loads(config) if config else {}
            last = conn.execute("SELECT step, policy_version, finished_at FROM steps "
                                "ORDER BY step DESC LIMIT 1").fetchone()
            if last:
                s.last_step, s.policy_version, s.last_step_at = last
            s.num_rollouts = conn.execute("SELECT count(*) FROM rollouts").fetchone()[0]
        except sqlite3.OperationalError as e:
            if not _missing_table(e):
                raise
    return s


def list_runs(runs_dir: Path) -> list[RunSummary]:
    return [read_run(runs_dir, name) for name in run_names(runs_dir)]


# -- steps and metrics -----------------------------------------------------------------------


@dataclass
class StepRow:
    step: int
    policy_version: int
    started_at: float
    finished_at: float
    metrics: dict[str, float | None]


def read_steps(db: Path) -> list[StepRow]:
    with reader(db) as conn:
        try:
            rows = conn.execute("SELECT step, policy_version, started_at, finished_at, metrics FROM steps "
                                "ORDER BY step").fetchall()
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return []
            raise
    return [StepRow(s, pv, a, b, json.loads(m) if m else {}) for s, pv, a, b, m in rows]


def metric_series(steps: list[StepRow], key: str) -> list[tuple[float, float | None]]:
    return [(s.step, _num(s.metrics.get(key))) for s in steps if key in s.metrics]


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def env_reward_series(db: Path, steps: list[StepRow]) -> dict[str, list[tuple[float, float | None]]]:
    """Mean reward per environment per step: from the `reward/<env>_mean` metrics when the trainer
    logs them, otherwise averaged from the rollouts table."""
    envs = sorted({env for s in steps for k in s.metrics if (env := M.env_reward_env(k)) is not None})
    if envs:
        return {env: metric_series(steps, M.env_reward(env)) for env in envs}
    out: dict[str, list[tuple[float, float | None]]] = {}
    with reader(db) as conn:
        try:
            rows = conn.execute("SELECT env, step, avg(reward) FROM rollouts GROUP BY env, step "
                                "ORDER BY env, step").fetchall()
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return {}
            raise
    for env, step, mean in rows:
        out.setdefault(env, []).append((step, mean))
    return out


@dataclass
class Alert:
    step: int
    metric: str
    message: str


# (metric, is it alarming, what it means): thresholds from DESIGN's health metrics
ALERT_RULES = (
    (M.TOKEN_MULT_PROB_ERROR, lambda v: v > 1.05,
     "token_mult_prob_error {v:.4f} > 1.05: the engine samples from other weights than the trainer's"),
    (M.GEN_KL_ERROR, lambda v: v > 1e-3, "gen_kl_error {v:.2g} > 1e-3: generation and training disagree"),
    (M.SKIPPED_OPTIMIZER_STEPS, lambda v: v > 0, "{v:.0f} optimizer update(s) skipped: non-finite gradient"),
    (M.GYM_RESTARTS, lambda v: v > 0, "{v:.0f} Gym server restart(s): a server died or hung; its rollouts were retried"),
)


def health_alerts(steps: list[StepRow], newest: int = 10) -> list[Alert]:
    """The newest steps' alarming metrics, newest first."""
    out = []
    for s in reversed(steps):
        for metric, alarming, text in ALERT_RULES:
            v = s.metrics.get(metric)
            if v is not None and alarming(v):
                out.append(Alert(s.step, metric, text.format(v=v)))
        if len(out) >= newest:
            break
    return out[:newest]


def eval_reward_series(steps: list[StepRow]) -> dict[str, list[tuple[float, float | None]]]:
    """Mean eval reward per environment, at the steps that evaluated (grpo.eval_every)."""
    envs = sorted({env for s in steps for k in s.metrics if (env := M.eval_env_reward_env(k)) is not None})
    return {env: [p for p in metric_series(steps, M.eval_env_reward(env)) if p[1] is not None] for env in envs}


def reward_curve(db: Path) -> list[tuple[float, float | None]]:
    """reward_mean per step, or the rollouts' mean reward when the metric is absent."""
    steps = read_steps(db)
    series = metric_series(steps, M.REWARD_MEAN)
    if series:
        return series
    with reader(db) as conn:
        try:
            return [(s, r) for s, r in conn.execute(
                "SELECT step, avg(reward) FROM rollouts GROUP BY step ORDER BY step")]
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return []
            raise


# -- rollouts --------------------------------------------------------------------------------


@dataclass
class RolloutFilter:
    step: int | None = None
    env: str | None = None
    min_reward: float | None = None
    max_reward: float | None = None
    truncated: bool | None = None
    kind: str | None = None           # "train" | "eval"
    sort: str = "id"
    offset: int = 0
    limit: int = 100


SORTS = {
    "id": "id",
    "reward": "reward, id",
    "-reward": "reward DESC, id",
    "-num_tokens": "num_tokens DESC, id",
    "-advantage": "advantage DESC, id",
    "advantage": "advantage, id",
}

ROLLOUT_COLUMNS = ("id", "step", "policy_version", "env", "agent", "row_index", "group_index", "row_id",
                   "reward", "advantage", "num_turns", "num_model_calls", "num_tool_calls", "truncated",
                   "mask_sample", "failure", "latency_s", "num_tokens", "num_model_tokens", "kind")


def list_rollouts(db: Path, f: RolloutFilter) -> tuple[list[dict[str, Any]], int]:
    """One page of rollouts matching the filter, and how many match in all."""
    order = SORTS.get(f.sort, "id")
    with reader(db) as conn:
        try:
            # a store from before eval rollouts has no `kind` column: all its rollouts trained
            kind = "kind" if _has_kind(conn) else "'train'"
            where, params = [], []
            for sql, value in (("step = ?", f.step), ("env = ?", f.env or None), ("reward >= ?", f.min_reward),
                               ("reward <= ?", f.max_reward), ("truncated = ?", f.truncated),
                               (f"{kind} = ?", f.kind or None)):
                if value is not None:
                    where.append(sql)
                    params.append(int(value) if isinstance(value, bool) else value)
            clause = (" WHERE " + " AND ".join(where)) if where else ""
            columns = ", ".join(f"{kind} AS kind" if c == "kind" else c for c in ROLLOUT_COLUMNS)
            total = conn.execute(f"SELECT count(*) FROM rollouts{clause}", params).fetchone()[0]
            rows = conn.execute(f"SELECT {columns} FROM rollouts{clause} ORDER BY {order} LIMIT ? OFFSET ?",
                                [*params, f.limit, f.offset]).fetchall()
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return [], 0
            raise
    return [dict(zip(ROLLOUT_COLUMNS, r)) for r in rows], total


def _has_kind(conn: sqlite3.Connection) -> bool:
    return any(r[1] == "kind" for r in conn.execute("PRAGMA table_info(rollouts)"))


def filter_choices(db: Path) -> tuple[list[int], list[str]]:
    with reader(db) as conn:
        try:
            steps = [r[0] for r in conn.execute("SELECT step FROM steps ORDER BY step DESC")]
            envs = [r[0] for r in conn.execute("SELECT DISTINCT env FROM rollouts ORDER BY env")]
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return [], []
            raise
    return steps, envs


@dataclass
class Turn:
    """One entry of the conversation as shown: a message, a tool call or a tool result."""

    kind: str                 # "message" | "function_call" | "function_call_output" | "reasoning" | other type
    role: str                 # system, developer, user, assistant, tool
    text: str
    source: str               # "input" (the prompt Gym sent) or "output" (the episode)
    name: str | None = None   # tool name for calls
    note: str | None = None   # token counts, call ids


@dataclass
class Token:
    position: int
    token_id: int
    text: str
    is_model: bool
    turn: int | None
    gen: float | None
    train: float | None

    @property
    def gap(self) -> float | None:
        if self.gen is None or self.train is None:
            return None
        return abs(self.train - self.gen)


@dataclass
class RolloutDetail:
    row: dict[str, Any]
    result: dict[str, Any]
    turns: list[Turn]
    verifier: list[tuple[str, str]]
    tools: list[str]
    tokens: list[Token]


def read_rollout(db: Path, rollout_id: int) -> RolloutDetail | None:
    with reader(db) as conn:
        try:
            row = conn.execute(f"SELECT {', '.join(ROLLOUT_COLUMNS)}, result FROM rollouts WHERE id = ?",
                               [rollout_id]).fetchone()
            if row is None:
                return None
            toks = conn.execute(
                "SELECT position, token_id, token_text, is_model, turn, gen_logprob, train_logprob "
                "FROM tokens WHERE rollout_id = ? ORDER BY position", [rollout_id]).fetchall()
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return None
            raise
    fields = dict(zip(ROLLOUT_COLUMNS, row[:-1]))
    try:
        result = json.loads(row[-1]) if row[-1] else {}
    except json.JSONDecodeError:
        result = {"unparsed_result": row[-1]}
    if not isinstance(result, dict):
        result = {"result": result}
    return RolloutDetail(
        row=fields, result=result, turns=conversation(result), verifier=verifier_fields(result),
        tools=tool_names(result),
        tokens=[Token(p, t, txt or "", bool(m), turn, g, tr) for p, t, txt, m, turn, g, tr in toks],
    )


def _text_of(content: Any) -> str:
    """Text of a Responses API content value: a string or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif isinstance(part.get("refusal"), str):
                    parts.append("[refusal] " + part["refusal"])
                else:
                    parts.append(f"[{part.get('type', 'part')}]")
            else:
                parts.append(str(part))
        return "\n".join(parts)
    return json.dumps(content, indent=2, default=str)


def _token_note(item: dict[str, Any]) -> str | None:
    # the store keeps counts (store.db.compact_result); stores written before it, the arrays
    n_prompt = item.get(NUM_PROMPT_IDS, len(item.get("prompt_token_ids") or []))
    n_gen = item.get(NUM_GENERATION_IDS, len(item.get("generation_token_ids") or []))
    if not any(k in item for k in (NUM_PROMPT_IDS, NUM_GENERATION_IDS, *_TOKEN_FIELDS)):
        return None
    return f"{n_prompt} prompt ids, {n_gen} generated ids"


def _turn_of(item: Any, source: str) -> Turn:
    if not isinstance(item, dict):
        return Turn("other", "?", json.dumps(item, default=str), source)
    kind = item.get("type") or ("message" if "role" in item else "other")
    if kind == "message":
        return Turn("message", str(item.get("role", "assistant")), _text_of(item.get("content")), source,
                    note=_token_note(item))
    if kind == "function_call":
        args = item.get("arguments", "")
        try:
            args = json.dumps(json.loads(args), indent=2, ensure_ascii=False)
        except (TypeError, ValueError):
            args = str(args)
        note = " · ".join(x for x in (f"call {item.get('call_id')}" if item.get("call_id") else None,
                                      _token_note(item)) if x) or None
        return Turn("function_call", "assistant", args, source, name=str(item.get("name", "?")), note=note)
    if kind == "function_call_output":
        out = item.get("output", "")
        return Turn("function_call_output", "tool", out if isinstance(out, str) else _text_of(out), source,
                    note=f"call {item.get('call_id')}" if item.get("call_id") else None)
    if kind == "reasoning":
        texts = [_text_of(item.get(k)) for k in ("summary", "content") if item.get(k)]
        return Turn("reasoning", "assistant", "\n".join(texts), source, note=_token_note(item))
    shown = {k: v for k, v in item.items() if k not in _TOKEN_FIELDS}
    return Turn(str(kind), str(item.get("role", "?")), json.dumps(shown, indent=2, default=str), source,
                note=_token_note(item))


def conversation(result: dict[str, Any]) -> list[Turn]:
    """The episode turn by turn: the prompt Gym sent (`responses_create_params.input`, after its
    `instructions`), then every item of `response.output`."""
    turns: list[Turn] = []
    params = result.get("responses_create_params") or {}
    if isinstance(params, dict):
        if params.get("instructions"):
            turns.append(Turn("message", "system", _text_of(params["instructions"]), "input"))
        inp = params.get("input")
        if isinstance(inp, str):
            turns.append(Turn("message", "user", inp, "input"))
        elif isinstance(inp, list):
            turns.extend(_turn_of(item, "input") for item in inp)
    response = result.get("response") or {}
    if isinstance(response, dict):
        for item in response.get("output") or []:
            turns.append(_turn_of(item, "output"))
    return turns


def verifier_fields(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Everything in the result besides the prompt and the response: reward and the verifier's fields."""
    out = []
    for k, v in result.items():
        if k in ("response", "responses_create_params"):
            continue
        out.append((k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)))
    out.sort(key=lambda kv: (kv[0] != "reward", kv[0]))
    return out


def tool_names(result: dict[str, Any]) -> list[str]:
    params = result.get("responses_create_params") or {}
    tools = params.get("tools") if isinstance(params, dict) else None
    return [str(t.get("name", t.get("type", "?"))) for t in tools or [] if isinstance(t, dict)]


# -- gym -------------------------------------------------------------------------------------


def tail(path: str | Path | None, max_lines: int = 40, max_bytes: int = 16_384) -> str:
    """The last lines of a log file (reads at most max_bytes from its end)."""
    if not path:
        return ""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError as e:
        return f"(cannot read {p}: {e.strerror or e})"
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line is probably cut
    return "\n".join(lines[-max_lines:])
