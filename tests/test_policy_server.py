"""The OpenAI-compatible policy server, driven by the official `openai` client over real HTTP."""

import json

import httpx
import openai
import pytest

from tests.tiny_model import WEATHER_TOOL

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "what's it like in sf?"}]


@pytest.fixture(scope="module")
def client(policy_server):
    return openai.OpenAI(base_url=policy_server.base_url, api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_returns_token_ids_on_the_message_and_vllm_style(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=8, temperature=1.0, logprobs=True,
                                       top_logprobs=0, extra_body={"return_tokens_as_token_ids": True, "seed": 1})
    raw = r.model_dump()
    msg = raw["choices"][0]["message"]
    gen = msg["generation_token_ids"]
    assert 1 <= len(gen) <= 8
    assert raw["choices"][0]["token_ids"] == gen
    assert raw["prompt_token_ids"] == msg["prompt_token_ids"]
    assert [c["token"] for c in raw["choices"][0]["logprobs"]["content"]] == [f"token_id:{t}" for t in gen]
    assert [c["logprob"] for c in raw["choices"][0]["logprobs"]["content"]] == msg["generation_log_probs"]
    assert raw["temperature"] == 1.0
    assert r.usage.completion_tokens == len(gen)


def test_streaming_yields_the_same_tokens_as_the_final_ids(client):
    stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=10, temperature=1.0,
                                            stream=True, logprobs=True, extra_body={"seed": 7},
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in (c.model_dump().get("choices")[0].get("token_ids") or [])]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens == len(ids) >= 1
    # same seed, non-streaming: identical sample
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=10, temperature=1.0,
                                       extra_body={"seed": 7})
    assert r.model_dump()["choices"][0]["message"]["generation_token_ids"] == ids
    assert r.choices[0].message.content == text


def test_tools_reach_the_template_and_tool_calls_come_back_parsed(client, policy_server):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL], temperature=0.0,
                                       max_tokens=40)
    prompt_text = policy_server.engine.tokenizer.decode(r.model_dump()["prompt_token_ids"])
    assert '"name": "get_weather"' in prompt_text
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "sf"}


def test_streamed_tool_call_is_parsed(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL],
                                                 temperature=0.0, max_tokens=40, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_multi_turn_prompt_begins_with_previous_ids_even_when_text_retokenizes_differently(client, policy_server):
    tok = policy_server.engine.tokenizer
    first = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=24, temperature=1.0,
                                           extra_body={"seed": 11}).model_dump()
    msg = first["choices"][0]["message"]
    p1, g1 = msg["prompt_token_ids"], msg["generation_token_ids"]
    # the random model's noise does not survive a text round trip
    assert tok.encode(msg["content"], add_special_tokens=False) != [t for t in g1 if t != 2]
    follow = ASK + [
        {"role": "assistant", "content": msg["content"], "prompt_token_ids": p1,
         "generation_token_ids": g1, "generation_log_probs": msg["generation_log_probs"]},
        {"role": "user", "content": "and tomorrow?"},
    ]
    second = client.chat.completions.create(model="tiny", messages=follow, max_tokens=4, temperature=1.0).model_dump()
    p2 = second["choices"][0]["message"]["prompt_token_ids"]
    assert p2[: len(p1) + len(g1)] == p1 + g1


def test_gym_required_prefix_is_honoured(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=6, temperature=1.0).model_dump()
    msg = first["choices"][0]["message"]
    prefix = msg["prompt_token_ids"] + msg["generation_token_ids"]
    follow = ASK + [{"role": "assistant", "content": msg["content"]}, {"role": "user", "content": "ok"}]
    second = client.chat.completions.create(model="tiny", messages=follow, max_tokens=2,
                                            extra_body={"required_prefix_token_ids": prefix}).model_dump()
    assert second["prompt_token_ids"][: len(prefix)] == prefix


@pytest.mark.parametrize("params, field", [({"top_k": 5}, "top_k"), ({"top_p": 0.9}, "top_p"), ({"min_p": 0.1}, "min_p")])
def test_truncating_samplers_are_refused_while_training(client, params, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, extra_body=params) \
            if field != "top_p" else client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, top_p=0.9)
    assert e.value.body["param"] == field


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=ASK, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_empty_message_list_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"


def test_wrong_type_is_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens="many")
    assert e.value.body["param"] == "max_tokens"


def test_malformed_json_is_400_and_the_server_keeps_serving(policy_server, client):
    r = httpx.post(f"{policy_server.base_url}/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2).choices[0].message is not None


def test_prompt_longer_than_the_context_is_400_mentioning_context_length(client):
    long = [{"role": "user", "content": "word " * 1200}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=2)
    assert "context length" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"


def test_generation_is_capped_at_the_context(client, policy_server):
    near = [{"role": "user", "content": "word " * 1000}]
    r = client.chat.completions.create(model="tiny", messages=near, max_tokens=500, temperature=1.0).model_dump()
    total = len(r["prompt_token_ids"]) + len(r["choices"][0]["token_ids"])
    assert total <= policy_server.engine.max_model_len
    assert r["choices"][0]["finish_reason"] in ("length", "stop")


def test_tokenize_renders_messages_like_the_chat_endpoint(policy_server, client):
    r = httpx.post(f"{policy_server.root_url}/tokenize", json={"model": "tiny", "messages": ASK})
    c = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1).model_dump()
    assert r.json()["tokens"] == c["prompt_token_ids"]
    assert r.json()["count"] == len(c["prompt_token_ids"])


def test_health(policy_server):
    assert httpx.get(f"{policy_server.root_url}/health").json()["status"] == "ok"


def test_a_temperature_other_than_the_declared_training_one_is_refused_naming_both(client, policy_server):
    policy_server.pin.temperature = 1.0       # what the loop declares while it collects rollouts
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, temperature=0.7)
        assert e.value.body["param"] == "temperature"
        assert "temperature 0.7 differs from the temperature 1.0" in e.value.body["message"]
        ok = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, temperature=1.0)
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        policy_server.pin.temperature = None
    # outside a collection phase any temperature is served
    client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, temperature=0.7)


@pytest.mark.parametrize("bad", [10**9, -3])
def test_out_of_vocabulary_ids_in_a_prior_turn_are_400_naming_the_field(policy_server, bad):
    body = {"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "prompt_token_ids": [1, 2], "generation_token_ids": [5, bad, 2]},
        {"role": "user", "content": "Again"}]}
    r = httpx.post(f"{policy_server.base_url}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.1.generation_token_ids"
    assert f"token id {bad} is outside the vocabulary" in r.json()["error"]["message"]
