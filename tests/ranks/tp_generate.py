"""Greedy generation, a perturbed weight push, greedy generation again: on one engine in one
process, or on one tensor-parallel engine over the torchrun ranks (engine.tensor_parallel_size =
world). Run by tests/test_ranks.py; the leader writes the token ids to the JSON file in argv[2]."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPTS = [[5, 17, 33, 2, 60], [100, 101, 102], [7] * 9, [300, 200, 100, 50, 25, 12]]


def perturbed(model: str):
    import torch
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(0)
    weights = load_file(str(Path(model) / "model.safetensors"))
    return [(k, v.float() + 0.05 * torch.randn(v.shape, generator=gen)) for k, v in sorted(weights.items())]


async def run(model: str, world: int) -> dict | None:
    from engine.engine import DISCARD_WEIGHTS, Engine, EngineConfig, SamplingOptions
    from engine.tp import Mirror
    from grpo import ranks

    mirror = Mirror(world, world, ranks.rank()) if world > 1 else None
    # SEED_OF_RANK_1 (with TEMPERATURE > 0): a member that samples other tokens than its leader
    seed = int(os.environ.get("SEED_OF_RANK_1", "0")) if ranks.rank() == 1 else 0
    engine = await Engine(EngineConfig(model=model, max_model_len=256, seed=seed, cpu_kv_cache_gib=1,
                                       external_launcher=world > 1, tensor_parallel_size=world), mirror).start()
    greedy = SamplingOptions(temperature=float(os.environ.get("TEMPERATURE", "0")), max_tokens=12, ignore_eos=True)

    async def generate() -> list[list[int]]:
        gens = await asyncio.gather(*(engine.generate(p, greedy) for p in PROMPTS))
        return [g.token_ids for g in gens]

    leader = mirror is None or mirror.leader
    before = await generate() if leader else None
    # every member makes the lifecycle calls (as conductor.follow does); the leader's thread paces them
    await engine.sleep(DISCARD_WEIGHTS)  # as the loop does before a full push
    await engine.update_weights(perturbed(model))
    await engine.wake()
    after = await generate() if leader else None
    lifecycle = list(engine.lifecycle)
    await engine.shutdown()
    return {"world": world, "before": before, "after": after, "lifecycle": lifecycle} if leader else None


def main() -> None:
    from grpo import ranks

    model, out = sys.argv[1], Path(sys.argv[2])
    world = ranks.init()
    result = asyncio.run(run(model, world))
    if result is not None:
        out.write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # vLLM's groups outlive the engine: leave without tearing them down


if __name__ == "__main__":
    main()
