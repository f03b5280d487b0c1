"""One SQLite file per run: the trainer writes it, the dashboard and `sqlite3` read it.

The writer (`RunStore`) keeps one connection guarded by a lock: the trainer calls it from worker
threads (asyncio.to_thread), and SQLite connections must not be used by two threads at once.
WAL mode lets readers (dashboard, a user's `sqlite3` shell) read while a step is being written.
Readers go through `open_readonly` / `ro_query`, which cannot write.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import sqlite_utils

from store.records import ROLLOUT_KINDS, RolloutRecord, StepRecord

DB_NAME = "rollouts.db"

# Fixed columns of `steps`; every metric gets its own REAL column besides these.
_STEP_FIXED = ("step", "policy_version", "started_at", "finished_at", "duration_s", "metrics")


class QueryError(Exception):
    """A read-only query was refused or failed; the message is meant for the user."""


class QueryTimeout(QueryError):
    """A read-only query ran past its time limit and was interrupted."""


def metric_column(key: str) -> str:
    """The `steps` column that holds metric `key`: `reward/string_match_mean` -> `reward_string_match_mean`.

    Plain identifiers keep forensic SQL free of quoting (`SELECT step, reward_mean FROM steps`).
    """
    col = re.sub(r"[^0-9A-Za-z_]", "_", key)
    if not col or col[0].isdigit():
        col = "m_" + col
    if col in _STEP_FIXED:
        raise ValueError(f"metric {key!r} would overwrite the steps column {col!r}")
    return col


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None  # JSON and SQLite have no NaN


def _create_schema(db: sqlite_utils.Database) -> None:
    db["runs"].create(
        {"id": int, "name": str, "model": str, "config": str, "started_at": float,
         "finished_at": float, "status": str},
        pk="id", if_not_exists=True,
    )
    db["steps"].create(
        {"step": int, "policy_version": int, "started_at": float, "finished_at": float,
         "duration_s": float, "metrics": str},
        pk="step", if_not_exists=True,
    )
    db["rollouts"].create(
        {"id": int, "step": int, "policy_version": int, "env": str, "agent": str, "row_index": int,
         "group_index": int, "row_id": str, "reward": float, "advantage": float, "num_turns": int,
         "num_model_calls": int, "num_tool_calls": int, "truncated": int, "mask_sample": int,
         "failure": str, "latency_s": float, "num_tokens": int, "num_model_tokens": int,
         "result": str, "kind": str, "overlong_penalty": float},
        pk="id", if_not_exists=True, defaults={"kind": "train", "overlong_penalty": 0.0},
    )
    # a store written before these columns existed
    if "kind" not in db["rollouts"].columns_dict:
        db["rollouts"].add_column("kind", str, not_null_default="train")
    if "overlong_penalty" not in db["rollouts"].columns_dict:
        db["rollouts"].add_column("overlong_penalty", float, not_null_default=0.0)
    db.execute(_TOKEN_ROWS)
    db.execute(_TOKEN_SPANS)
    db.execute("CREATE TABLE IF NOT EXISTS token_texts (token_id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    if _is_table(db, "tokens"):  # a store written before token_rows: move its tokens over once
        _migrate_tokens_table(db)
    db.execute(_TOKENS_VIEW)
    rollouts = db["rollouts"]
    rollouts.create_index(["step", "env"], if_not_exists=True)
    rollouts.create_index(["step", "reward"], if_not_exists=True)
    rollouts.create_index(["env", "step"], if_not_exists=True)
    rollouts.create_index(["num_tokens"], if_not_exists=True)


# Tokens are the store's bulk, so they are stored small and read through the `tokens` view (the
# interface: readers never need the tables under it).
# - token_rows: one row per model token (and per other token carrying a logprob). WITHOUT ROWID:
#   the table is its (rollout_id, position) index. Logprobs are integers in units of 1e-5 nats
#   (LOGPROB_SCALE): SQLite stores an integer in 0-4 bytes where a REAL always takes 8; the
#   trainer's logprob is stored as its difference from the generator's, which is small or 0.
# - token_spans: each run of prompt / tool / injected tokens of one model call (logprob 0) as a
#   JSON array of ids, expanded by json_each in the view: ~5 bytes a token instead of ~17.
# - token_texts: each token id's text, once.
LOGPROB_SCALE = 100_000  # resolution 5e-6 nats: far below any gap worth a look
_TOKEN_ROWS = """CREATE TABLE IF NOT EXISTS token_rows (
    rollout_id INTEGER NOT NULL,
    position INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    is_model INTEGER NOT NULL,
    turn INTEGER,
    gen_lp INTEGER,
    train_delta INTEGER,
    PRIMARY KEY (rollout_id, position)
) WITHOUT ROWID"""
_TOKEN_SPANS = """CREATE TABLE IF NOT EXISTS token_spans (
    rollout_id INTEGER NOT NULL,
    start INTEGER NOT NULL,
    turn INTEGER,
    has_train INTEGER NOT NULL,
    token_ids TEXT NOT NULL,
    PRIMARY KEY (rollout_id, start)
) WITHOUT ROWID"""
_TOKENS_VIEW = f"""CREATE VIEW IF NOT EXISTS tokens AS
SELECT t.rollout_id AS rollout_id, t.position AS position, t.token_id AS token_id, x.text AS token_text,
       t.is_model AS is_model, t.turn AS turn, t.gen_lp / {LOGPROB_SCALE}.0 AS gen_logprob,
       (coalesce(t.gen_lp, 0) + t.train_delta) / {LOGPROB_SCALE}.0 AS train_logprob
