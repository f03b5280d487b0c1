"""TRL's GRPOTrainer on the default task: run by bench/bench_vs_trl.py inside .venv-trl.

    .venv-trl/bin/python bench/trl_addition.py --model DIR --steps N --out steps.jsonl

The same rows as config.yaml (data/addition_train.jsonl, chat messages with the worked example),
the same batch (8 prompts x 4 generations, at most 128 new tokens, T = 1.0), learning rate, clip
range and loss normalisation as our default; HF `generate` on CPU in fp32, as TRL does without vLLM.
The reward is 1 when the last \\boxed{} of the completion equals the answer. Writes one JSON line
per step: seconds, generation seconds, reward. Imports nothing from this repository (other venv).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOXED = re.compile(r"\\boxed\{")


def last_boxed(text: str) -> str | None:
    for m in reversed(list(BOXED.finditer(text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def correct(text: str, expected: str) -> float:
    got = last_boxed(text)
    try:
        return float(got is not None and float(got) == float(expected))
    except ValueError:
        return 0.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in (ROOT / "data" / "addition_train.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["responses_create_params"]["input"], "answer": r["expected_answer"]}
                              for r in rows])

    def reward(completions, answer, **_):
        return [correct(c[-1]["content"], a) for c, a in zip(completions, answer)]

    cfg = GRPOConfig(
        output_dir=str(Path(args.out).parent / "trl-out"), max_steps=args.steps, use_cpu=True, bf16=False,
        per_device_train_batch_size=32, num_generations=4, gradient_accumulation_steps=1,
        max_completion_length=128, temperature=1.0, top_p=1.0, learning_rate=2e-5, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        logging_steps=1, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=cfg, train_dataset=data)

    gen_s = [0.0]
    model = trainer.model
    generate = model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            gen_s[0] += time.perf_counter() - t0

    model.generate = timed_generate
    out = open(args.out, "w")

    class Steps(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0, gen_s[0] = time.perf_counter(), 0.0

        def on_log(self, _args, state, _control, logs=None, **__):
            if logs and "reward" in logs:
                out.write(json.dumps({"step": state.global_step, "time_step_s": time.perf_counter() - self.t0,
                                      "time_generation_s": gen_s[0], "reward": logs["reward"]}) + "\n")
                out.flush()

    trainer.add_callback(Steps())
    trainer.train()
    out.close()


if __name__ == "__main__":
    main()
