"""What NeMo Gym costs per rollout, with the model taken out of the picture.

A zero-latency stand-in policy (a tiny HTTP server that answers every chat completion at once
with the same assistant message and the same token ids) replaces the engine. We time:
  gym:    N string_match rollouts through Gym (agent -> model adapter -> stand-in, then /verify)
  direct: N chat completions posted straight to the stand-in
at the same concurrency, and print both rates and their ratio. The stand-in is a benchmark
baseline only; tests always use the real engine.

    .venv/bin/python bench/bench_gym_overhead.py [--n 256] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

ANSWER = "The answer is \\boxed{Paris}."
GEN_IDS = [504, 3284, 314, 31824, 95, 2]


def serve_standin(port: int) -> None:
    """The stand-in policy: /v1/models and an instant /v1/chat/completions."""
    from aiohttp import web

    counter = itertools.count()

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "standin", "object": "model"}]})

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        n = next(counter)
        message = {"role": "assistant", "content": ANSWER, "prompt_token_ids": [1, 2, 3, n % 1000],
                   "generation_token_ids": GEN_IDS, "generation_log_probs": [-0.5] * len(GEN_IDS)}
        return web.json_response({
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": "standin",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": len(GEN_IDS), "total_tokens": 4 + len(GEN_IDS)},
        })

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def _wait_for(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            await asyncio.sleep(0.1)


async def direct(base_url: str, n: int, concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)
    body = {"model": "standin", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True}

    async def one(session: aiohttp.ClientSession) -> None:
        async with semaphore:
            async with session.post(f"{base_url}/chat/completions", json=body) as resp:
                resp.raise_for_status()
                await resp.json()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(n)))
        return n / (time.perf_counter() - started)


async def through_gym(base_url: str, n: int, concurrency: int, log_dir: Path) -> tuple[float, float]:
    from gym.config import GymConfig
    from gym.rollouts import collect, load_env_rows
    from gym.servers import GymServers

    config = GymConfig(envs=[{"name": "string_match", "config": "string_match",
                              "train_data": "resources_servers/string_match/data/example.jsonl"}],
                       head_port=0, concurrency=concurrency)
    rows = load_env_rows(config)
    rows = [rows[i % len(rows)] for i in range(n)]
    servers = GymServers(config)
    started = time.perf_counter()
    await servers.start(base_url, "standin", None, log_dir)
    startup_s = time.perf_counter() - started
    try:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            await collect(rows[:concurrency], 1, servers, session, concurrency, 60, 0)  # warm every path
            started = time.perf_counter()
            rollouts = await collect(rows, 1, servers, session, concurrency, config.request_timeout_s, 0)
            rate = len(rollouts) / (time.perf_counter() - started)
    finally:
        await servers.stop()
    return rate, startup_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve-standin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_standin:
        serve_standin(args.serve_standin)
        return

    from gym.servers import free_port

    port = free_port()
    standin = subprocess.Popen([sys.executable, __file__, "--serve-standin", str(port)])
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        asyncio.run(_wait_for(f"{base_url}/models"))
        direct_rate = asyncio.run(direct(base_url, args.n, args.concurrency))
        with tempfile.TemporaryDirectory(prefix="bench-gym-") as tmp:
            gym_rate, startup_s = asyncio.run(through_gym(base_url, args.n, args.concurrency, Path(tmp)))
    finally:
        standin.terminate()
        standin.wait()
    print(json.dumps({
        "n": args.n, "concurrency": args.concurrency, "cpus": os.cpu_count(),
        "gym_startup_s": round(startup_s, 1),
        "direct_per_s": round(direct_rate, 1), "gym_rollouts_per_s": round(gym_rate, 1),
        "direct_over_gym": round(direct_rate / gym_rate, 2),
    }))
    print(f"direct {direct_rate:.1f}/s vs through Gym {gym_rate:.1f} rollouts/s: "
          f"Gym costs {direct_rate / gym_rate:.1f}x the time of a bare call")


if __name__ == "__main__":
    main()
