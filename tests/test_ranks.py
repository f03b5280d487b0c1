"""N training ranks (torchrun, gloo on CPU) take exactly the step one process takes on the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.packing import packed_length
from engine.tp import remove_stale_cpu_shm
from grpo.ranks import share
from tests.conftest import ROOT, steps_written

SCRIPT = ROOT / "tests" / "ranks" / "train_step.py"


def test_ranks_share_a_batch_by_whole_groups_balanced_by_packed_tokens():
    rows = [[1] * 10 + [2], [1] * 10 + [3], [5] * 30 + [6], [5] * 30 + [7], [8] * 12, [9] * 12]
    shares = [share(rows, range(6), 2, r) for r in range(2)]
    assert shares == [[2, 3], [0, 1, 4, 5]]
    assert [sum(packed_length(rows, [i]) for i in s) for s in shares] == [62, 46]
    assert share(rows, [0, 1], 1, 0) == [0, 1]


def run_step(tmp: Path, model: str, ranks: int, minibatches: int = 1, resume: Path | None = None) -> dict:
    out = tmp / f"step-{ranks}-{minibatches}{'-resumed' if resume else ''}.json"
    env = {**os.environ, "MINIBATCHES": str(minibatches), "OMP_NUM_THREADS": "1", "RESUME_FROM": str(resume or "")}
    launcher = [sys.executable, str(SCRIPT)] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(SCRIPT)]
    p = subprocess.run(launcher + [model, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text())


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in b.items():
        assert a[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k  # fp32 over millions of elements


@pytest.mark.slow
@pytest.mark.parametrize("minibatches", [1, 2])
def test_two_sharded_gloo_ranks_take_the_one_process_steps(tiny_model, tmp_path, minibatches):
    one = run_step(tmp_path, tiny_model, 1, minibatches)
    two = run_step(tmp_path, tiny_model, 2, minibatches)
    assert (one["world"], two["world"], one["sharded"], two["sharded"]) == (1, 2, False, True)
    assert one["held"] == one["total"] == two["total"]
    assert two["held"] < 0.55 * two["total"]  # rank 0 holds its half of the weights (FSDP2)
    assert two["tokens"] == one["tokens"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)  # fp32, other summation order
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert two["entropy"] == pytest.approx(one["entropy"], rel=1e-5)
    assert all(two["train_logprobs"]) and len(two["train_logprobs"]) == 13  # the advantage-0 group's too
    for a, b in zip(two["train_logprobs"], one["train_logprobs"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert_same_weights(two["weights"], one["weights"])
    assert_same_weights(two["weights_2"], one["weights_2"])  # Adam's sharded moments carried step 1 over
    moved = [k for k, v in one["weights"].items() if v != pytest.approx(one["weights_before"][k], abs=1e-4)]
    assert len(moved) == len(one["weights"])  # the step moved every tensor: the comparison is not vacuous


@pytest.mark.slow
def test_a_checkpoint_of_one_process_resumes_on_two_sharded_ranks_and_back(tiny_model, tmp_path):
    one = run_step(tmp_path, tiny_model, 1)
    two = run_step(tmp_path, tiny_model, 2)
    grown = run_step(tmp_path, tiny_model, 2, resume=tmp_path / "step-1-1.ckpt")
    shrunk = run_step(tmp_path, tiny_model, 1, resume=tmp_path / "step-2-1.ckpt")
    assert_same_weights(grown["weights_2"], one["weights_2"])
    assert_same_weights(shrunk["weights_2"], two["weights_2"])


def torchrun_trainer(tiny_model: str, runs: Path, name: str, *extra: str) -> list[str]:
    from tests.conftest import trainer_cmd

    cmd = trainer_cmd(tiny_model, runs, name, *extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + cmd[1:]


def accelerate_trainer(tiny_model: str, runs: Path, name: str, *extra: str) -> list[str]:
    """`accelerate launch` as users type it on a GPU box (its --multi_gpu launcher is torchrun's; on
    this CPU machine the ranks join over gloo)."""
    from tests.conftest import trainer_cmd

    cmd = trainer_cmd(tiny_model, runs, name, *extra)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", "0"] + cmd[1:]


@pytest.mark.slow
def test_two_ranks_under_accelerate_launch_train_with_an_engine_and_endpoint_each_that_gym_uses_both(tiny_model, tmp_path):
    import sqlite3

    # a big learning rate: an engine that missed step 1's push would sample step 2 from other weights
    cmd = accelerate_trainer(tiny_model, tmp_path, "two", "--set", "grpo.steps=2", "--set", "grpo.rows_per_step=4",
                           "--set", "grpo.lr=1e-3")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    served = {int(r): int(n) for r, n in re_findall(r"rank (\d): served (\d+) generations", p.stdout)}
    assert served.keys() == {0, 1} and min(served.values()) > 0, p.stdout[-2000:]
    with sqlite3.connect(tmp_path / "two" / "rollouts.db") as db:
        rows = db.execute("SELECT step, token_mult_prob_error FROM steps ORDER BY step").fetchall()
    assert [s for s, _ in rows] == [1, 2]
    assert all(abs(e - 1.0) < 1e-3 for _, e in rows)  # both engines got step 1's weights
    assert (tmp_path / "two" / "model" / "model.safetensors").exists()


def re_findall(pattern: str, text: str) -> list[tuple[str, ...]]:
    import re

    return re.findall(pattern, text)


@pytest.mark.slow
def test_a_killed_rank_ends_the_whole_run_and_leaves_nothing_running(tiny_model, tmp_path):
    import signal
    import time

    import psutil

    from gym.proctree import group_pids, pids_mentioning

    cmd = torchrun_trainer(tiny_model, tmp_path, "kill", "--set", "grpo.steps=50", "--set", "grpo.rows_per_step=4")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    db = tmp_path / "kill" / "rollouts.db"
    spec = str(tmp_path / "kill" / "gym" / "spec.json")
    deadline = time.time() + 900
    while steps_written(db) < 1:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.5)
    [launcher] = pids_mentioning(spec)
    pgid = os.getpgid(launcher)
    workers = [c for c in psutil.Process(proc.pid).children() if "trainer.py" in " ".join(c.cmdline())]
    [follower] = [w for w in workers if w.environ().get("RANK") == "1"]
    follower.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=180) != 0
    deadline = time.time() + 30
    while (group_pids(pgid) or any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)) \
            and time.time() < deadline:
        time.sleep(0.2)
    assert group_pids(pgid) == []
    assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_a_two_rank_run_resumes_in_one_process_from_its_checkpoint(tiny_model, tmp_path):
    import sqlite3

    from tests.conftest import trainer_cmd

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = torchrun_trainer(tiny_model, tmp_path, "grow", "--set", "grpo.steps=2", "--set", "run.export=false")
    p = subprocess.run(first, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    again = trainer_cmd(tiny_model, tmp_path, "grow", "--set", "grpo.steps=3", "--resume")
    p = subprocess.run(again, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    with sqlite3.connect(tmp_path / "grow" / "rollouts.db") as db:
        rows = db.execute("SELECT step, token_mult_prob_error FROM steps ORDER BY step").fetchall()
    assert [s for s, _ in rows] == [1, 2, 3]
    assert abs(rows[-1][1] - 1.0) < 1e-3  # step 3 sampled from the 2-rank checkpoint's weights


TP_SCRIPT = ROOT / "tests" / "ranks" / "tp_generate.py"


def test_a_rank_removes_only_the_cpu_shared_memory_segment_it_is_about_to_create(tmp_path):
    # the names vLLM's CPU communicator gave the segments of two 2-rank groups (seen in /dev/shm)
    names = ["-tp:0-[0-1]-cpushm_0", "-tp:0-[0-1]-cpushm_1", "-tp:0-[2-3]-cpushm_1", "-tp:0-[2-3]-cpushm_10", "x"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert remove_stale_cpu_shm([2, 3], 3, str(tmp_path)) == ["-tp:0-[2-3]-cpushm_1"]
    assert remove_stale_cpu_shm([0, 1], 1, str(tmp_path)) == ["-tp:0-[0-1]-cpushm_1"]
    assert remove_stale_cpu_shm([0, 1], 1, str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["-tp:0-[0-1]-cpushm_0", "-tp:0-[2-3]-cpushm_10", "x"]


def run_tp(tmp: Path, model: str, ranks: int, **env: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, str(TP_SCRIPT)] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(TP_SCRIPT)]
    return subprocess.run(launcher + [model, str(tmp / f"tp-{ranks}.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_a_tensor_parallel_engine_over_two_ranks_generates_the_one_process_ids_before_and_after_a_push(
        tiny_model, tmp_path):
    # the tiny model has 4 query and 4 KV heads: vLLM splits them over 2 ranks
    for ranks in (1, 2):
        p = run_tp(tmp_path, tiny_model, ranks)
        assert p.returncode == 0, p.stderr[-4000:]
    one, two = (json.loads((tmp_path / f"tp-{r}.json").read_text()) for r in (1, 2))
    assert two["world"] == 2
    assert two["before"] == one["before"]
    assert two["after"] == one["after"]
    assert two["after"] != two["before"]  # the push reached both shards of the model
    assert two["lifecycle"] == ["sleep:2", "wake_up:weights", "reload_weights", "reset_prefix_cache", "wake_up:kv_cache"]


@pytest.mark.slow
def test_a_tensor_parallel_member_that_samples_other_tokens_stops_the_run_with_an_error(tiny_model, tmp_path):
    p = run_tp(tmp_path, tiny_model, 2, SEED_OF_RANK_1="7", TEMPERATURE="1")
    assert p.returncode != 0
    assert "tensor-parallel ranks [0, 1] sampled different tokens" in p.stderr


@pytest.mark.slow
def test_two_ranks_train_with_one_tensor_parallel_engine_served_by_rank_0(tiny_model, tmp_path):
    import sqlite3

    cmd = torchrun_trainer(tiny_model, tmp_path, "tp", "--set", "grpo.steps=2", "--set", "grpo.rows_per_step=4",
                           "--set", "grpo.lr=1e-3", "--set", "engine.tensor_parallel_size=2")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    served = {int(r): int(n) for r, n in re_findall(r"rank (\d): served (\d+) generations", p.stdout)}
    assert served[0] > 0 and served[1] == 0  # rank 1 holds half the model and no endpoint
    assert p.stdout.count("policy endpoint") == 1
    with sqlite3.connect(tmp_path / "tp" / "rollouts.db") as db:
        rows = db.execute("SELECT step, token_mult_prob_error FROM steps ORDER BY step").fetchall()
    assert [s for s, _ in rows] == [1, 2]
    assert all(abs(e - 1.0) < 1e-3 for _, e in rows)  # both shards got step 1's weights


def test_a_tensor_parallel_size_that_does_not_divide_the_ranks_is_refused(tiny_model, tmp_path):
    from tests.conftest import trainer_cmd

    p = subprocess.run(trainer_cmd(tiny_model, tmp_path, "bad", "--set", "engine.tensor_parallel_size=2"),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "engine.tensor_parallel_size 2 must divide the number of ranks (1)" in p.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything started
