"""`python trainer.py config.yaml` end to end on the tiny model: the store holds every step and
rollout exactly once, a SIGKILLed run resumes, a SIGHUP ends a run with its status written, and a bad
config exits 2 before anything starts."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, steps_written, trainer_cmd

pytestmark = pytest.mark.slow


def q(db, sql):
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return c.execute(sql).fetchall()


def test_short_run_writes_every_step_and_rollout(short_run):
    assert q(short_run.db, "SELECT step FROM steps ORDER BY step") == [(1,), (2,), (3,)]
    assert q(short_run.db, "SELECT count(*), count(DISTINCT step || ':' || row_index || ':' || group_index) "
                           "FROM rollouts WHERE kind = 'train'") == [(12, 12)]
    assert q(short_run.db, "SELECT status FROM runs") == [("finished",)]


def test_model_tokens_carry_both_logprobs_and_prompt_tokens_none(short_run):
    [(model_tokens, with_both, prompt_with_lp)] = q(short_run.db, """
        SELECT sum(is_model), sum(is_model AND gen_logprob IS NOT NULL AND train_logprob IS NOT NULL),
               sum(NOT is_model AND gen_logprob != 0)
        FROM tokens JOIN rollouts ON rollouts.id = tokens.rollout_id WHERE kind = 'train'""")
    assert model_tokens > 0
    assert with_both == model_tokens
    assert not prompt_with_lp


def test_train_and_generation_logprobs_agree(short_run):
    errors = [r[0] for r in q(short_run.db, "SELECT token_mult_prob_error FROM steps")]
    assert all(1.0 <= e < 1.05 for e in errors), errors


def test_step_metrics_include_the_time_split_and_loop_lag(short_run):
    cols = {r[1] for r in q(short_run.db, "PRAGMA table_info(steps)")}
    for key in ("reward_mean", "loss", "kl", "entropy", "clip_frac", "grad_norm", "token_mult_prob_error",
                "gen_kl_error", "truncation_rate", "tokens_per_s", "time_generation_s", "time_training_s",
                "time_weight_sync_s", "time_logging_s", "loop_lag_p99_ms", "reward_addition_mean", "minibatches",
                "injected_messages", "skipped_optimizer_steps"):
        assert key in cols, key


def test_every_row_was_sent_at_the_training_temperature(short_run):
    # the shipped rows name no temperature; the loop sets grpo.temperature (1.0) and top_p 1 on each
    params = [json.loads(r[0])["responses_create_params"]
              for r in q(short_run.db, "SELECT result FROM rollouts WHERE kind = 'train'")]
    assert params and all((p["temperature"], p["top_p"]) == (1.0, 1.0) for p in params)


def test_eval_rows_run_greedy_after_every_second_step_and_are_never_trained(short_run):
    rows = q(short_run.db, "SELECT step, env, advantage, result FROM rollouts WHERE kind = 'eval' ORDER BY id")
    assert [(step, env, adv) for step, env, adv, _ in rows] == [(2, "addition", 0.0), (2, "addition", 0.0)]
    assert all(json.loads(r[3])["responses_create_params"]["temperature"] == 0.0 for r in rows)
    [(eval_mean, per_env)] = q(short_run.db, "SELECT eval_reward_mean, eval_reward_addition_mean FROM steps WHERE step = 2")
    assert eval_mean == per_env == sum(json.loads(r[3])["reward"] for r in rows) / 2
    assert q(short_run.db, "SELECT count(*) FROM tokens JOIN rollouts ON rollouts.id = tokens.rollout_id "
                           "WHERE kind = 'eval' AND train_logprob IS NOT NULL") == [(0,)]


def test_gym_result_is_stored_whole(short_run):
    [(result,)] = q(short_run.db, "SELECT result FROM rollouts LIMIT 1")
    result = json.loads(result)
    assert "reward" in result and "response" in result


def test_config_errors_exit_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "config.yaml").read_text().replace("group_size: 4", "group_size: 4\n  groupsize: 4"))
    cases = [
        ([str(bad)], "grpo.groupsize"),
        ([str(ROOT / "config.yaml"), "--set", "grpo.lr=fast"], "grpo.lr"),
        ([str(ROOT / "config.yaml"), "--set", "gym.envs.0.train_data=/nope.jsonl"], "train_data"),
        ([str(ROOT / "config.yaml"), "--set", "grpo.max_tokens=5000"], "max_tokens"),
        ([str(tmp_path / "missing.yaml")], "does not exist"),
        ([str(ROOT / "config.yaml"), "--set", "model.lora.rank=8"], "model.lora.rank"),
        ([str(ROOT / "config.yaml"), "--set", "engine.cpu_kv_cache_gib=0"], "engine.cpu_kv_cache_gib"),
        ([str(ROOT / "config.yaml"), "--set", "run.cpu_heap_mmap_mib=-1"], "run.cpu_heap_mmap_mib"),
        ([str(ROOT / "config.yaml"), "--set", "run.cpu_heap_mmap_mib=1"], "run.cpu_heap_mmap_mib"),  # with jemalloc
        ([str(ROOT / "config.yaml"), "--set", "run.cpu_allocator=mimalloc"], "cpu_allocator"),
        ([str(ROOT / "config.yaml"), "--set", f"run.dir={tmp_path}", "--export", str(tmp_path / "m")],
         "has no checkpoint to export"),
    ]
    for args, key in cases:
        p = subprocess.run([sys.executable, str(ROOT / "trainer.py"), *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        assert key in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def run_until_step(cmd: list[str], db: Path, steps: int) -> subprocess.Popen:
    """Start trainer.py and return once its store holds `steps` steps (the run still going)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while steps_written(db) < steps:
        assert proc.poll() is None, "the run ended before the signal"
        assert time.time() < deadline, f"no step {steps} after 900 s"
        time.sleep(0.5)
    return proc


