"""Bytes per token of the run store, for a single-turn and a 5-call multi-turn rollout shape.

    .venv/bin/python bench/bench_store.py [--steps 10]

Writes the same steps (8 rows x 4 rollouts) through `RunStore` and, as the baseline measured in the
same run, through the layout it replaced (one REAL-logprob row per token with its text, an index on
the logprob gap, the Gym result stored whole), then prints each file's bytes per token and the ratio.
The Gym results have the shape NeMo Gym 0.7 returns (its null fields included; every model call's
item carries its prompt ids, generated ids and logprobs), so in the multi-turn shape the arrays grow
with the square of the number of calls. Goal: <= 24 bytes per token for every shape, the same
figure for 5 and 10 calls (linear in tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from store import RolloutRecord, RunStore, StepRecord  # noqa: E402

ROWS, GROUP = 8, 4
REQUEST_NULLS = ("background", "include", "instructions", "max_output_tokens", "max_tool_calls", "metadata",
                 "model", "previous_response_id", "prompt", "reasoning", "service_tier", "store",
                 "context_management", "conversation", "moderation", "prompt_cache_key", "prompt_cache_retention",
                 "safety_identifier", "stream_options", "text", "top_logprobs", "truncation", "user", "stream")
RESPONSE_NULLS = ("error", "incomplete_details", "instructions", "metadata", "background", "completed_at",
                  "conversation", "max_output_tokens", "max_tool_calls", "moderation", "previous_response_id",
                  "prompt", "prompt_cache_key", "prompt_cache_retention", "reasoning", "safety_identifier",
                  "service_tier", "text", "top_logprobs", "truncation", "user")


def ids(rng: random.Random, n: int) -> list[int]:
    """Token ids as text uses them: a few thousand distinct ids, the frequent ones far more often."""
    return [min(int(rng.paretovariate(0.6)) * 7, 49151) for _ in range(n)]


def words(rng: random.Random, n_tokens: int) -> str:
    return " ".join(rng.choice(("the", "answer", "is", "12", "+", "=", "tool", "result", "so")) for _ in range(n_tokens))


def rollout(rng: random.Random, step: int, row: int, group: int, prompt: list[int], calls: int) -> RolloutRecord:
    """`calls` model calls of 20-40 tokens each after a shared prompt; between calls a tool result
    of 30 tokens joins the history. The Gym result carries each call's arrays as Gym returns them."""
    seq, mask, turn, gen = list(prompt), [0] * len(prompt), [0] * len(prompt), [0.0] * len(prompt)
    output = []
    for c in range(calls):
        if c:
            tool = ids(rng, 30)
            seq += tool
            mask += [0] * 30
            turn += [c] * 30
            gen += [0.0] * 30
            output.append({"type": "function_call_output", "call_id": f"call_{c}", "output": words(rng, 30)})
        prompt_ids = list(seq)
        n = rng.randint(20, 40)
        new = ids(rng, n)
        lps = [-rng.expovariate(2.0) for _ in range(n)]
        seq += new
        mask += [1] * n
        turn += [c] * n
        gen += lps
        output.append({"id": f"msg_{rng.getrandbits(128):032x}", "type": "message", "role": "assistant",
                       "status": "completed", "phase": None, "routed_experts": None,
                       "content": [{"type": "output_text", "text": words(rng, n), "annotations": [], "logprobs": None}],
                       "prompt_token_ids": prompt_ids, "generation_token_ids": new, "generation_log_probs": lps})
    train = [g + rng.gauss(0, 1e-6) if m else 0.0 for g, m in zip(gen, mask)]  # CPU-like agreement
    request = {"input": [{"role": "user", "content": words(rng, 40), "type": "message", "phase": None}],
               "temperature": 1.0, "top_p": 1.0, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
               **dict.fromkeys(REQUEST_NULLS)}
    response = {"id": f"resp_{rng.getrandbits(128):032x}", "created_at": time.time(), "model": "policy",
                "object": "response", "output": output, "status": "completed", "temperature": 1.0, "top_p": 1.0,
                "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
                "usage": {"input_tokens": len(prompt), "output_tokens": sum(mask), "total_tokens": len(seq),
                          "input_tokens_details": {"cached_tokens": None},
                          "output_tokens_details": {"reasoning_tokens": None}},
                **dict.fromkeys(RESPONSE_NULLS)}
    result = {"responses_create_params": request, "response": response, "reward": 1.0, "mask_sample": False,
              "failure_kind": None, "failure_reason": None, "expected_answer": "12", "extracted_answer": "12"}
    return RolloutRecord(
        step=step, policy_version=step, env="env", agent="agent", row_index=row, group_index=group,
        row_id=f"row-{row}", reward=1.0, advantage=0.5, num_turns=calls, num_model_calls=calls,
        num_tool_calls=calls - 1, truncated=False, mask_sample=False, failure=None, latency_s=1.0, result=result,
        token_ids=seq, token_text=[f"tok{t}" for t in seq], loss_mask=mask, turn_index=turn,
        gen_logprobs=gen, train_logprobs=train)


