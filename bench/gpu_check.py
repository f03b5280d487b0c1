"""The checks a GPU run must pass, each printing its figure; also runs on CPU.

    .venv/bin/python bench/gpu_check.py                       # embedded default model
    .venv/bin/python bench/gpu_check.py --model /path/to/hf   # any HF folder (e.g. a 0.5B model)
    .venv/bin/python bench/gpu_check.py --skip-e2e            # checks 1-5 only

On the first run on any NVIDIA machine, run this before anything else. On CPU every check runs
through the same engine calls (vLLM pauses its scheduler and tracks its sleeping pools there too,
engine/cpu_sleep.py frees the memory); only the figures that need CUDA (memory the device reports)
are skipped, with the reason printed.

  1. sleep (level 1) frees about weights + KV cache; a seeded greedy generation is identical after wake
  2. sleep (level 2: weights dropped) -> push perturbed weights -> wake changes the output; pushing
     the originals restores it
  3. trainer vs engine logprobs on generated sequences (token_mult_prob_error; <= 1.02 in bf16)
  4. free memory flat over three full cycles (offload -> wake -> generate -> sleep -> train -> push)
  5. a request in flight at sleep ends with an error and vLLM holds no unfinished request
  6. trainer.py config.yaml for 3 steps: step-time split, sleep/wake/push times, peak memory
Exit status: 0 when no check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.engine import DISCARD_WEIGHTS, Engine, EngineAsleep, EngineConfig, SamplingOptions, on_gpu  # noqa: E402
from store import metrics as M  # noqa: E402

PROMPTS = ["What is 7 + 5? Put your final answer in \\boxed{}.", "Name three colours.", "Write a haiku about rain.",
           "What is the capital of France?"]
results: list[tuple[str, str, str]] = []  # (check, PASS/FAIL/SKIP, figure)


def say(check: str, ok: bool | None, figure: str) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    results.append((check, status, figure))
    print(f"[{status}] {check}: {figure}", flush=True)


def free_gib() -> float | None:
    if not on_gpu():
        return None
    import torch

    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 2**30


def prompts(engine: Engine) -> list[list[int]]:
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


async def greedy(engine: Engine, ps: list[list[int]], n: int = 24) -> list[list[int]]:
    gens = await asyncio.gather(*[engine.generate(p, SamplingOptions(temperature=0.0, max_tokens=n)) for p in ps])
    return [g.token_ids for g in gens]


async def check_sleep_wake(engine: Engine, ps: list[list[int]]) -> None:
    before = await greedy(engine, ps)
    free0 = free_gib()
    t0 = time.perf_counter()
    await engine.sleep()
    t_sleep = time.perf_counter() - t0
    free1 = free_gib()
    t0 = time.perf_counter()
    await engine.wake()
    t_wake = time.perf_counter() - t0
    after = await greedy(engine, ps)
    same = after == before
    if free0 is None:
        say("1 sleep/wake", same, f"greedy identical after wake: {same}; sleep {t_sleep:.3f}s, wake {t_wake:.3f}s; "
                                  "freed memory: skipped (no CUDA device)")
    else:
        say("1 sleep/wake", same and free1 > free0,
            f"freed {free1 - free0:.2f} GiB (free {free0:.2f} -> {free1:.2f}); sleep {t_sleep:.3f}s, "
            f"wake {t_wake:.3f}s; greedy identical after wake: {same}")


async def check_push_while_asleep(engine: Engine, ps: list[list[int]], weights: list) -> None:
    import torch

    before = await greedy(engine, ps)
    gen = torch.Generator().manual_seed(0)
    noisy = [(n, t + 0.05 * t.float().std().nan_to_num(1.0) * torch.randn(t.shape, generator=gen).to(t.dtype))
             for n, t in weights]
    free0 = free_gib()
    await engine.sleep(DISCARD_WEIGHTS)  # as the loop does before a full push: the weights are dropped
    free1 = free_gib()
    t_push = await engine.update_weights(noisy)
    await engine.wake()
    changed = await greedy(engine, ps)
    await engine.sleep(DISCARD_WEIGHTS)
    await engine.update_weights(weights)
    await engine.wake()
    restored = await greedy(engine, ps)
    say("2 push while asleep", changed != before and restored == before,
        f"output changed after perturbed push: {changed != before}; restored exactly: {restored == before}; "
        f"push {t_push:.3f}s; level-2 sleep freed "
        + ("(no CUDA device)" if free0 is None else f"{free1 - free0:.2f} GiB"))


async def check_logprobs(engine: Engine, ps: list[list[int]], trainer, temperature: float) -> float:
    opts = [SamplingOptions(temperature=temperature, max_tokens=48, seed=i) for i in range(len(ps))]
    gens = await asyncio.gather(*[engine.generate(p, o) for p, o in zip(ps, opts)])
    seqs = [g.prompt_ids + g.token_ids for g in gens]
    train = await asyncio.to_thread(trainer.logprobs, seqs)
    errs = []
    for g, lp in zip(gens, train):
        errs += [math.exp(abs(a - b)) for a, b in zip(g.logprobs, lp[len(g.prompt_ids):])]
    tmpe = sum(errs) / len(errs)
    limit = 1.02 if on_gpu() else 1.001  # bf16 on GPU; fp32 on CPU is exact
    say("3 trainer vs engine logprobs", tmpe <= limit, f"token_mult_prob_error {tmpe:.4f} over {len(errs)} tokens "
                                                       f"(limit {limit})")
    return tmpe


async def check_cycles(engine: Engine, ps: list[list[int]], trainer) -> None:
    from grpo.policy import TrainSample

    frees: list[float | None] = []
    rss: list[float] = []
    for _ in range(3):
        await asyncio.to_thread(trainer.offload_optimizer)
        await engine.wake()
        gens = await asyncio.gather(*[engine.generate(p, SamplingOptions(temperature=1.0, max_tokens=32, seed=i))
                                      for i, p in enumerate(ps)])
        await engine.sleep(DISCARD_WEIGHTS)
        await asyncio.to_thread(trainer.reload_optimizer)
        samples = [TrainSample(g.prompt_ids + g.token_ids, [0] * len(g.prompt_ids) + [1] * len(g.token_ids),
                               [0.0] * len(g.prompt_ids) + g.logprobs, (-1.0) ** i) for i, g in enumerate(gens)]
        await asyncio.to_thread(trainer.train_step, samples)
        await asyncio.to_thread(trainer.offload_optimizer)
        await engine.update_weights(trainer.named_weights())
        frees.append(free_gib())
        rss.append(_rss_gib())
    await engine.wake()
    if frees[0] is None:
        say("4 memory over three cycles", None, f"device memory: skipped (no CUDA device); process RSS after each "
                                                f"cycle {', '.join(f'{r:.2f}' for r in rss)} GiB")
    else:
        drift = max(frees) - min(frees)
        say("4 memory over three cycles", drift < 0.5, f"free GiB after each cycle {', '.join(f'{f:.2f}' for f in frees)}"
                                                       f" (drift {drift:.2f} GiB)")


async def check_abort_at_sleep(engine: Engine, ps: list[list[int]]) -> None:
    stream = engine.stream(ps[0], SamplingOptions(temperature=1.0, max_tokens=2000, ignore_eos=True))
    await stream.__anext__()
    aborted = await engine.sleep()
    ended_with_error = False
    try:
        async for _ in stream:
            pass
    except EngineAsleep:
        ended_with_error = True
    state = await engine.vllm_state()
    await engine.wake()
    say("5 in-flight request at sleep", ended_with_error and aborted == 1 and not state.unfinished_requests,
        f"aborted {aborted}; stream ended with EngineAsleep: {ended_with_error}; "
        f"vLLM unfinished requests after sleep: {state.unfinished_requests}")


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def check_trainer_run(model: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as runs:
        cmd = [sys.executable, str(ROOT / "trainer.py"), str(ROOT / "config.yaml"), "--set", f"model.name={model}",
               "--set", f"grpo.steps={steps}", "--set", f"run.dir={runs}", "--set", "run.name=gpu-check",
               "--set", "server.port=0", "--set", "gym.head_port=0"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            say("6 trainer.py end to end", False, f"exit {p.returncode}: {p.stderr[-1500:]}")
            return
        with sqlite3.connect(Path(runs) / "gpu-check" / "rollouts.db") as c:
            c.row_factory = sqlite3.Row
            rows = [dict(r) for r in c.execute("SELECT * FROM steps ORDER BY step")]
    keys = (M.TIME_STEP_S, M.TIME_GENERATION_S, M.TIME_TRAINING_S, M.TIME_WEIGHT_SYNC_S, M.TIME_SLEEP_S,
            M.TIME_WAKE_S, M.TOKEN_MULT_PROB_ERROR, M.REWARD_MEAN, M.PEAK_MEMORY_GIB)
    later = rows[1:] or rows  # the first step warms up
    means = {k: sum(r[k] for r in later) / len(later) for k in keys if all(r.get(k) is not None for r in later)}
    figure = ", ".join(f"{k} {v:.3f}" for k, v in means.items())
    say("6 trainer.py end to end", len(rows) == steps,
        f"{len(rows)} steps in {wall:.0f}s wall; mean of steps 2..{steps}: {figure}")


async def run(args: argparse.Namespace) -> None:
    from engine.models import resolve_model
    from grpo.policy import PolicyTrainer, TrainerConfig

    model = resolve_model(args.model)
    device = "CUDA " + __import__("torch").cuda.get_device_name(0) if on_gpu() else "CPU (no CUDA device)"
    print(f"gpu_check on {device}; model {model}", flush=True)
    engine = await Engine(EngineConfig(model=model, max_model_len=1024)).start()
    try:
        ps = prompts(engine)
        await check_sleep_wake(engine, ps)
        trainer = await asyncio.to_thread(PolicyTrainer, model, TrainerConfig(temperature=1.0, lr=1e-5), 0)
        weights = [(n, t.detach().clone()) for n, t in trainer.named_weights()]
        await check_push_while_asleep(engine, ps, weights)
        await check_logprobs(engine, ps, trainer, 1.0)
        await check_cycles(engine, ps, trainer)
        await check_abort_at_sleep(engine, ps)
        del trainer
    finally:
        await engine.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-e2e", action="store_true", help="skip check 6 (a real trainer.py run)")
    args = p.parse_args()
    asyncio.run(run(args))
    if args.skip_e2e:
        say("6 trainer.py end to end", None, "skipped (--skip-e2e)")
    else:
        check_trainer_run(args.model, args.steps)
    print(json.dumps({c: s for c, s, _ in results}))
    return 1 if any(s == "FAIL" for _, s, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