def test_sigkilled_run_resumes_with_a_consistent_store(tiny_model, tmp_path):
    cmd = trainer_cmd(tiny_model, tmp_path, "killed", "--set", "grpo.steps=4")
    db = tmp_path / "killed" / "rollouts.db"
    proc = run_until_step(cmd, db, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = q(db, "SELECT count(*) FROM steps")[0][0]
    assert done < 4

    p = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    assert q(db, "SELECT step FROM steps ORDER BY step") == [(1,), (2,), (3,), (4,)]
    assert q(db, "SELECT step, count(*) FROM rollouts GROUP BY step") == [(s, 4) for s in (1, 2, 3, 4)]
    [(n_tokens_rollouts,)] = q(db, "SELECT count(DISTINCT rollout_id) FROM tokens")
    assert n_tokens_rollouts == 16


def test_rerun_without_resume_refuses_to_overwrite(short_run, tiny_model):
    p = subprocess.run(trainer_cmd(tiny_model, short_run.runs_dir, short_run.name), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2
    assert "--resume" in p.stderr


def test_sighup_ends_the_run_with_its_status_written_and_no_gym_process_left(tiny_model, tmp_path):
    from gym.proctree import group_pids, pids_mentioning

    cmd = trainer_cmd(tiny_model, tmp_path, "hup", "--set", "grpo.steps=50")
    db = tmp_path / "hup" / "rollouts.db"
    spec = str(tmp_path / "hup" / "gym" / "spec.json")
    proc = run_until_step(cmd, db, 1)
    [launcher] = pids_mentioning(spec)
    pgid = os.getpgid(launcher)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) != 0
    assert q(db, "SELECT status FROM runs") == [("interrupted",)]
    deadline = time.time() + 30
    while group_pids(pgid) and time.time() < deadline:
        time.sleep(0.2)
    assert group_pids(pgid) == []


def test_the_multienv_config_trains_on_both_envs_with_two_call_chain_rollouts(tiny_model, tmp_path):
    cmd = trainer_cmd(tiny_model, tmp_path, "multi", "--set", "grpo.steps=1", "--set", "grpo.rows_per_step=6",
                      "--set", "run.export=false")
    cmd[2] = str(ROOT / "config-multienv.yaml")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = q(tmp_path / "multi" / "rollouts.db",
             "SELECT env, min(num_model_calls), max(num_model_calls) FROM rollouts GROUP BY env ORDER BY env")
    assert rows == [("addition", 1, 1), ("chain", 2, 2)]
    from store import metrics as M
    from store.db import metric_column

    cols = {c for (c,) in q(tmp_path / "multi" / "rollouts.db", "SELECT name FROM pragma_table_info('steps')")}
    assert {metric_column(M.env_reward("addition")), metric_column(M.env_reward("chain"))} <= cols
