"""Training-step time and memory with shared-prefix packing against padded micro-batches.

    .venv/bin/python bench/bench_packing.py [--model embedded:smollm2-135m-instruct] [--rows 8] [--group 4]

The batch is the default config's shape: `rows` addition prompts from data/addition_train.jsonl
(rendered with the model's chat template, the worked example included), each answered `group`
times with completions of 8-48 tokens, as GRPO steps see them. Each mode runs in its own
subprocess (so peak RSS is its own): one warm-up step, then `--steps` timed `train_step`s
(forward, backward, AdamW). Prints seconds per step, tokens through the model, peak RSS, and the
packed/padded ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def batch(tokenizer, rows: int, group: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    lines = (ROOT / "data" / "addition_train.jsonl").read_text().splitlines()[:rows]
    vocab = [i for i in range(100, 20000)]
    out = []
    for line in lines:
        messages = json.loads(line)["responses_create_params"]["input"]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(group):
            completion = [rng.choice(vocab) for _ in range(rng.randint(8, 48))] + [tokenizer.eos_token_id]
            out.append((prompt + completion, [0] * len(prompt) + [1] * len(completion)))
    return out


def measure(model: str, packed: bool, rows: int, group: int, steps: int) -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer

    from engine.models import resolve_model
    from grpo.packing import build_pack, plan_packs
    from grpo.policy import PolicyTrainer, TrainerConfig, TrainSample, pack_micro_batches

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = TrainerConfig(lr=1e-6, dtype="auto", pack_shared_prefix=packed, micro_batch_tokens=2048)
    trainer = PolicyTrainer(path, cfg, seed=0)
    data = batch(tok, rows, group)
    seqs = [ids for ids, _ in data]
    samples = [TrainSample(ids, mask, [-1.0 if m else 0.0 for m in mask], (-1.0) ** i)
               for i, (ids, mask) in enumerate(data)]
    if packed:
        tokens = sum(len(build_pack(seqs, p)) for p in plan_packs(seqs, cfg.micro_batch_tokens))
    else:
        tokens = sum(len(g) * max(len(seqs[i]) for i in g)
                     for g in pack_micro_batches([len(s) for s in seqs], cfg.micro_batch_tokens))
    trainer.train_step(samples)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(samples)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"step_s": sorted(times)[len(times) // 2], "tokens": float(tokens), "peak_gib": peak,
            "sequence_tokens": float(sum(len(s) for s in seqs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mode", choices=["packed", "padded"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(measure(args.model, args.mode == "packed", args.rows, args.group, args.steps)))
        return
    res = {}
    for mode in ("padded", "packed"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--model", args.model, "--rows", str(args.rows),
                              "--group", str(args.group), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = res["packed"], res["padded"]
    print(f"batch: {args.rows} rows x {args.group} = {args.rows * args.group} sequences, "
          f"{a['sequence_tokens']:.0f} tokens unpacked and unpadded")
    for mode in ("padded", "packed"):
        r = res[mode]
        print(f"{mode:7s}: {r['step_s']:6.2f} s/step (median of {args.steps}), {r['tokens']:6.0f} tokens through "
              f"the model, peak {r['peak_gib']:.2f} GiB")
    print(f"ratio packed/padded: time {a['step_s'] / b['step_s']:.3f}, tokens {a['tokens'] / b['tokens']:.3f}, "
          f"peak memory {a['peak_gib'] / b['peak_gib']:.3f}")


if __name__ == "__main__":
    main()
