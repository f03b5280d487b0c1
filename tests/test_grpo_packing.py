"""Shared-prefix packing: the same logprobs, loss and gradients as unpacked sequences, less work."""

import pytest
import torch
from transformers import AutoTokenizer

from grpo.packing import PREFIX, build_pack, plan_packs
from grpo.policy import PolicyTrainer, TrainerConfig, TrainSample

ROWS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 21], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 30],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 40, 41, 42], [9, 9, 9]]


def test_a_group_shares_its_prefix_once_and_each_member_sees_only_its_own_continuation():
    assert plan_packs(ROWS, 100) == [[[0, 1, 2], [3]]]
    pack = build_pack(ROWS, [[0, 1, 2], [3]])
    assert pack.ids == list(range(1, 11)) + [20, 21, 30, 40, 41, 42, 9, 9, 9]
    assert pack.positions == list(range(10)) + [10, 11, 10, 10, 11, 12, 0, 1, 2]
    assert pack.member == [PREFIX] * 10 + [0, 0, 1, 2, 2, 2, 3, 3, 3]
    assert pack.index[1] == list(range(10)) + [12]
    mask = pack.attention_mask()[0, 0]
    assert mask[12].tolist() == [True] * 10 + [False, False, True] + [False] * 6   # token 30: prefix + itself
    assert not mask[16, :16].any()                                                # the 2nd group: its own tokens


def test_packs_stay_within_the_token_budget():
    assert plan_packs(ROWS, 16) == [[[0, 1, 2]], [[3]]]          # 10 + 2 + 1 + 3 = 16; 16 + 3 > 16
    packs = plan_packs(ROWS, 15)
    assert packs == [[[0, 1]], [[2]], [[3]]]                      # the group split: 13, then 13, 3
    assert all(len(build_pack(ROWS, p)) <= 15 for p in packs)


@pytest.fixture(scope="module")
def samples(tiny_model) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask): a group of 4 answers to one prompt, and 3 two-turn rollouts that share
    their first call and diverge after it."""
    tok = AutoTokenizer.from_pretrained(tiny_model)

    def chat(*turns: str) -> tuple[list[int], list[int]]:
        ids, mask = [], []
        for k, text in enumerate(turns):
            piece = tok.encode(text, add_special_tokens=False)
            ids += piece
            mask += [k % 2] * len(piece)
        return ids, mask

    user = "<|im_start|>user\nWhat is 7 + 5? Put your final answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    group = [chat(user, a + "<|im_end|>") for a in ("\\boxed{12}", "It is 12.", "\\boxed{13}", "Twelve, so \\boxed{12}")]
    first = chat(user, "\\boxed{12}<|im_end|>")
    multi = [chat(user, "\\boxed{12}<|im_end|>", f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                  a + "<|im_end|>") for q, a in (("And 8 + 1?", "9"), ("Sure?", "Yes."), ("Why?", "Counting."))]
    assert all(ids[: len(first[0])] == first[0] for ids, _ in multi)
    return group + multi


def _trainer(tiny_model, packed: bool) -> PolicyTrainer:
    cfg = TrainerConfig(lr=1e-4, dtype="float32", temperature=0.7, pack_shared_prefix=packed, micro_batch_tokens=4096)
    return PolicyTrainer(tiny_model, cfg, seed=0)


def test_packed_logprobs_equal_unpacked(tiny_model, samples):
    rows = [ids for ids, _ in samples]
    packed = _trainer(tiny_model, True).logprobs(rows)
    padded = _trainer(tiny_model, False).logprobs(rows)
    for a, b in zip(packed, padded):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)


def test_a_packed_training_step_equals_the_unpacked_one(tiny_model, samples):
    # gradients as the optimizer receives them (fp32, tolerance 1e-5 of the largest entry)
    results = []
    for packed in (True, False):
        trainer = _trainer(tiny_model, packed)
        model = trainer.model
        grads: dict[str, torch.Tensor] = {}
        torch_optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        torch_optimizer.register_step_pre_hook(
            lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        rows = [ids for ids, _ in samples]
        lps = trainer.logprobs(rows)
        batch = [TrainSample(ids, mask, [lp if m else 0.0 for lp, m in zip(lp_row, mask)], adv)
                 for (ids, mask), lp_row, adv in zip(samples, lps, [1.0, -0.5, -1.0, 0.5, 0.8, -0.3, -0.5])]
        results.append((trainer.train_step(batch), grads))
    (a, ga), (b, gb) = results
    assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-7)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert a.entropy == pytest.approx(b.entropy, rel=1e-5)
    assert ga.keys() == gb.keys() and ga
    scale = max(float(g.abs().max()) for g in gb.values())
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-5 * scale)
