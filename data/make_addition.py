"""Writes the default task: "What is a + b?" with one worked example as an earlier turn, as NeMo Gym
string_match rows (reward 1 when the last \\boxed{} equals a + b); and its two-turn variant for
config-multienv.yaml: the same question, then the scripted follow-up "Now add c to that." (Gym's
example_multi_turn_gymnasium: reward 1 when the final answer contains \\boxed{a + b + c}).

    python data/make_addition.py      # regenerates addition_*.jsonl and chain_*.jsonl

SmolLM2-135M gets ~33% of these right at the start and learns it under GRPO on CPU (DESIGN.md).
"""

import json
import random
from pathlib import Path

SUFFIX = " Put your final answer in \\boxed{}."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def question(a: int, b: int) -> list[dict]:
    # an easy-input message: Gym takes a plain-text assistant turn as conversation history
    example = {"role": "assistant", "content": "7 + 5 = 12. The answer is \\boxed{12}."}
    return [user("What is 7 + 5?" + SUFFIX), example, user(f"What is {a} + {b}?" + SUFFIX)]


def row(a: int, b: int) -> dict:
    return {
        "responses_create_params": {"input": question(a, b)},
        "expected_answer": str(a + b),
        "extraction_mode": "boxed",
        "case_sensitive": False,
    }


def chain_row(a: int, b: int, c: int) -> dict:
    return {
        "responses_create_params": {"input": question(a, b)},
        "follow_ups": [f"Now add {c} to that." + SUFFIX],
        "expected_answer": f"\\boxed{{{a + b + c}}}",
        "agent_ref": {"type": "responses_api_agents", "name": "example_multi_turn_gymnasium_agent"},
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
    triples = [(a, b, c) for a in range(1, 11) for b in range(1, 11) for c in range(1, 11)]
    rng.shuffle(triples)
    for name, chunk in (("chain_train.jsonl", triples[:300]), ("chain_eval.jsonl", triples[300:364])):
        with open(here / name, "w") as f:
            for t in chunk:
                f.write(json.dumps(chain_row(*t)) + "\n")


if __name__ == "__main__":
    main()