FROM token_rows t LEFT JOIN token_texts x ON x.token_id = t.token_id
UNION ALL
SELECT s.rollout_id, s.start + j.key, j.value, x.text, 0, s.turn, 0.0, CASE WHEN s.has_train THEN 0.0 END
FROM token_spans s JOIN json_each(s.token_ids) j LEFT JOIN token_texts x ON x.token_id = j.value"""


def _is_table(db: sqlite_utils.Database, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone() is not None


def _migrate_tokens_table(db: sqlite_utils.Database) -> None:
    db.execute("INSERT OR IGNORE INTO token_texts SELECT token_id, coalesce(token_text, '') FROM tokens")
    db.execute(
        f"""INSERT INTO token_rows SELECT rollout_id, position, token_id, is_model, turn,
               CAST(round(gen_logprob * {LOGPROB_SCALE}) AS INTEGER),
               CAST(round(train_logprob * {LOGPROB_SCALE}) AS INTEGER)
               - coalesce(CAST(round(gen_logprob * {LOGPROB_SCALE}) AS INTEGER), 0)
            FROM tokens""")
    db.execute("DROP INDEX IF EXISTS tokens_logprob_gap")
    db.execute("DROP TABLE tokens")


def _quantize(lp: float | None) -> int | None:
    lp = _finite_or_none(lp)
    return None if lp is None else round(lp * LOGPROB_SCALE)


def split_tokens(r: RolloutRecord) -> tuple[list[tuple], list[tuple]]:
    """The rollout's tokens as token_rows (position, token_id, is_model, turn, gen_lp, train_delta)
    and token_spans (start, turn, has_train, ids as JSON): a span is a run of tokens of one call
    that the model did not sample and whose logprobs are 0 (NULL for the trainer's, all alike)."""
    train = r.train_logprobs or [None] * len(r.token_ids)
    rows: list[tuple] = []
    spans: list[tuple] = []
    run: list[int] = []
    run_key: tuple | None = None  # (start, turn, has_train) of the open span
    for i, (tid, m, turn, g, t) in enumerate(zip(r.token_ids, r.loss_mask, r.turn_index, r.gen_logprobs, train)):
        gq, tq = _quantize(g), _quantize(t)
        if not m and gq == 0 and tq in (0, None):
            key = (turn, tq is not None)
            if run_key is None or run_key[1:] != key:
                if run:
                    spans.append((*run_key, json.dumps(run, separators=(",", ":"))))
                run, run_key = [], (i, *key)
            run.append(tid)
            continue
        if run:
            spans.append((*run_key, json.dumps(run, separators=(",", ":"))))
            run, run_key = [], None
        rows.append((i, tid, int(m), turn, gq, None if tq is None else tq - (gq or 0)))
    if run:
        spans.append((*run_key, json.dumps(run, separators=(",", ":"))))
    return rows, spans


# Token arrays Gym puts on each output item: the tokens view holds them (the item keeps counts).
NUM_PROMPT_IDS, NUM_GENERATION_IDS = "num_prompt_token_ids", "num_generation_token_ids"
_RESULT_ARRAYS = {"prompt_token_ids": NUM_PROMPT_IDS, "generation_token_ids": NUM_GENERATION_IDS,
                  "generation_log_probs": None}


def compact_result(value: Any) -> Any:
    """The Gym result as stored: without null fields and without the per-item token arrays (in a
    multi-turn rollout every call's prompt ids repeat the whole history), which become counts."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if v is None:
                continue
            if k in _RESULT_ARRAYS:
                if _RESULT_ARRAYS[k] and isinstance(v, list):
                    out[_RESULT_ARRAYS[k]] = len(v)
                continue
            out[k] = compact_result(v)
        return out
    if isinstance(value, list):
        return [compact_result(v) for v in value]
    return value


def _lower_columns(db: sqlite_utils.Database) -> set[str]:
    return {c.lower() for c in db["steps"].columns_dict}


class RunStore:
    """Writer for one run's `rollouts.db`. Every method is thread-safe and synchronous."""

    def __init__(self, db: sqlite_utils.Database, path: Path):
        self._db = db
        self.path = path
        self._lock = threading.Lock()
        self._step_columns = _lower_columns(db)
        self._texts: set[int] = {t for (t,) in db.execute("SELECT token_id FROM token_texts")}

    @classmethod
    def open(cls, path: Path) -> "RunStore":
        """Open (creating if needed) the database at `path`; the schema is created idempotently.
        `path` may be the run folder or the .db file itself."""
        path = Path(path)
        if path.suffix != ".db":
            path = path / DB_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0)
        db = sqlite_utils.Database(conn)
        db.enable_wal()
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, fast commits
        with db.atomic():
            _create_schema(db)
        return cls(db, path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- run ---------------------------------------------------------------------------------

    def start_run(self, name: str, config: dict[str, Any], model: str) -> None:
        """Record the run. On resume (the row exists) the original start time is kept."""
        now = time.time()
        with self._lock, self._db.atomic():
            existing = list(self._db.query("SELECT started_at FROM runs WHERE id = 1"))
            started_at = existing[0]["started_at"] if existing else now
            self._db["runs"].upsert(
                {"id": 1, "name": name, "model": model, "config": json.dumps(config, default=str),
                 "started_at": started_at, "finished_at": None, "status": "running"},
                pk="id",
            )

    def set_status(self, status: str) -> None:
        with self._lock, self._db.atomic():
            self._db.execute("UPDATE runs SET status = ? WHERE id = 1", [status])

    def finish_run(self, status: str) -> None:
        with self._lock, self._db.atomic():
            self._db.execute("UPDATE runs SET status = ?, finished_at = ? WHERE id = 1", [status, time.time()])

    # -- steps -------------------------------------------------------------------------------

    def write_step(self, step: StepRecord, rollouts: list[RolloutRecord]) -> None:
        """Write a step's metrics and all its rollouts and tokens in ONE transaction: a reader
        sees the whole step or none of it, and a crash mid-write leaves no half step behind.
        A step number already present raises sqlite3.IntegrityError (use truncate_after to redo)."""
        for r in rollouts:
            r.check_lengths()
            if r.kind not in ROLLOUT_KINDS:
                raise ValueError(f"rollout kind {r.kind!r} is not one of {ROLLOUT_KINDS}")
        metric_values = {metric_column(k): _finite_or_none(v) for k, v in step.metrics.items()}
        if len({c.lower() for c in metric_values}) != len(step.metrics):  # SQLite names ignore case
            raise ValueError(f"step {step.step}: two metric keys map to one column: {sorted(step.metrics)}")
        step_row: dict[str, Any] = {
            "step": step.step,
            "policy_version": step.policy_version,
            "started_at": step.started_at,
            "finished_at": step.finished_at,
            "duration_s": step.finished_at - step.started_at,
            "metrics": json.dumps({k: _finite_or_none(v) for k, v in step.metrics.items()}),
            **metric_values,
        }
        with self._lock:
            try:
                with self._db.atomic():
                    for col in metric_values:
                        if col.lower() not in self._step_columns:
                            self._db["steps"].add_column(col, float)
                            self._step_columns.add(col.lower())
                    self._db.execute(
                        f"INSERT INTO steps ({', '.join(f'[{c}]' for c in step_row)}) "
                        f"VALUES ({', '.join('?' for _ in step_row)})",
                        list(step_row.values()),
                    )
                    for r in rollouts:
                        self._insert_rollout(r)
            except BaseException:
                # The rollback also undid any ALTER TABLE and token texts: forget what no longer exists.
                self._step_columns = _lower_columns(self._db)
                self._texts = {t for (t,) in self._db.execute("SELECT token_id FROM token_texts")}
                raise


    def _insert_rollout(self, r: RolloutRecord) -> None:
        cur = self._db.execute(
            """INSERT INTO rollouts (step, policy_version, env, agent, row_index, group_index, row_id,
                reward, advantage, num_turns, num_model_calls, num_tool_calls, truncated, mask_sample,
                failure, latency_s, num_tokens, num_model_tokens, result, kind, overlong_penalty)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [r.step, r.policy_version, r.env, r.agent, r.row_index, r.group_index, r.row_id,
             _finite_or_none(r.reward), _finite_or_none(r.advantage), r.num_turns, r.num_model_calls,
             r.num_tool_calls, int(r.truncated), int(r.mask_sample), r.failure, r.latency_s,
             len(r.token_ids), int(sum(r.loss_mask)),
             json.dumps(compact_result(r.result), default=str, ensure_ascii=False, separators=(",", ":")),
             r.kind, _finite_or_none(r.overlong_penalty)],
        )
        rid = cur.lastrowid
        rows, spans = split_tokens(r)
        self._db.conn.executemany("INSERT OR IGNORE INTO token_texts (token_id, text) VALUES (?, ?)",
                                  ((t, txt) for t, txt in zip(r.token_ids, r.token_text) if t not in self._texts))
        self._texts.update(r.token_ids)
        # executemany: tens of thousands of token rows per step, the hot path of the writer.
        self._db.conn.executemany(
            "INSERT INTO token_rows (rollout_id, position, token_id, is_model, turn, gen_lp, train_delta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", ((rid, *row) for row in rows))
        self._db.conn.executemany(
            "INSERT INTO token_spans (rollout_id, start, turn, has_train, token_ids) VALUES (?, ?, ?, ?, ?)",
            ((rid, start, turn, int(has_train), ids) for start, turn, has_train, ids in spans))

    def truncate_after(self, step: int) -> None:
        """Delete every step, rollout and token with a step number above `step` (resume from a
        checkpoint taken at `step`), in one transaction."""
        with self._lock, self._db.atomic():
            for table in ("token_rows", "token_spans"):
                self._db.execute(
                    f"DELETE FROM {table} WHERE rollout_id IN (SELECT id FROM rollouts WHERE step > ?)", [step])
            self._db.execute("DELETE FROM rollouts WHERE step > ?", [step])
            self._db.execute("DELETE FROM steps WHERE step > ?", [step])

    def last_step(self) -> int | None:
        with self._lock:
            return self._db.execute("SELECT max(step) FROM steps").fetchone()[0]


# -- readers ---------------------------------------------------------------------------------


def open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write: opened with `mode=ro` and `PRAGMA query_only`."""
    path = Path(path)
    if path.is_dir():
        path = path / DB_NAME
    if not path.exists():
        raise FileNotFoundError(path)
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0,
                           check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


# Authorizer action codes a read-only console may use. Everything else (INSERT, UPDATE, DELETE,
# CREATE, DROP, ALTER, ATTACH, transactions, most PRAGMAs) is denied before the statement runs.
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    sqlite3.SQLITE_RECURSIVE}
_ALLOWED_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info",
                    "index_xinfo", "foreign_key_list"}
_ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{n}"): n for n in (
    "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
    "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE",
    "DROP_TEMP_INDEX", "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER",
    "DROP_VIEW", "INSERT", "PRAGMA", "TRANSACTION", "UPDATE", "ATTACH", "DETACH", "ALTER_TABLE",
    "REINDEX", "ANALYZE", "CREATE_VTABLE", "DROP_VTABLE", "SAVEPOINT",
)}


def split_first_statement(sql: str) -> tuple[str, str]:
    """(first statement, rest), splitting at the first `;` outside strings, identifiers and comments."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`[":
            close = "]" if c == "[" else c
            j = i + 1
            while j < n:
                if sql[j] == close:
                    if close != "]" and j + 1 < n and sql[j + 1] == close:  # '' escapes '
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == ";":
            return sql[:i], sql[i + 1:]
        else:
            i += 1
    return sql, ""


def _only_comments(sql: str) -> bool:
    rest = sql
    while True:
        rest = rest.lstrip()
        if rest.startswith("--"):
            j = rest.find("\n")
            rest = "" if j < 0 else rest[j + 1:]
        elif rest.startswith("/*"):
            j = rest.find("*/")
            rest = "" if j < 0 else rest[j + 2:]
        elif rest.startswith(";"):
            rest = rest[1:]
        else:
            return rest == ""


def ro_query(path: Path, sql: str, params: Sequence[Any] | dict[str, Any] = (), timeout_s: float = 5.0,
             max_rows: int = 1000) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one read-only statement with a time limit; return (column names, at most max_rows rows).

    Raises QueryError for writes, multiple statements and SQL errors, QueryTimeout past timeout_s.
    """
    first, rest = split_first_statement(sql)
    if not _only_comments(rest):
        raise QueryError("refused: one statement at a time")
    if _only_comments(first):
        raise QueryError("empty query")
    denied: list[str] = []

    def authorizer(action: int, arg1: str | None, arg2: str | None, db_name: str | None, trigger: str | None) -> int:
        if action in _ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and arg1 and arg1.lower() in _ALLOWED_PRAGMAS:
            return sqlite3.SQLITE_OK
        what = _ACTION_NAMES.get(action, f"action {action}")
        if what not in denied:
            denied.append(what)
        return sqlite3.SQLITE_DENY

    deadline = time.monotonic() + timeout_s
    conn = open_readonly(path)
    try:
        conn.set_authorizer(authorizer)
        # Called every N virtual-machine instructions; a nonzero return interrupts the query.
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            cur = conn.execute(first, params)
            columns = [d[0] for d in cur.description] if cur.description else []
            rows = cur.fetchmany(max_rows) if columns else []
        except (sqlite3.Error, sqlite3.Warning) as e:
            msg = str(e)
            if denied:
                raise QueryError(f"refused: read-only access ({', '.join(denied)} not allowed)") from None
            if "interrupt" in msg.lower() and time.monotonic() > deadline:
                raise QueryTimeout(f"query interrupted after its {timeout_s:g} s limit") from None
            if "readonly" in msg.lower() or "read-only" in msg.lower():
                raise QueryError(f"refused: the database is read-only ({msg})") from None
            raise QueryError(msg) from None
        return columns, [tuple(r) for r in rows]
    finally:
        conn.close()
