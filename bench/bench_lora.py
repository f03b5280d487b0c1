"""LoRA against full fine-tuning on the same config, one after the other in one invocation.

    .venv/bin/python bench/bench_lora.py [--steps 4] [--r 16] [--set key=value ...]

For each: median step time, training time and weight-sync time (steps after the first), peak
memory (RSS on CPU, allocated on GPU: the `peak_memory_gib` step metric), token_mult_prob_error;
then LoRA / full ratios. The LoRA push saves the adapter and loads it into vLLM; the full push
reloads every weight.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_step_time import run_steps  # noqa: E402
from store import metrics as M  # noqa: E402

FIGURES = (M.TIME_STEP_S, M.TIME_TRAINING_S, M.TIME_WEIGHT_SYNC_S, M.PEAK_MEMORY_GIB, M.TOKEN_MULT_PROB_ERROR)


def figures(db: Path) -> dict[str, float]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        rows = c.execute(f"SELECT {', '.join(FIGURES)} FROM steps WHERE step > 1").fetchall()
    out = {k: statistics.median(r[i] for r in rows) for i, k in enumerate(FIGURES)}
    out[M.PEAK_MEMORY_GIB] = max(r[FIGURES.index(M.PEAK_MEMORY_GIB)] for r in rows)
    out[M.TOKEN_MULT_PROB_ERROR] = max(r[FIGURES.index(M.TOKEN_MULT_PROB_ERROR)] for r in rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    full = figures(run_steps(args.steps, args.config, args.set))
    lora = figures(run_steps(args.steps, args.config, args.set + [f"model.lora={{r: {args.r}, alpha: {2 * args.r}}}"]))
    print(f"{'(median over steps 2..N; memory and error: max)':48s} {'full':>9s} {'lora':>9s} {'lora/full':>9s}")
    for k in FIGURES:
        print(f"{k:48s} {full[k]:9.3f} {lora[k]:9.3f} {lora[k] / full[k]:9.3f}")


if __name__ == "__main__":
    main()
