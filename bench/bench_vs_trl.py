"""Our trainer against TRL's GRPOTrainer on the same task and batch, one after the other, one invocation.

    .venv/bin/python bench/bench_vs_trl.py [--steps 8]

Builds .venv-trl (requirements-trl.txt, CPU torch) on first use. Runs `trainer.py config.yaml` for N
steps (Gym, vLLM, the store: everything a real run does), then `bench/trl_addition.py` under TRL
for N steps: the embedded SmolLM2-135M, data/addition_train.jsonl, 8 prompts x 4 generations, at
most 128 new tokens, T = 1.0. For each it prints the median step time, generation and training
time (steps 2..N), the peak RSS of the whole process tree (sampled every 0.2 s: Gym servers
included for ours), and the mean accuracy (last \\boxed{} equals the answer) of the first and
last 5 steps; then ours / TRL. The goal is <= 0.5 in time and in memory.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tree_memory import run_measured  # noqa: E402
from store import metrics as M  # noqa: E402

TRL_VENV = ROOT / ".venv-trl"


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / ".stamp"
    want = (ROOT / "requirements-trl.txt").read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    print("[bench] building .venv-trl (once)", flush=True)
    subprocess.run(["python3", "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(TRL_VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU wheel first, as scripts/setup.sh does
    subprocess.run(pip + ["-r", str(ROOT / "requirements-trl.txt")], check=True)
    stamp.write_text(want)
    return python


def ours(steps: int, tmp: Path) -> dict[str, object]:
    # TRL's batch shape and optimizer schedule (bench/trl_addition.py: lr 2e-5, TrainingArguments'
    # linear decay, no warmup), whatever config.yaml's defaults are
    cmd = [sys.executable, str(ROOT / "trainer.py"), str(ROOT / "config.yaml"), "--set", f"grpo.steps={steps}",
           "--set", "grpo.rows_per_step=8", "--set", "grpo.group_size=4", "--set", "grpo.max_tokens=128",
           "--set", "grpo.temperature=1.0", "--set", "grpo.lr=2e-5", "--set", "grpo.lr_schedule=linear",
           "--set", "grpo.warmup_steps=0", "--set", f"run.dir={tmp}", "--set", "run.name=ours", "--set", "server.port=0",
           "--set", "gym.head_port=0", "--set", "run.export=false", "--set", "grpo.checkpoint_every=1000"]
    rss = run_measured(cmd)
    with sqlite3.connect(tmp / "ours" / "rollouts.db") as c:
        rows = c.execute(f"SELECT {M.TIME_STEP_S}, {M.TIME_GENERATION_S}, {M.TIME_TRAINING_S} FROM steps "
                         "ORDER BY step").fetchall()
        # the same accuracy as TRL's reward: the extracted \boxed{} equals the answer
        acc = [a for (a,) in c.execute(
            "SELECT avg(CASE WHEN json_extract(result, '$.extracted_answer') = json_extract(result, '$.expected_answer') "
            "THEN 1.0 ELSE 0.0 END) FROM rollouts WHERE kind = 'train' GROUP BY step ORDER BY step")]
    return {"step": [r[0] for r in rows], "gen": [r[1] for r in rows], "train": [r[2] for r in rows],
            "acc": acc, "rss": rss}


def trl(steps: int, tmp: Path) -> dict[str, object]:
    from engine.models import prepare_default_model

    python = ensure_trl_venv()
    out = tmp / "trl_steps.jsonl"
    rss = run_measured([str(python), str(ROOT / "bench" / "trl_addition.py"), "--model", str(prepare_default_model()),
                        "--steps", str(steps), "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"step": [r["time_step_s"] for r in rows], "gen": [r["time_generation_s"] for r in rows],
            "train": [r["time_step_s"] - r["time_generation_s"] for r in rows], "acc": [r["reward"] for r in rows],
            "rss": rss}


def summary(r: dict[str, object]) -> dict[str, float]:
    later = lambda k: statistics.median(r[k][1:] or r[k])  # noqa: E731  (step 1 warms up)
    acc = r["acc"]
    return {"s/step (median)": later("step"), "generation s": later("gen"), "training s": later("train"),
            "peak RSS GiB (tree)": r["rss"], "accuracy first 5": statistics.fmean(acc[:5]),
            "accuracy last 5": statistics.fmean(acc[-5:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    a = summary(ours(args.steps, tmp))
    b = summary(trl(args.steps, tmp))
    print(f"{args.steps} steps each, 8 prompts x 4 generations, <= 128 new tokens, SmolLM2-135M fp32 on CPU")
    print(f"{'':24s} {'ours':>9s} {'TRL':>9s} {'ours/TRL':>9s}")
    for k in a:
        ratio = f"{a[k] / b[k]:9.3f}" if b[k] else f"{'-':>9s}"
        print(f"{k:24s} {a[k]:9.3f} {b[k]:9.3f} {ratio}")


if __name__ == "__main__":
    main()
