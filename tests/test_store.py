"""The run store: schema, one-transaction steps, resume truncation, forensic SQL, read-only access."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from store import (
    QueryError,
    QueryTimeout,
    RolloutRecord,
    RunStore,
    StepRecord,
    forensic_queries,
    open_readonly,
    ro_query,
)


def rollout(step: int, env: str, reward: float, *, n_prompt: int = 3, n_gen: int = 2, truncated: bool = False,
            gap_at: int | None = None, gap: float = 0.0, row: int = 0, group: int = 0) -> RolloutRecord:
    """A rollout of n_prompt prompt tokens then n_gen model tokens; train logprobs equal the
    generation logprobs except at position `gap_at`, where they differ by `gap`."""
    n = n_prompt + n_gen
    gen = [0.0] * n_prompt + [-0.5] * n_gen
    train = list(gen)
    if gap_at is not None:
        train[gap_at] = gen[gap_at] - gap
    return RolloutRecord(
        step=step, policy_version=step, env=env, agent=f"{env}_simple_agent", row_index=row,
        group_index=group, row_id=f"{env}-{row}", reward=reward, advantage=reward - 0.5, num_turns=1,
        num_model_calls=1, num_tool_calls=0, truncated=truncated, mask_sample=False, failure=None,
        latency_s=0.25, result={"reward": reward, "response": {"output": []}},
        token_ids=list(range(100, 100 + n)), token_text=[f"t{i}" for i in range(n)],
        loss_mask=[0] * n_prompt + [1] * n_gen, turn_index=[0] * n, gen_logprobs=gen, train_logprobs=train,
    )


def step_record(step: int, **metrics: float) -> StepRecord:
    return StepRecord(step=step, policy_version=step, metrics=metrics or {"reward_mean": 0.0},
                      started_at=1000.0 + step, finished_at=1000.5 + step)


def query(store: RunStore, sql: str) -> list[tuple]:
    return ro_query(store.path, sql)[1]


@pytest.fixture
def store(tmp_path: Path):
    s = RunStore.open(tmp_path / "run")
    s.start_run("run", {"lr": 1e-5}, "smollm2")
    yield s
    s.close()


@pytest.fixture
def filled(store: RunStore) -> RunStore:
    """Three steps, two envs; every number below is what the forensic-query test expects."""
    store.write_step(step_record(0, reward_mean=0.25), [
        rollout(0, "math", 0.0, row=0, group=0), rollout(0, "math", 1.0, row=0, group=1),
        rollout(0, "mcqa", 0.0, row=1, group=0, truncated=True), rollout(0, "mcqa", 0.0, row=1, group=1),
    ])
    store.write_step(step_record(1, reward_mean=0.5), [
        rollout(1, "math", 1.0, row=0, group=0, n_gen=9), rollout(1, "math", 0.0, row=0, group=1),
        rollout(1, "mcqa", 1.0, row=1, group=0, gap_at=4, gap=2.0), rollout(1, "mcqa", 0.0, row=1, group=1),
    ])
    store.write_step(step_record(2, reward_mean=0.75), [
        rollout(2, "math", 1.0, row=0, group=0), rollout(2, "math", 0.5, row=0, group=1, truncated=True),
        rollout(2, "mcqa", 1.0, row=1, group=0, gap_at=3, gap=0.25), rollout(2, "mcqa", 0.5, row=1, group=1),
    ])
    return store


def test_open_creates_schema_in_wal_mode(store: RunStore):
    conn = open_readonly(store.path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "steps", "rollouts", "token_rows", "token_texts"} <= tables
    assert conn.execute("SELECT type FROM sqlite_master WHERE name = 'tokens'").fetchone() == ("view",)
    tok_cols = [r[1] for r in conn.execute("PRAGMA table_info(tokens)")]
    assert tok_cols == ["rollout_id", "position", "token_id", "token_text", "is_model", "turn",
                        "gen_logprob", "train_logprob"]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_open_twice_keeps_data(store: RunStore):
    store.write_step(step_record(0), [rollout(0, "math", 1.0)])
    again = RunStore.open(store.path)
    assert again.last_step() == 0
    again.close()


def test_run_row_records_config_model_and_status(store: RunStore):
    assert query(store, "SELECT name, model, json_extract(config, '$.lr'), status, finished_at FROM runs") == [
        ("run", "smollm2", 1e-5, "running", None)]
    store.set_status("paused")
    assert query(store, "SELECT status FROM runs") == [("paused",)]
    store.finish_run("finished")
    status, finished_at = query(store, "SELECT status, finished_at FROM runs")[0]
    assert status == "finished" and finished_at > 0


def test_metrics_are_plain_sql_columns(store: RunStore):
    store.write_step(step_record(0, reward_mean=0.25, loss=1.5, **{"reward/math_mean": 0.125}), [])
    store.write_step(step_record(1, reward_mean=0.5, kl=float("nan")), [])
    assert query(store, "SELECT step, reward_mean, loss, reward_math_mean, kl FROM steps ORDER BY step") == [
        (0, 0.25, 1.5, 0.125, None), (1, 0.5, None, None, None)]
    raw = "SELECT json_extract(metrics, '$.\"reward/math_mean\"') FROM steps WHERE step = 0"
    assert query(store, raw) == [(0.125,)]  # the original keys stay in the metrics JSON


def test_metric_names_that_are_sql_keywords_or_differ_in_case(store: RunStore):
    store.write_step(step_record(0, reward_mean=1.0, group=2.0), [])
    assert query(store, 'SELECT "group" FROM steps') == [(2.0,)]
    with pytest.raises(ValueError, match="one column"):
        store.write_step(step_record(1, loss=1.0, Loss=2.0), [])


def test_rollout_and_tokens_are_stored(store: RunStore):
    store.write_step(step_record(0), [rollout(0, "math", 1.0, gap_at=4, gap=0.5)])
    assert query(store, "SELECT env, reward, num_tokens, num_model_tokens, truncated, json_extract(result, '$.reward') "
                        "FROM rollouts") == [("math", 1.0, 5, 2, 0, 1.0)]
    assert query(store, "SELECT position, token_id, token_text, is_model, turn, gen_logprob, train_logprob "
                        "FROM tokens ORDER BY position") == [
        (0, 100, "t0", 0, 0, 0.0, 0.0), (1, 101, "t1", 0, 0, 0.0, 0.0), (2, 102, "t2", 0, 0, 0.0, 0.0),
        (3, 103, "t3", 1, 0, -0.5, -0.5), (4, 104, "t4", 1, 0, -0.5, -1.0)]


def test_missing_train_logprobs_are_null(store: RunStore):
    r = rollout(0, "math", 1.0)
    r.train_logprobs = []
    store.write_step(step_record(0), [r])
    assert query(store, "SELECT count(*) FROM tokens WHERE train_logprob IS NULL") == [(5,)]


def test_write_step_is_one_transaction(store: RunStore):
    bad = rollout(0, "mcqa", 0.0)
    bad.token_ids[3] = None  # a model token: violates NOT NULL only after the step and the first rollout went in
    with pytest.raises(sqlite3.IntegrityError):
        store.write_step(step_record(0, reward_mean=0.5, new_metric=1.0), [rollout(0, "math", 1.0), bad])
    assert query(store, "SELECT (SELECT count(*) FROM steps), (SELECT count(*) FROM rollouts), "
                        "(SELECT count(*) FROM tokens)") == [(0, 0, 0)]
    # the rolled-back ALTER TABLE must not leave the store believing the column exists
    store.write_step(step_record(0, reward_mean=0.5, new_metric=1.0), [rollout(0, "math", 1.0)])
    assert query(store, "SELECT new_metric FROM steps") == [(1.0,)]


def test_reader_never_sees_half_a_step(store: RunStore):
    big = [rollout(0, "math", 1.0, n_gen=2000, row=i) for i in range(20)]
    full = (1, 20 * 2003)
    seen: set[tuple[int, int]] = set()
    deadline = time.monotonic() + 30

    def read() -> None:  # polls until it sees the whole step
        while full not in seen and time.monotonic() < deadline:
            seen.add(query(store, "SELECT (SELECT count(*) FROM steps), (SELECT count(*) FROM tokens)")[0])

    reader = threading.Thread(target=read)
    reader.start()
    store.write_step(step_record(0), big)
    reader.join()
    assert seen <= {(0, 0), full}
    assert full in seen


def test_duplicate_step_is_refused(store: RunStore):
    store.write_step(step_record(0), [])
    with pytest.raises(sqlite3.IntegrityError):
        store.write_step(step_record(0), [])


def test_token_lists_must_align(store: RunStore):
    r = rollout(0, "math", 1.0)
    r.gen_logprobs.pop()
    with pytest.raises(ValueError, match="gen_logprobs"):
        store.write_step(step_record(0), [r])


def test_write_step_from_many_threads(store: RunStore):
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: store.write_step(step_record(s), [rollout(s, "math", 1.0)]), range(12)))
    assert query(store, "SELECT count(*), sum(step) FROM steps") == [(12, 66)]
    assert query(store, "SELECT count(*) FROM tokens") == [(12 * 5,)]


def test_last_step(store: RunStore):
    assert store.last_step() is None
    store.write_step(step_record(3), [])
    assert store.last_step() == 3


def test_truncate_after_removes_later_steps(filled: RunStore):
    filled.truncate_after(0)
    assert filled.last_step() == 0
    assert query(filled, "SELECT DISTINCT step FROM rollouts") == [(0,)]
    assert query(filled, "SELECT count(*) FROM tokens") == [(4 * 5,)]
    filled.write_step(step_record(1), [rollout(1, "math", 1.0)])  # the resumed run goes on
    assert filled.last_step() == 1


def test_documented_forensic_queries(filled: RunStore):
    q = forensic_queries()
    assert list(q) == ["lowest_reward_last_step", "logprob_disagreement", "reward_by_env", "truncation_rate",
                       "longest_rollouts"]

    cols, rows = ro_query(filled.path, q["lowest_reward_last_step"][1])
    assert cols[:5] == ["id", "env", "row_id", "group_index", "reward"]
    assert [(r[1], r[4]) for r in rows] == [("math", 0.5), ("mcqa", 0.5), ("math", 1.0), ("mcqa", 1.0)]

    cols, rows = ro_query(filled.path, q["logprob_disagreement"][1])
    top = dict(zip(cols, rows[0]))
    assert (top["step"], top["env"], top["position"], top["token_id"], top["gap"]) == (1, "mcqa", 4, 104, 2.0)
    assert rows[1][cols.index("gap")] == 0.25
    assert len(rows) == 20

    _, rows = ro_query(filled.path, q["reward_by_env"][1])
    assert rows == [(0, "math", 2, 0.5), (0, "mcqa", 2, 0.0), (1, "math", 2, 0.5), (1, "mcqa", 2, 0.5),
                    (2, "math", 2, 0.75), (2, "mcqa", 2, 0.75)]

    _, rows = ro_query(filled.path, q["truncation_rate"][1])
    assert rows == [(0, 4, 0.25), (1, 4, 0.0), (2, 4, 0.25)]

    cols, rows = ro_query(filled.path, q["longest_rollouts"][1])
    assert dict(zip(cols, rows[0]))["num_tokens"] == 12 and rows[0][1] == 1
    assert [r[3] for r in rows] == [12] + [5] * 9


def test_one_rollouts_tokens_are_read_by_key_not_by_scanning(filled: RunStore):
    conn = open_readonly(filled.path)
    plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN SELECT * FROM tokens WHERE rollout_id = 7 ORDER BY position")]
    conn.close()
    assert [p for p in plan if p.startswith("SEARCH t ") or p.startswith("SEARCH s ")] == [
        "SEARCH t USING PRIMARY KEY (rollout_id=?)", "SEARCH s USING PRIMARY KEY (rollout_id=?)"], plan


def test_readonly_connection_refuses_writes(filled: RunStore):
    conn = open_readonly(filled.path)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM rollouts")
    conn.close()
    assert query(filled, "SELECT count(*) FROM rollouts") == [(12,)]


@pytest.mark.parametrize("sql", [
    "DELETE FROM rollouts",
    "UPDATE rollouts SET reward = 1",
    "INSERT INTO steps (step) VALUES (99)",
    "DROP TABLE tokens",
    "CREATE TABLE x (a)",
    "PRAGMA query_only = 0",
    "ATTACH DATABASE ':memory:' AS other",
])
def test_ro_query_refuses_writes(filled: RunStore, sql: str):
    with pytest.raises(QueryError, match="refused"):
        ro_query(filled.path, sql)
    assert query(filled, "SELECT count(*) FROM rollouts") == [(12,)]


@pytest.mark.parametrize("sql", ["SELECT 1; DELETE FROM rollouts", "SELECT 1; SELECT 2", "SELECT ';'; SELECT 2"])
def test_ro_query_refuses_multiple_statements(filled: RunStore, sql: str):
    with pytest.raises(QueryError, match="one statement"):
        ro_query(filled.path, sql)


def test_ro_query_accepts_semicolons_in_strings_and_a_trailing_one(filled: RunStore):
    assert ro_query(filled.path, "SELECT ';' AS s, 'it''s' AS t; -- done\n") == (["s", "t"], [(";", "it's")])


def test_ro_query_params_and_max_rows(filled: RunStore):
    cols, rows = ro_query(filled.path, "SELECT id FROM rollouts WHERE env = ? ORDER BY id", ["math"], max_rows=2)
    assert cols == ["id"] and rows == [(1,), (2,)]


def test_ro_query_time_limit(filled: RunStore):
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout):
        ro_query(filled.path, endless, timeout_s=0.3)
    assert time.monotonic() - t0 < 2.0


def test_ro_query_reports_sql_errors(filled: RunStore):
    with pytest.raises(QueryError, match="no such table: nope"):
        ro_query(filled.path, "SELECT * FROM nope")


def test_reading_after_the_writer_closed(filled: RunStore):
    filled.close()
    assert ro_query(filled.path, "SELECT count(*) FROM steps") == (["count(*)"], [(3,)])


def test_eval_rollouts_are_stored_with_their_kind(store: RunStore):
    ev = rollout(1, "sm", 1.0)
    ev.kind = "eval"
    store.write_step(step_record(1), [rollout(1, "sm", 0.0), ev])
    assert query(store, "SELECT kind, reward FROM rollouts ORDER BY id") == [("train", 0.0), ("eval", 1.0)]


def test_an_unknown_rollout_kind_is_refused(store: RunStore):
    bad = rollout(1, "sm", 1.0)
    bad.kind = "test"
    with pytest.raises(ValueError, match="kind 'test'"):
        store.write_step(step_record(1), [bad])


def test_a_store_written_before_rollout_kinds_gets_the_column_with_train(tmp_path: Path):
    with RunStore.open(tmp_path) as s:
        s.write_step(step_record(1), [rollout(1, "sm", 1.0)])
    with sqlite3.connect(tmp_path / "rollouts.db") as c:
        c.execute("ALTER TABLE rollouts DROP COLUMN kind")
    with RunStore.open(tmp_path) as s:
        assert query(s, "SELECT kind FROM rollouts") == [("train",)]


def test_the_overlong_penalty_is_stored_beside_the_environments_reward(store: RunStore):
    r = rollout(1, "sm", 1.0)
    r.overlong_penalty = -0.25
    store.write_step(step_record(1), [r])
    assert query(store, "SELECT reward, overlong_penalty FROM rollouts") == [(1.0, -0.25)]


def test_model_tokens_are_rows_and_the_rest_spans_read_back_in_order_through_the_view(store: RunStore):
    r = rollout(0, "math", 1.0, n_prompt=4, n_gen=2)  # call 0: 4 prompt tokens, 2 sampled
    r.token_ids += [200, 201, 202, 203]  # a tool result (call 1's prompt), then one sampled token
    r.token_text += ["u0", "u1", "u2", "u3"]
    r.loss_mask += [0, 0, 0, 1]
    r.turn_index += [1, 1, 1, 1]
    r.gen_logprobs += [0.0, 0.0, 0.0, -0.25]
    r.train_logprobs += [0.0, 0.0, 0.0, -0.125]
    store.write_step(step_record(0), [r])
    assert query(store, "SELECT start, turn, has_train, token_ids FROM token_spans ORDER BY start") == [
        (0, 0, 1, "[100,101,102,103]"), (6, 1, 1, "[200,201,202]")]
    assert query(store, "SELECT position FROM token_rows ORDER BY position") == [(4,), (5,), (9,)]
    assert query(store, "SELECT * FROM tokens ORDER BY position") == [
        (1, i, t, x, m, u, g, tr) for i, (t, x, m, u, g, tr) in enumerate(
            zip(r.token_ids, r.token_text, r.loss_mask, r.turn_index, r.gen_logprobs, r.train_logprobs))]


def test_a_prompt_token_with_a_logprob_is_kept_as_a_row(store: RunStore):
    r = rollout(0, "math", 1.0)
    r.gen_logprobs[1] = -3.0  # not what Gym sends for prompt tokens, but it must survive
    store.write_step(step_record(0), [r])
    assert query(store, "SELECT position, gen_logprob FROM tokens WHERE NOT is_model ORDER BY position") == [
        (0, 0.0), (1, -3.0), (2, 0.0)]


def test_logprobs_are_kept_to_1e_5_nats(store: RunStore):
    r = rollout(0, "math", 1.0)
    r.gen_logprobs[3:] = [-1.23456789, -0.000004]
    r.train_logprobs[3:] = [-1.2345, float("nan")]
    store.write_step(step_record(0), [r])
    assert query(store, "SELECT gen_logprob, train_logprob FROM tokens WHERE is_model ORDER BY position") == [
        (-1.23457, -1.2345), (0.0, None)]


def test_the_stored_gym_result_keeps_counts_instead_of_token_arrays_and_drops_nulls(store: RunStore):
    r = rollout(0, "math", 1.0)
    r.result = {"reward": 1.0, "failure_kind": None, "response": {"output": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}],
         "prompt_token_ids": [1, 2, 3], "generation_token_ids": [4, 5], "generation_log_probs": [-0.1, -0.2]}]}}
    store.write_step(step_record(0), [r])
    [(stored,)] = query(store, "SELECT result FROM rollouts")
    assert json.loads(stored) == {"reward": 1.0, "response": {"output": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}],
         "num_prompt_token_ids": 3, "num_generation_token_ids": 2}]}}


OLD_TOKENS_TABLE = """CREATE TABLE tokens (rollout_id INTEGER NOT NULL, position INTEGER NOT NULL,
    token_id INTEGER NOT NULL, token_text TEXT, is_model INTEGER NOT NULL, turn INTEGER, gen_logprob REAL,
    train_logprob REAL, PRIMARY KEY (rollout_id, position)) WITHOUT ROWID"""


def test_a_store_with_the_old_tokens_table_is_migrated_on_open(tmp_path: Path):
    path = tmp_path / "rollouts.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE rollouts (id INTEGER PRIMARY KEY, step INTEGER, env TEXT)")
        c.execute("INSERT INTO rollouts VALUES (1, 0, 'math')")
        c.execute(OLD_TOKENS_TABLE)
        c.executemany("INSERT INTO tokens VALUES (1, ?, ?, ?, ?, 0, ?, ?)",
                      [(0, 100, "a", 0, 0.0, 0.0), (1, 101, "b", 1, -0.5, -0.25), (2, 102, "c", 1, -1.5, None)])
    RunStore.open(path).close()
    assert ro_query(path, "SELECT * FROM tokens ORDER BY position")[1] == [
        (1, 0, 100, "a", 0, 0, 0.0, 0.0), (1, 1, 101, "b", 1, 0, -0.5, -0.25), (1, 2, 102, "c", 1, 0, -1.5, None)]
