"""The in-process engine: batched generation with logprobs, weight updates, sleep/wake."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.engine import SamplingOptions, check_weights

pytestmark = pytest.mark.slow


def _prompt(policy_server) -> list[int]:
    tok = policy_server.engine.tokenizer
    return tok.encode("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def test_concurrent_requests_each_return_ids_and_logprobs(policy_server):
    prompt = _prompt(policy_server)

    async def many():
        return await asyncio.gather(*[
            policy_server.engine.generate(prompt, SamplingOptions(temperature=1.0, max_tokens=12, seed=i))
            for i in range(16)])

    gens = policy_server.run(many())
    assert len(gens) == 16
    for g in gens:
        assert g.prompt_ids == prompt
        assert 1 <= len(g.token_ids) == len(g.logprobs) <= 12
        assert all(lp <= 0 for lp in g.logprobs)
    assert len({tuple(g.token_ids) for g in gens}) > 1  # different seeds, different samples


def test_logprobs_match_hf_at_the_sampling_temperature(policy_server, tiny_model):
    prompt = _prompt(policy_server)
    g = policy_server.run(policy_server.engine.generate(prompt, SamplingOptions(temperature=0.7, max_tokens=8, seed=3)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.tensor([prompt + g.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1] / 0.7
    hf = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
    assert torch.allclose(hf, torch.tensor(g.logprobs), atol=1e-3)


def test_weight_update_changes_output_and_restoring_gives_identical_greedy_tokens(policy_server, tiny_model):
    engine = policy_server.engine
    prompt = _prompt(policy_server)
    greedy = SamplingOptions(temperature=0.0, max_tokens=16)
    before = policy_server.run(engine.generate(prompt, greedy)).token_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    original = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    noisy = [(n, p + 0.5 * torch.randn(p.shape, generator=gen)) for n, p in original]

    policy_server.run(engine.update_weights(noisy))
    changed = policy_server.run(engine.generate(prompt, greedy)).token_ids
    policy_server.run(engine.update_weights(original))
    restored = policy_server.run(engine.generate(prompt, greedy)).token_ids

    assert changed != before
    assert restored == before


def test_pushed_tied_embedding_reaches_the_lm_head(policy_server, tiny_model):
    # tied models send no lm_head tensor; the engine must still sample from the new embedding
    engine = policy_server.engine
    prompt = _prompt(policy_server)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    original = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.05 * torch.randn(model.model.embed_tokens.weight.shape,
                                                                generator=torch.Generator().manual_seed(1)))
    try:
        policy_server.run(engine.update_weights([(n, p.detach()) for n, p in model.named_parameters()]))
        g = policy_server.run(engine.generate(prompt, SamplingOptions(temperature=0.7, max_tokens=8, seed=2)))
        with torch.no_grad():
            logits = model(torch.tensor([prompt + g.token_ids])).logits[0, len(prompt) - 1:-1] / 0.7
        hf = torch.log_softmax(logits, -1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        assert torch.allclose(hf, torch.tensor(g.logprobs), atol=1e-3)
    finally:
        policy_server.run(engine.update_weights(original))


def test_weight_with_wrong_shape_is_refused_before_touching_the_engine(policy_server):
    engine = policy_server.engine
    name = next(iter(engine.weight_shapes))
    with pytest.raises(ValueError, match="shape"):
        policy_server.run(engine.update_weights([(name, torch.zeros(3, 3))]))
    with pytest.raises(ValueError, match="not a parameter"):
        policy_server.run(engine.update_weights([("model.nope.weight", torch.zeros(3))]))
    # still serving
    g = policy_server.run(engine.generate(_prompt(policy_server), SamplingOptions(temperature=0.0, max_tokens=2)))
    assert len(g.token_ids) == 2


def test_check_weights_accepts_matching_names_and_shapes():
    check_weights([("a", torch.zeros(2, 3))], {"a": (2, 3)})


# ---- the GPU lifecycle, run through the same calls on CPU --------------------------------------
# On CPU vLLM pauses its scheduler at sleep, tracks which pools sleep and resumes only when all are
# awake (the order below is checked against vLLM itself); engine/cpu_sleep.py frees the memory.

def _held_bytes(policy_server) -> tuple[int, int]:
    """(KV cache, parameters): the bytes the engine's storages hold now (packed GEMM weights aside)."""
    def held(worker):
        def total(tensors):
            return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
        return total(worker.model_runner.kv_caches), total(worker.model_runner.get_model().parameters())

    return policy_server.run(policy_server.engine._call(lambda llm: llm.collective_rpc(held)[0]))


