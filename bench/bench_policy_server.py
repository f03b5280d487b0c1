"""Policy-server overhead and weight-push time, measured in one run on the same engine.

    .venv/bin/python bench/bench_policy_server.py [--model embedded:smollm2-135m-instruct] [--n 64]

Sends the same N chat prompts (32 in flight) once straight to the engine and once through the
OpenAI-compatible HTTP server (real uvicorn, real aiohttp client), and prints generated tokens/s
for both and their ratio (goal: server >= 0.9x direct). Then times `update_weights` with the
model's full weights (what the trainer pushes after every step).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


async def main(args: argparse.Namespace) -> None:
    import aiohttp
    import torch
    from starlette.applications import Starlette
    from transformers import AutoModelForCausalLM

    from engine.chat import ChatRenderer
    from engine.engine import Engine, EngineConfig, SamplingOptions
    from engine.models import resolve_model
    from engine.protocol import ChatMessage
    from engine.server import HTTPServer, ServerConfig, policy_routes

    path = resolve_model(args.model)
    engine = await Engine(EngineConfig(model=path, max_model_len=1024, seed=0)).start()
    http = await HTTPServer.start(Starlette(routes=policy_routes(engine, ServerConfig(model_name="m"))), "127.0.0.1", 0)
    renderer = ChatRenderer(engine.tokenizer, None)
    questions = [f"What is {a} + {a + 3}? Explain step by step." for a in range(args.n)]
    opts = [SamplingOptions(temperature=1.0, max_tokens=args.max_tokens, seed=i, stop_token_ids=[renderer.end_of_turn_id])
            for i in range(args.n)]
    limit = asyncio.Semaphore(32)

    async def direct(i: int) -> int:
        async with limit:
            ids = renderer.prompt_ids([ChatMessage(role="user", content=questions[i])])
            return len((await engine.generate(ids, opts[i])).token_ids)

    async def via_http(session: aiohttp.ClientSession, i: int) -> int:
        body = {"model": "m", "messages": [{"role": "user", "content": questions[i]}], "temperature": 1.0,
                "max_tokens": args.max_tokens, "seed": i, "logprobs": True, "return_tokens_as_token_ids": True}
        async with limit:
            async with session.post(f"http://127.0.0.1:{http.port}/v1/chat/completions", json=body) as r:
                return (await r.json())["usage"]["completion_tokens"]

    async def timed(make) -> tuple[int, float]:
        t = time.perf_counter()
        counts = await asyncio.gather(*[make(i) for i in range(args.n)])
        return sum(counts), time.perf_counter() - t

    await timed(direct)  # warm-up: first-batch compilation and caches
    async with aiohttp.ClientSession() as session:
        results = {}
        for _ in range(args.repeats):  # interleaved, so load drift hits both alike
            for name, make in (("direct", direct), ("http", lambda i: via_http(session, i))):
                tok, sec = await timed(make)
                results.setdefault(name, []).append(tok / sec)
    d, h = max(results["direct"]), max(results["http"])
    print(f"engine direct      : {d:8.1f} tok/s  (best of {args.repeats}, {args.n} requests, 32 in flight)")
    print(f"through HTTP server: {h:8.1f} tok/s")
    print(f"ratio server/direct: {h / d:8.3f}   (goal >= 0.9)")

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = [(n, p.detach()) for n, p in model.named_parameters()]
    times = [await engine.update_weights(weights) for _ in range(3)]
    print(f"weight push        : {min(times):8.3f} s  ({sum(p.numel() for _, p in weights) / 1e6:.1f}M params, best of 3)")
    await http.stop()
    await engine.shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    asyncio.run(main(p.parse_args()))
