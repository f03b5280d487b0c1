"""Step-time breakdown of the default config: generation, training, weight sync, logging.

    .venv/bin/python bench/bench_step_time.py [--steps 3] [--set key=value ...]
    .venv/bin/python bench/bench_step_time.py --db runs/smollm2-addition/rollouts.db   # an existing run

Runs `trainer.py config.yaml` for a few steps under a fresh run name (or reads a finished run)
and prints, per part, the mean seconds per step and its share of the step, plus generation
tokens/s, event-loop lag p99 and token_mult_prob_error, all read back from the run's SQLite store.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tree_memory import run_measured  # noqa: E402
from store import metrics as M  # noqa: E402

PARTS = M.STEP_TIME_PARTS


def report(db: Path) -> None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        cols = (f"count(*), avg({M.TIME_STEP_S}), " + ", ".join(f"avg({p})" for p in PARTS)
                + f", avg({M.TOKENS_PER_S}), max({M.LOOP_LAG_P99_MS}), max({M.TOKEN_MULT_PROB_ERROR})"
                + f", max({M.PEAK_MEMORY_GIB})")
        row = c.execute(f"SELECT {cols} FROM steps WHERE step > 1").fetchone()
        if not row[0]:  # a one-step run: keep its only (warm-up) step
            row = c.execute(f"SELECT {cols} FROM steps").fetchone()
    n, total, *parts, tps, lag, tmpe, peak = row
    print(f"steps measured       : {n} (first step excluded as warm-up when there are more)")
    print(f"step time            : {total:7.2f} s")
    for name, sec in zip(PARTS, parts):
        print(f"  {name[5:-2]:18s} : {sec:7.2f} s  {100 * sec / total:5.1f}%")
    print(f"generation tokens/s  : {tps:7.1f}")
    print(f"event-loop lag p99   : {lag:7.1f} ms (max over steps; goal < 100)")
    print(f"token_mult_prob_error: {tmpe:7.4f} (max over steps; goal < 1.05)")
    print(f"peak memory, trainer : {peak:7.2f} GiB (its process: engine and trainer)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--db", help="report on an existing run's rollouts.db instead of running")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    if args.db:
        report(Path(args.db))
        return
    report(run_steps(args.steps, args.config, args.set))


def run_steps(steps: int, config: str, sets: list[str]) -> Path:
    """`trainer.py config` for `steps` steps under a fresh run in a temporary folder: its store."""
    runs = Path(tempfile.mkdtemp(prefix="bench-runs-"))
    name = f"bench-{int(time.time())}"
    cmd = [sys.executable, str(ROOT / "trainer.py"), config, "--set", f"grpo.steps={steps}",
           "--set", f"run.dir={runs}", "--set", f"run.name={name}", "--set", "server.port=0",
           "--set", "gym.head_port=0", "--set", "run.export=false"]
    for s in sets:
        cmd += ["--set", s]
    peak = run_measured(cmd)
    print(f"peak memory, process tree: {peak:6.2f} GiB (the trainer with its engine, and Gym's servers)")
    return runs / name / "rollouts.db"


if __name__ == "__main__":
    main()
