"""PolicyTrainer on the tiny Qwen2 model: logprobs, one GRPO step, weights out, checkpoints."""

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.loss import LossConfig
from grpo.policy import PolicyTrainer, TrainerConfig, TrainSample, lr_factor, pack_micro_batches


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> str:  # conftest's session fixture: tests.tiny_model.tiny_model_dir()
    return tiny_model


@pytest.fixture(scope="module")
def rollouts(model_dir) -> list[tuple[list[int], list[int]]]:
    """(token_ids, loss_mask): a chat prompt (mask 0) and an answer (mask 1), as Gym rollouts give."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for q, a in [("What is 2 + 3?", "The answer is \\boxed{5}."), ("What is 7 + 1?", "8"), ("Hi", "Hello there, how are you?")]:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        p = tok.encode(prompt, add_special_tokens=False)
        c = tok.encode(a + "<|im_end|>", add_special_tokens=False)
        out.append((p + c, [0] * len(p) + [1] * len(c)))
    return out


def make_samples(trainer, rollouts, advantages):
    lps = trainer.logprobs([ids for ids, _ in rollouts])
    return [
        TrainSample(ids, mask, [lp if m else 0.0 for lp, m in zip(lps_i, mask)], adv)
        for (ids, mask), lps_i, adv in zip(rollouts, lps, advantages)
    ]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.named_weights()}


def test_pack_micro_batches_bounds_padded_tokens():
    # longest first: 10+9 -> 2*10 = 20 tokens; 4,4,3 -> 3*4 = 12
    assert pack_micro_batches([3, 10, 4, 4, 9], 20) == [[1, 4], [2, 3, 0]]
    assert pack_micro_batches([50, 1], 20) == [[0], [1]]  # too long: alone


def test_linear_lr_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    cfg = TrainerConfig(warmup_steps=2, lr_schedule="linear", total_steps=6)
    assert [lr_factor(s, cfg) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr_factor(s, TrainerConfig(warmup_steps=2)) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_logprobs_are_log_softmax_of_logits_over_the_temperature(model_dir, rollouts):
    # micro-batches of 2 padded sequences: padding must not change a sequence's logprobs
    trainer = PolicyTrainer(model_dir, TrainerConfig(temperature=0.7, micro_batch_tokens=80, dtype="float32"), seed=0)
    got = trainer.logprobs([ids for ids, _ in rollouts])
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for (ids, _), lp in zip(rollouts, got):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, :-1]
        want = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        assert lp[0] == 0.0
        torch.testing.assert_close(torch.tensor(lp[1:]), want, rtol=0, atol=1e-5)


def test_a_train_step_raises_the_logprob_of_a_rewarded_answer(model_dir, rollouts):
    trainer = PolicyTrainer(model_dir, TrainerConfig(lr=1e-4, dtype="float32"), seed=0)
    ids, mask = rollouts[0]
    samples = make_samples(trainer, [rollouts[0]], [1.0])
    before_w = weights(trainer)
    before = trainer.logprobs([ids])[0]

    stats = trainer.train_step(samples)

    after = trainer.logprobs([ids])[0]
    answer = lambda lp: sum(x for x, m in zip(lp, mask) if m)
    assert answer(after) > answer(before)
    assert any(not torch.equal(before_w[k], v) for k, v in trainer.named_weights())
    # on-policy: the engine's logprobs (here: the trainer's own) agree, nothing is clipped
    assert stats.token_mult_prob_error == pytest.approx(1.0, abs=1e-5)
    assert stats.gen_kl_error == pytest.approx(0.0, abs=1e-6)
    assert (stats.clip_low_frac, stats.clip_high_frac, stats.kl) == (0.0, 0.0, 0.0)
    assert stats.loss == pytest.approx(-1.0)  # -A * rho averaged over tokens, rho = 1
    assert stats.grad_norm > 0 and stats.entropy > 0
    assert (stats.num_tokens, stats.num_model_tokens) == (len(ids), sum(mask))
    assert stats.train_logprobs[0] == pytest.approx([x if m else 0.0 for x, m in zip(before, mask)], abs=1e-5)
    trainer.offload_optimizer()  # no-ops on CPU
    trainer.reload_optimizer()


def test_micro_batch_size_does_not_change_the_loss_or_gradient(model_dir, rollouts):
    results = []
    for micro in (20, 4096):  # one sequence per micro-batch vs the whole batch at once
        trainer = PolicyTrainer(model_dir, TrainerConfig(lr=1e-4, micro_batch_tokens=micro, dtype="float32"), seed=0)
        results.append(trainer.train_step(make_samples(trainer, rollouts, [1.0, -0.5, 2.0])))
    small, full = results
    assert small.loss == pytest.approx(full.loss, rel=1e-5)
    assert small.grad_norm == pytest.approx(full.grad_norm, rel=1e-4)
    assert small.entropy == pytest.approx(full.entropy, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_step(model_dir, rollouts):
    results = []
    for checkpointing in (False, True):
        trainer = PolicyTrainer(model_dir, TrainerConfig(gradient_checkpointing=checkpointing, dtype="float32"), seed=0)
        results.append(trainer.train_step(make_samples(trainer, rollouts, [1.0, -0.5, 2.0])))
    assert results[1].loss == pytest.approx(results[0].loss, rel=1e-6)
    assert results[1].grad_norm == pytest.approx(results[0].grad_norm, rel=1e-5)


def test_logits_in_chunks_of_16_positions_give_the_same_step_as_all_at_once(model_dir, rollouts, monkeypatch):
    import grpo.policy

    results, logprobs = [], []
    for rows_per_chunk in (16, None):  # <= 16 positions a chunk (recomputed in backward) vs one chunk
        trainer = PolicyTrainer(model_dir, TrainerConfig(lr=1e-4, dtype="float32"), seed=0)
        vocab = trainer.model.get_output_embeddings().weight.shape[0]
        monkeypatch.setattr(grpo.policy, "LOGIT_CHUNK_ELEMENTS", vocab * rows_per_chunk if rows_per_chunk else 2**40)
        logprobs.append(trainer.logprobs([ids for ids, _ in rollouts]))
        results.append(trainer.train_step(make_samples(trainer, rollouts, [1.0, -0.5, 2.0])))
    chunked, whole = results
    for a, b in zip(*logprobs):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)  # fp32 rounding of other matmul shapes
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-6)
    assert chunked.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    assert chunked.entropy == pytest.approx(whole.entropy, rel=1e-6)


def test_bfloat16_compute_trains_and_reports_its_mismatch_with_fp32_generation(model_dir, rollouts):
    fp32 = PolicyTrainer(model_dir, TrainerConfig(dtype="float32"), seed=0)
    samples = make_samples(fp32, rollouts, [1.0, -0.5, 2.0])  # "engine" logprobs in fp32
    bf16 = PolicyTrainer(model_dir, TrainerConfig(dtype="bfloat16", lr=1e-4), seed=0)
    stats = bf16.train_step(samples)
    assert 1.0 < stats.token_mult_prob_error < 1.1  # bf16 vs fp32: close, never exact
    assert stats.gen_kl_error > 0.0 and stats.grad_norm > 0.0


def test_checkpoint_round_trips_exactly(model_dir, rollouts, tmp_path):
    cfg = TrainerConfig(lr=1e-4, warmup_steps=3, dtype="float32")
    a = PolicyTrainer(model_dir, cfg, seed=0)
    a.train_step(make_samples(a, rollouts, [1.0, -1.0, 0.5]))
    a.save_checkpoint(tmp_path / "ckpt")
    saved_w = weights(a)
    saved_opt = copy.deepcopy(a.optimizer.state_dict())
    next_batch = make_samples(a, rollouts, [-1.0, 1.0, 0.0])
    stats_a = a.train_step(next_batch)

    b = PolicyTrainer(model_dir, cfg, seed=1)
    b.load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(saved_w[k], v) for k, v in b.named_weights())
    opt_b = b.optimizer.state_dict()
    assert opt_b["param_groups"] == saved_opt["param_groups"]
    for i, st in saved_opt["state"].items():
        assert all(torch.equal(st[k], opt_b["state"][i][k]) for k in st)
    assert b.step == 1

    stats_b = b.train_step(next_batch)
    assert stats_b.loss == stats_a.loss and stats_b.lr == stats_a.lr
    assert all(torch.equal(v, w) for (_, v), (_, w) in zip(a.named_weights(), b.named_weights()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no tmp left behind


def test_checkpoint_restores_rng_state(model_dir, tmp_path):
    trainer = PolicyTrainer(model_dir, TrainerConfig(), seed=0)
    trainer.save_checkpoint(tmp_path / "ckpt")
    expected = torch.rand(3)
    torch.rand(5)
    trainer.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(torch.rand(3), expected)


def test_named_weights_use_the_checkpoint_names_without_a_tied_lm_head(model_dir):
    trainer = PolicyTrainer(model_dir, TrainerConfig(), seed=0)
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        on_disk = {k: f.get_slice(k).get_shape() for k in f.keys()}
    pushed = {k: list(v.shape) for k, v in trainer.named_weights()}
    assert pushed == on_disk
    assert "lm_head.weight" not in pushed  # the tiny model ties it to the embedding
    assert all(v.dtype == torch.bfloat16 for _, v in trainer.named_weights(dtype=torch.bfloat16))


def test_kl_to_the_frozen_reference_starts_at_zero_and_grows(model_dir, rollouts):
    trainer = PolicyTrainer(model_dir, TrainerConfig(lr=1e-3, loss=LossConfig(kl_beta=0.1)), seed=0)
    first = trainer.train_step(make_samples(trainer, rollouts, [1.0, -1.0, 1.0]))
    second = trainer.train_step(make_samples(trainer, rollouts, [1.0, -1.0, 1.0]))
    assert first.kl == pytest.approx(0.0, abs=1e-7)
    assert second.kl > 1e-6


def test_minibatches_step_the_optimizer_once_each_against_the_old_logprobs(model_dir, rollouts):
    trainer = PolicyTrainer(model_dir, TrainerConfig(lr=1e-3, num_minibatches=2, dtype="float32"), seed=0)
    samples = make_samples(trainer, rollouts, [1.0, -1.0, 1.0])
    before = trainer.logprobs([ids for ids, _ in rollouts])
    stats = trainer.train_step(samples)
    assert trainer.step == 2
    # the second minibatch ran on moved weights, yet its ratios are taken against the logprobs from
    # before the step: those are what train_logprobs report, and the engine's agree with them
    for (ids, mask), lp, got in zip(rollouts, before, stats.train_logprobs):
        assert got == pytest.approx([x if m else 0.0 for x, m in zip(lp, mask)], abs=1e-5)
    assert stats.token_mult_prob_error == pytest.approx(1.0, abs=1e-5)


def test_malformed_samples_are_refused(model_dir, rollouts):
    trainer = PolicyTrainer(model_dir, TrainerConfig(), seed=0)
    ids, mask = rollouts[0]
    with pytest.raises(ValueError):  # nothing predicts position 0
        trainer.train_step([TrainSample(ids, [1] + mask[1:], [0.0] * len(ids), 1.0)])
    with pytest.raises(ValueError):  # on GPU this id would be a device-side assert
        trainer.train_step([TrainSample(ids[:-1] + [trainer.vocab_size], mask, [0.0] * len(ids), 1.0)])
    with pytest.raises(ValueError):
        trainer.train_step([TrainSample(ids, mask, [0.0] * (len(ids) - 1), 1.0)])


@pytest.mark.slow
def test_engine_and_trainer_logprobs_agree_after_a_weight_push(policy_server, model_dir, rollouts):
    """named_weights() is what the engine loads: after a push, its sampling logprobs are the trainer's."""
    from engine.engine import SamplingOptions

    trainer = PolicyTrainer(model_dir, TrainerConfig(lr=1e-2, temperature=0.7, dtype="float32"), seed=0)
    original = [(k, v.clone()) for k, v in trainer.named_weights()]
    ids, mask = rollouts[0]
    prompt = ids[: mask.index(1)]
    engine = policy_server.engine

    def sample() -> tuple[list[int], list[int], list[float]]:
        g = policy_server.run(engine.generate(prompt, SamplingOptions(temperature=0.7, max_tokens=24, seed=1)))
        n = len(g.token_ids)
        return prompt + g.token_ids, [0] * len(prompt) + [1] * n, [0.0] * len(prompt) + g.logprobs

    def mult_error(ids: list[int], gen: list[float]) -> float:
        train = trainer.logprobs([ids])[0][len(prompt):]
        return sum(math.exp(abs(a - b)) for a, b in zip(train, gen[len(prompt):])) / len(train)

    try:
        policy_server.run(engine.update_weights(original))  # whatever earlier tests left behind
        ids, mask, gen = sample()
        assert mult_error(ids, gen) == pytest.approx(1.0, abs=1e-3)
        trainer.train_step([TrainSample(ids, mask, gen, 1.0)])
        assert mult_error(ids, gen) > 1.01  # the engine now samples from stale weights

        policy_server.run(engine.update_weights(trainer.named_weights()))
        ids, mask, gen = sample()
        assert mult_error(ids, gen) == pytest.approx(1.0, abs=1e-3)
    finally:
        policy_server.run(engine.update_weights(original))


