"""Malformed requests never get a 5xx and never stop the server (real engine, real HTTP).

Hundreds of requests are generated from one good request by replacing one field (or a nested
field) with a hostile value, plus raw bodies: random bytes, truncated JSON, invalid UTF-8, deep
nesting, NaN/Infinity. Every answer must be below 500; a good request is answered after them.
"""

import json
import random

import httpx
import pytest

pytestmark = pytest.mark.slow

GOOD = {
    "model": "tiny", "max_tokens": 2, "temperature": 1.0,
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "prompt_token_ids": [1, 2, 3], "generation_token_ids": [4, 2],
         "generation_log_probs": [-0.1, -0.2]},
        {"role": "user", "content": "Again"},
    ],
}
HOSTILE = [
    None, True, 0, -1, 1, 2**31, -(2**31), 2**63, -(2**63) - 1, 10**30, -10**30, 1e308, -1e308, 1e-320, 0.5,
    "", "x", "x" * 20000, "\u0000", "\ud800", "<|im_end|>", [], [None], [-5], [10**12], [[1, 2]], {}, {"a": 1},
    {"type": "text", "text": 5}, [{"type": "text", "text": None}], [{"type": "function", "function": "f"}],
]
PATHS = [
    ("model",), ("max_tokens",), ("max_completion_tokens",), ("temperature",), ("top_p",), ("top_k",), ("min_p",),
    ("seed",), ("stop",), ("stream",), ("stream_options",), ("n",), ("logprobs",), ("top_logprobs",), ("tools",),
    ("tool_choice",), ("required_prefix_token_ids",), ("chat_template_kwargs",), ("messages",), ("messages", 0),
    ("messages", 0, "role"), ("messages", 0, "content"), ("messages", 1, "tool_calls"),
    ("messages", 1, "prompt_token_ids"), ("messages", 1, "generation_token_ids"),
    ("messages", 1, "generation_log_probs"), ("messages", 2, "name"), ("messages", 2, "tool_call_id"),
]


def _with(path: tuple, value) -> dict:
    body = json.loads(json.dumps(GOOD))
    node = body
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return body


def _raw_bodies(rng: random.Random) -> list[bytes]:
    good = json.dumps(GOOD).encode()
    out = [b"", b"null", b"[]", b"42", b"\"text\"", b"{", good[:-1], good[: len(good) // 2], b"\xff\xfe\x00",
           good.replace(b"1.0", b"NaN"), good.replace(b"1.0", b"Infinity"), good.replace(b"1.0", b"-Infinity"),
           good.replace(b"1.0", b"1e999"), good.replace(b"\"Hi\"", b"\"\\ud800\""),
           b"[" * 100_000 + b"]" * 100_000, b"{\"model\": " + b"{\"a\": " * 5000 + b"1" + b"}" * 5001,
           good.replace(b"\"max_tokens\": 2", b"\"max_tokens\": " + b"9" * 5000)]
    out += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) for _ in range(40)]
    return out


def test_no_malformed_request_gets_a_5xx_and_the_server_keeps_serving(policy_server):
    rng = random.Random(0)
    url = f"{policy_server.base_url}/chat/completions"
    bodies = [json.dumps(_with(p, v)).encode() for p in PATHS for v in HOSTILE]
    bodies += [json.dumps(_with(rng.choice(PATHS), rng.choice(HOSTILE))).encode() for _ in range(100)]
    bodies += _raw_bodies(rng)
    failures = []
    with httpx.Client(timeout=120) as client:
        for body in bodies:
            try:
                r = client.post(url, content=body, headers={"content-type": "application/json"})
            except httpx.TransportError as e:  # the server dropped the connection: as bad as a 5xx
                failures.append((type(e).__name__, body[:200], str(e)))
                continue
            if r.status_code >= 500:
                failures.append((r.status_code, body[:200], r.text[:300]))
            elif r.status_code >= 400:
                assert "error" in r.json(), r.text[:300]
        assert not failures, f"{len(failures)} of {len(bodies)} got a 5xx, e.g. {failures[:5]}"
        assert client.post(url, json=GOOD).status_code == 200
    assert len(bodies) > 900
