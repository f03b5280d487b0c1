"""LoRA end to end on the tiny model: the trainer trains adapters only, vLLM serves the pushed
adapter through the GPU lifecycle (sleep, wake weights, swap adapter, wake), and samples with the
trainer's own logprobs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.engine import Engine, EngineConfig, SamplingOptions
from grpo.lora import LoraSettings
from grpo.policy import PolicyTrainer, TrainerConfig, TrainSample
from tests.conftest import _LoopThread

pytestmark = pytest.mark.slow

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
SETTINGS = LoraSettings(r=8, alpha=16)


@pytest.fixture(scope="session")
def lora_engine(tiny_model: str) -> Iterator[tuple[Engine, _LoopThread]]:
    """A second in-process engine, with LoRA. Session-scoped: vLLM's parallel groups are process
    globals, and shutting one engine down tears them down under every other engine of the process."""
    lt = _LoopThread()
    engine = lt.run(Engine(EngineConfig(model=tiny_model, max_model_len=256, seed=0, max_lora_rank=8)).start())
    yield engine, lt
    lt.run(engine.shutdown())
    lt.close()


@pytest.fixture(scope="module")
def trainer(tiny_model: str) -> PolicyTrainer:
    return PolicyTrainer(tiny_model, TrainerConfig(lr=2e-2, lora=SETTINGS), seed=0)


def greedy(engine: Engine, lt: _LoopThread) -> list[int]:
    return lt.run(engine.generate(PROMPT, SamplingOptions(temperature=0.0, max_tokens=12, ignore_eos=True))).token_ids


def one_step(trainer: PolicyTrainer) -> None:
    ids = PROMPT + [40, 41, 42, 43]
    lps = trainer.logprobs([ids])[0]
    mask = [0] * len(PROMPT) + [1] * 4
    trainer.train_step([TrainSample(ids, mask, [lp * m for lp, m in zip(lps, mask)], 1.0),
                        TrainSample(ids[:-1] + [44], mask, [lp * m for lp, m in zip(lps, mask)], -1.0)])


def test_a_lora_step_moves_the_adapters_and_leaves_every_base_weight(tiny_model):
    t = PolicyTrainer(tiny_model, TrainerConfig(lr=5e-3, lora=SETTINGS), seed=0)
    named = dict(t.model.named_parameters())
    base = {k: v.detach().clone() for k, v in named.items() if "lora_" not in k}
    adapters = {k: v.detach().clone() for k, v in named.items() if "lora_" in k}
    assert {p.requires_grad for k, p in named.items() if "lora_" not in k} == {False}
    one_step(t)
    after = dict(t.model.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert any(not torch.equal(after[k], v) for k, v in adapters.items() if "lora_B" in k)


def test_a_pushed_adapter_changes_greedy_output_and_the_engine_samples_with_the_trainers_logprobs(
        lora_engine, trainer, tmp_path):
    engine, lt = lora_engine
    before = greedy(engine, lt)
    for _ in range(3):  # the tiny model is sure of its greedy text: a few big steps move it
        one_step(trainer)
    lt.run(engine.sleep())
    lt.run(engine.load_adapter(trainer.save_adapter(tmp_path / "v1")))
    lt.run(engine.wake())
    after = greedy(engine, lt)
    assert after != before
    gen = lt.run(engine.generate(PROMPT, SamplingOptions(temperature=1.0, max_tokens=24, seed=3, ignore_eos=True)))
    train = trainer.logprobs([PROMPT + gen.token_ids])[0][len(PROMPT):]
    token_mult_prob_error = torch.tensor([g - t for g, t in zip(gen.logprobs, train)]).exp().mean().item()
    assert max(abs(g - t) for g, t in zip(gen.logprobs, train)) < 1e-4
    assert token_mult_prob_error == pytest.approx(1.0, abs=1e-4)


def test_each_push_replaces_the_adapter_in_the_gpu_order(lora_engine, trainer, tmp_path):
    engine, lt = lora_engine
    lt.run(engine.load_adapter(trainer.save_adapter(tmp_path / "a")))
    first = engine.adapter.lora_int_id
    lt.run(engine.wake())
    del engine.lifecycle[:]
    lt.run(engine.sleep())
    lt.run(engine.load_adapter(trainer.save_adapter(tmp_path / "b")))
    lt.run(engine.wake())
    assert engine.lifecycle == ["sleep:1", "wake_up:weights", "remove_lora", "add_lora", "reset_prefix_cache",
                                "wake_up:kv_cache"]
    assert engine.adapter.lora_int_id == first + 1
    assert lt.run(engine._call(lambda llm: sorted(llm.llm_engine.list_loras()))) == [first + 1]


def test_a_lora_checkpoint_holds_the_adapter_and_resumes_exactly(trainer, tiny_model, tmp_path):
    trainer.save_checkpoint(tmp_path / "policy")
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "rng_state.pt", "trainer_state.pt"]
    fresh = PolicyTrainer(tiny_model, TrainerConfig(lr=2e-2, lora=SETTINGS), seed=1)
    fresh.load_checkpoint(tmp_path / "policy")
    ids = [PROMPT + [40, 41, 42]]
    assert fresh.logprobs(ids) == trainer.logprobs(ids)
    assert fresh.step == trainer.step


def test_a_lora_trainer_refuses_to_push_full_weights(trainer):
    with pytest.raises(ValueError, match="pushes its adapter"):
        trainer.named_weights()


def test_an_engine_without_lora_refuses_an_adapter(policy_server, tmp_path: Path):
    with pytest.raises(ValueError, match="without LoRA"):
        policy_server.run(policy_server.engine.load_adapter(tmp_path))


def test_a_lora_run_trains_on_policy_and_exports_a_merged_model(tiny_model, tmp_path):
    import sqlite3
    import subprocess

    from tests.conftest import ROOT, trainer_cmd

    cmd = trainer_cmd(tiny_model, tmp_path, "lora", "--set", "model.lora={r: 8, alpha: 16}", "--set", "grpo.lr=1e-3")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    with sqlite3.connect(tmp_path / "lora" / "rollouts.db") as db:
        errors = [e for (e,) in db.execute("SELECT token_mult_prob_error FROM steps ORDER BY step")]
    assert len(errors) == 3 and all(abs(e - 1.0) < 1e-3 for e in errors)  # steps 2, 3 sample from adapters
    assert sorted(p.name for p in (tmp_path / "lora" / "adapters").iterdir()) == ["step_000003"]
    assert (tmp_path / "lora" / "model" / "model.safetensors").exists()