def test_token_selective_forward_applies_the_models_own_logit_scaling(tmp_path):
    # Granite divides its logits by `logits_scaling` after the LM head; training must do the same
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    GraniteForCausalLM(cfg).save_pretrained(tmp_path)
    trainer = PolicyTrainer(str(tmp_path), TrainerConfig(dtype="float32", temperature=0.7), seed=0)
    ids = torch.tensor([[5, 17, 33, 2, 60, 61, 62]])
    need = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        selective, _ = trainer._forward(trainer._net, ids, torch.ones_like(ids), need=need)
        logits = GraniteForCausalLM.from_pretrained(tmp_path).eval()(ids).logits[0, 3:6] / 0.7
    want = torch.log_softmax(logits, -1).gather(-1, ids[0, 4:, None])[:, 0]
    torch.testing.assert_close(selective[0, 4:], want, rtol=0, atol=1e-5)


def test_a_model_with_unknown_logit_post_processing_is_refused(tmp_path, monkeypatch):
    from transformers import GraniteConfig, GraniteForCausalLM

    import grpo.policy

    cfg = GraniteConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0)
    GraniteForCausalLM(cfg).save_pretrained(tmp_path)
    # as if the trainer knew nothing of Granite's scaling: the head's raw logits
    monkeypatch.setattr(grpo.policy, "output_logits", lambda model, h: model.get_output_embeddings()(h))
    with pytest.raises(ValueError, match="changes its logits after the LM head"):
        PolicyTrainer(str(tmp_path), TrainerConfig(dtype="float32"), seed=0)


