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


def test_sleep_and_wake_are_noops_on_cpu(policy_server):
    policy_server.run(policy_server.engine.sleep())
    policy_server.run(policy_server.engine.wake())
    g = policy_server.run(policy_server.engine.generate(_prompt(policy_server), SamplingOptions(max_tokens=2)))
    assert len(g.token_ids) == 2


def test_check_weights_accepts_matching_names_and_shapes():
    check_weights([("a", torch.zeros(2, 3))], {"a": (2, 3)})