def steps(seed: int, n_steps: int, calls: int, prompt_len: int) -> list[tuple[StepRecord, list[RolloutRecord]]]:
    rng = random.Random(seed)
    out = []
    for s in range(1, n_steps + 1):
        records = []
        for row in range(ROWS):
            prompt = ids(rng, prompt_len)
            records += [rollout(rng, s, row, g, prompt, calls) for g in range(GROUP)]
        out.append((StepRecord(s, s, {"reward_mean": 1.0}, time.time(), time.time()), records))
    return out


def write_new(path: Path, data: list) -> None:
    with RunStore.open(path) as store:
        for step, records in data:
            store.write_step(step, records)


def write_baseline(path: Path, data: list) -> None:
    """The layout before token_rows: REAL logprobs and the text on every token row, a gap index,
    the Gym result as returned."""
    c = sqlite3.connect(path)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE rollouts (id INTEGER PRIMARY KEY, step INTEGER, env TEXT, reward REAL, result TEXT)")
    c.execute("""CREATE TABLE tokens (rollout_id INTEGER NOT NULL, position INTEGER NOT NULL,
        token_id INTEGER NOT NULL, token_text TEXT, is_model INTEGER NOT NULL, turn INTEGER,
        gen_logprob REAL, train_logprob REAL, PRIMARY KEY (rollout_id, position)) WITHOUT ROWID""")
    c.execute("CREATE INDEX tokens_logprob_gap ON tokens(abs(train_logprob - gen_logprob)) WHERE is_model = 1")
    for _, records in data:
        with c:
            for r in records:
                rid = c.execute("INSERT INTO rollouts (step, env, reward, result) VALUES (?, ?, ?, ?)",
                                [r.step, r.env, r.reward, json.dumps(r.result)]).lastrowid
                c.executemany("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              [(rid, i, t, x, m, u, g, tr) for i, (t, x, m, u, g, tr) in enumerate(
                                  zip(r.token_ids, r.token_text, r.loss_mask, r.turn_index, r.gen_logprobs,
                                      r.train_logprobs))])
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()


def db_bytes(path: Path) -> int:
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return c.execute("PRAGMA page_count").fetchone()[0] * c.execute("PRAGMA page_size").fetchone()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    print(f"{'shape':34s} {'tokens':>8s} {'baseline B/tok':>15s} {'store B/tok':>12s} {'ratio':>7s}")
    shapes = (("single-turn (96-token prompt)", 1, 96), ("5-call multi-turn (tool results)", 5, 96),
              ("10-call multi-turn (tool results)", 10, 96))
    for name, calls, prompt_len in shapes:
        data = steps(0, args.steps, calls, prompt_len)
        tokens = sum(len(r.token_ids) for _, records in data for r in records)
        write_baseline(tmp / f"{calls}-baseline.db", data)
        t0 = time.perf_counter()
        write_new(tmp / f"{calls}-store.db", data)
        write_s = time.perf_counter() - t0
        old, new = db_bytes(tmp / f"{calls}-baseline.db") / tokens, db_bytes(tmp / f"{calls}-store.db") / tokens
        print(f"{name:34s} {tokens:8d} {old:15.1f} {new:12.1f} {new / old:7.3f}   (write {write_s:.2f} s)")


if __name__ == "__main__":
    main()