def test_fewer_samples_than_minibatches_trains_one_minibatch_per_sample(model_dir, rollouts):
    # filtering left 3 samples for 4 configured minibatches: no error, 3 optimizer steps
    trainer = PolicyTrainer(model_dir, TrainerConfig(lr=1e-4, num_minibatches=4, dtype="float32"), seed=0)
    stats = trainer.train_step(make_samples(trainer, rollouts, [1.0, -0.5, 2.0]))
    assert (stats.num_minibatches, trainer.step, stats.skipped_steps) == (3, 3, 0)


def _skip_vs_run(model_dir, rollouts, advantages, cfg):
    """The same steps twice from the same weights: once as given (advantage-0 samples run forward
    only), once with each 0 replaced by 1e-30 (nonzero: run backward, contributing ~1e-30). Returns
    per run the trainer, each step's stats and the gradients of each optimizer step."""
    runs = []
    for tiny in (0.0, 1e-30):
        trainer = PolicyTrainer(model_dir, cfg, seed=0)
        grads: list[dict[str, torch.Tensor]] = []
        torch_optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        torch_optimizer.register_step_pre_hook(lambda *_, m=trainer.model, g=grads: g.append(
            {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        stats = [trainer.train_step(make_samples(trainer, rollouts, [a if a else tiny for a in advs]))
                 for advs in advantages]
        runs.append((trainer, stats, grads))
    return runs


@pytest.mark.parametrize("minibatches", [1, 2])  # 2: the skipped sample shares the first with a trained one
def test_samples_with_advantage_zero_skip_backward_and_change_nothing(model_dir, rollouts, minibatches):
    # lr 1e-5: the second minibatch's gradients are taken after the first update, which must not
    # amplify the first one's float noise
    cfg = TrainerConfig(lr=1e-5, num_minibatches=minibatches, dtype="float32")
    (_, [s], gs), (_, [r], gr) = _skip_vs_run(model_dir, rollouts, [[1.0, 0.0, -1.0]], cfg)
    masks = [sum(m) for _, m in rollouts]
    assert (s.num_model_tokens, s.backward_model_tokens) == (sum(masks), masks[0] + masks[2])
    assert (r.num_model_tokens, r.backward_model_tokens) == (sum(masks), sum(masks))
    # gradients as the optimizer receives them at each step, to 1e-4 of the largest entry: a
    # minibatch without the skipped sample packs other shapes, and CPU fp32 matmuls of a few rows
    # differ by ~3e-5 from those of more (measured); a wrong normaliser would be off by ~50%
    assert len(gs) == len(gr) == minibatches
    for step_s, step_r in zip(gs, gr):
        assert step_s.keys() == step_r.keys() and step_s
        scale = max(float(g.abs().max()) for g in step_r.values())
        for name in step_s:
            torch.testing.assert_close(step_s[name], step_r[name], rtol=0, atol=1e-4 * scale, msg=name)
    # every sample's logprobs and the on-policy metrics are still measured, the skipped one included
    for a, b in zip(s.train_logprobs, r.train_logprobs):
        assert len(a) == len(b) and a == pytest.approx(b, abs=1e-5)
    for name in ("loss", "grad_norm", "entropy", "token_mult_prob_error", "gen_kl_error", "clip_low_frac",
                 "clip_high_frac"):
        assert getattr(s, name) == pytest.approx(getattr(r, name), rel=1e-5, abs=1e-7), name
    assert s.token_mult_prob_error == pytest.approx(1.0, abs=1e-5)


def test_a_step_where_every_advantage_is_zero_still_steps_adam_on_its_moments(model_dir, rollouts):
    cfg = TrainerConfig(lr=1e-3, dtype="float32")
    (skip, [_, s], gs), (ran, [_, r], _) = _skip_vs_run(model_dir, rollouts, [[1.0, -1.0, 0.5], [0.0, 0.0, 0.0]], cfg)
    assert s.backward_model_tokens == 0 and s.grad_norm == 0.0 and skip.step == 2
    assert gs[-1].keys() == gs[0].keys() and all(not g.any() for g in gs[-1].values())
    for (k, v), (_, w) in zip(skip.named_weights(), ran.named_weights()):
        torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=k)
    assert s.token_mult_prob_error == pytest.approx(1.0, abs=1e-5) and s.entropy == pytest.approx(r.entropy)


def test_without_measuring_zero_advantage_samples_run_no_forward_and_report_on_the_trained_ones(model_dir, rollouts):
    cfg = TrainerConfig(lr=1e-3, dtype="float32", measure_zero_advantage=False)
    trainer = PolicyTrainer(model_dir, cfg, seed=0)
    stats = trainer.train_step(make_samples(trainer, rollouts, [1.0, 0.0, -1.0]))
    assert [bool(lp) for lp in stats.train_logprobs] == [True, False, True]
    masks = [sum(m) for _, m in rollouts]
    assert (stats.num_model_tokens, stats.backward_model_tokens) == (sum(masks), masks[0] + masks[2])
    assert stats.token_mult_prob_error == pytest.approx(1.0, abs=1e-5)
    flat = trainer.train_step(make_samples(trainer, rollouts, [0.0, 0.0, 0.0]))
    assert flat.train_logprobs == [[], [], []] and math.isnan(flat.token_mult_prob_error) and trainer.step == 2