def _weights(tiny_model) -> list[tuple[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return [(n, p.detach()) for n, p in model.named_parameters()]

def _greedy(policy_server, n: int = 12) -> list[int]:
    opts = SamplingOptions(temperature=0.0, max_tokens=n)
    return policy_server.run(policy_server.engine.generate(_prompt(policy_server), opts)).token_ids


@pytest.mark.parametrize("level", [1, 2])
def test_a_training_step_reaches_vllm_in_the_gpu_order(policy_server, tiny_model, level):
    engine = policy_server.engine
    weights = _weights(tiny_model)
    before = _greedy(policy_server)
    engine.lifecycle.clear()
    policy_server.run(engine.wake())          # already awake: nothing reaches vLLM
    _greedy(policy_server)
    policy_server.run(engine.sleep(level))
    assert policy_server.run(engine.vllm_state()).sleeping
    policy_server.run(engine.update_weights(weights))
    assert engine.asleep_tags == {"kv_cache"}  # the push woke the weights only
    assert policy_server.run(engine.vllm_state()).sleeping
    policy_server.run(engine.wake())
    assert not policy_server.run(engine.vllm_state()).sleeping
    assert engine.lifecycle == [f"sleep:{level}", "wake_up:weights", "reload_weights", "reset_prefix_cache",
                                "wake_up:kv_cache"]
    assert _greedy(policy_server) == before


def test_sleep_frees_the_kv_cache_and_wake_gives_it_back(policy_server):
    engine = policy_server.engine
    before = _greedy(policy_server)
    kv, params = _held_bytes(policy_server)
    assert kv > 0 and params > 0
    policy_server.run(engine.sleep(1))
    assert _held_bytes(policy_server) == (0, params)  # level 1 keeps the weights
    policy_server.run(engine.wake())
    assert _held_bytes(policy_server) == (kv, params)
    assert _greedy(policy_server) == before


def test_level_2_sleep_frees_the_weights_until_a_full_push(policy_server, tiny_model):
    from engine.engine import EngineAsleep

    engine = policy_server.engine
    weights = _weights(tiny_model)
    before = _greedy(policy_server)
    kv, params = _held_bytes(policy_server)
    policy_server.run(engine.sleep(2))
    assert _held_bytes(policy_server) == (0, 0)
    with pytest.raises(EngineAsleep, match="discarded by a level-2 sleep"):
        policy_server.run(engine.wake())      # nothing to wake them from
    with pytest.raises(ValueError, match="lacks 1 of them"):
        policy_server.run(engine.update_weights(weights[1:]))
    assert engine.weights_discarded
    policy_server.run(engine.update_weights(weights))
    policy_server.run(engine.wake())
    assert _held_bytes(policy_server) == (kv, params)
    assert _greedy(policy_server) == before


def test_sleep_levels_other_than_1_and_2_are_refused(policy_server):
    with pytest.raises(ValueError, match="sleep level 3"):
        policy_server.run(policy_server.engine.sleep(3))


def test_sleep_aborts_a_request_in_flight_and_leaves_vllm_idle(policy_server):
    from engine.engine import EngineAsleep

    engine = policy_server.engine

    async def in_flight_then_sleep():
        stream = engine.stream(_prompt(policy_server), SamplingOptions(max_tokens=900, ignore_eos=True))
        first = await stream.__anext__()      # the request is running inside vLLM
        aborted = await engine.sleep()
        with pytest.raises(EngineAsleep):
            async for _ in stream:
                pass
        return first, aborted

    try:
        first, aborted = policy_server.run(in_flight_then_sleep())
        assert first.token_ids and aborted == 1
        state = policy_server.run(engine.vllm_state())
        assert state.sleeping and not state.unfinished_requests
    finally:
        policy_server.run(engine.wake())
    assert len(_greedy(policy_server, 3)) == 3


def test_generation_while_asleep_is_refused_and_served_after_wake(policy_server):
    import httpx

    from engine.engine import EngineAsleep

    engine = policy_server.engine
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    policy_server.run(engine.sleep())
    try:
        with pytest.raises(EngineAsleep):
            _greedy(policy_server, 2)
        r = httpx.post(f"{policy_server.base_url}/chat/completions", json=body, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_asleep"
    finally:
        policy_server.run(engine.wake())
    assert httpx.post(f"{policy_server.base_url}/chat/completions", json=body, timeout=60).status_code == 200


def test_wake_refuses_unknown_tags(policy_server):
    with pytest.raises(ValueError, match="unknown sleep tags"):
        policy_server.run(policy_server.engine.wake(["weights", "optimizer"]))
