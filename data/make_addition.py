"""Writes the default task: "What is a + b?" with one worked example as an earlier turn, as NeMo Gym
string_match rows (reward 1 when the last \\boxed{} equals a + b).

    python data/make_addition.py      # regenerates addition_train.jsonl and addition_eval.jsonl

SmolLM2-135M gets ~33% of these right at the start and learns it under GRPO on CPU (DESIGN.md).
"""

import json
import random
from pathlib import Path

SUFFIX = " Put your final answer in \\boxed{}."


def row(a: int, b: int) -> dict:
    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    # an easy-input message: Gym takes a plain-text assistant turn as conversation history
    example = {"role": "assistant", "content": "7 + 5 = 12. The answer is \\boxed{12}."}
    return {
        "responses_create_params": {"input": [user("What is 7 + 5?" + SUFFIX), example, user(f"What is {a} + {b}?" + SUFFIX)]},
        "expected_answer": str(a + b),
        "extraction_mode": "boxed",
        "case_sensitive": False,
    }


def main() -> None:
    rng = random.Random(0)
    pairs = [(a, b) for a in range(1, 21) for b in range(1, 21) if (a, b) != (7, 5)]
    rng.shuffle(pairs)
    here = Path(__file__).parent
    for name, chunk in (("addition_train.jsonl", pairs[:320]), ("addition_eval.jsonl", pairs[320:])):
        with open(here / name, "w") as f:
            for a, b in chunk:
                f.write(json.dumps(row(a, b)) + "\n")


if __name__ == "__main__":
    main()
