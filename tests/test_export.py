"""Export: a checkpoint becomes a plain Hugging Face folder that transformers loads with the trained
weights (LoRA merged) and that `trainer.py --serve` serves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.export import ExportError, export_checkpoint
from grpo.lora import LoraSettings
from grpo.policy import PolicyTrainer, TrainerConfig, TrainSample
from tests.conftest import ROOT

IDS = [1, 2, 3, 4, 5, 6, 7, 8, 40, 41, 42]


def trained(model: str, lora: LoraSettings | None) -> PolicyTrainer:
    t = PolicyTrainer(model, TrainerConfig(lr=1e-2, lora=lora), seed=0)
    lps = t.logprobs([IDS])[0]
    mask = [0] * 8 + [1] * 3
    t.train_step([TrainSample(IDS, mask, [lp * m for lp, m in zip(lps, mask)], 1.0),
                  TrainSample(IDS[:-1] + [50], mask, [lp * m for lp, m in zip(lps, mask)], -1.0)])
    return t


def exported_logprobs(folder: Path) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([IDS])).logits[0, :-1], -1)
    return [0.0] + logp.gather(-1, torch.tensor(IDS[1:])[:, None])[:, 0].tolist()


def test_a_full_checkpoint_exports_the_trained_weights_tokenizer_and_chat_template(tiny_model, tmp_path):
    t = trained(tiny_model, None)
    t.save_checkpoint(tmp_path / "step_000001" / "policy")
    out = export_checkpoint(tmp_path / "step_000001", tiny_model, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    trained_weights = dict(t.named_weights())
    assert trained_weights.keys() <= loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in trained_weights.items())
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    assert not (out / "trainer_state.pt").exists()


def test_a_lora_checkpoint_exports_merged_with_the_trainers_logprobs(tiny_model, tmp_path):
    t = trained(tiny_model, LoraSettings(r=8, alpha=16))
    t.save_checkpoint(tmp_path / "policy")
    out = export_checkpoint(tmp_path / "policy", tiny_model, tmp_path / "model", LoraSettings(r=8, alpha=16))
    assert not list(out.glob("adapter_*"))  # merged: loads without PEFT
    assert exported_logprobs(out) == pytest.approx(t.logprobs([IDS])[0], abs=1e-5)
    assert exported_logprobs(out) != pytest.approx(exported_logprobs(Path(tiny_model)), abs=1e-3)


def test_exporting_a_full_checkpoint_as_lora_or_a_non_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    t = PolicyTrainer(tiny_model, TrainerConfig(), seed=0)
    t.save_checkpoint(tmp_path / "policy")
    with pytest.raises(FileNotFoundError, match="not a LoRA checkpoint"):
        export_checkpoint(tmp_path / "policy", tiny_model, tmp_path / "model", LoraSettings())
    with pytest.raises(ExportError, match="is not a checkpoint"):
        export_checkpoint(tmp_path / "nothing", tiny_model, tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_a_finished_run_exports_its_model_and_serve_serves_it(short_run, tiny_model, tmp_path):
    out = short_run.runs_dir / short_run.name / "model"
    assert f"exported step_000003 to {out.resolve()}" in short_run.log
    again = subprocess.run(
        [sys.executable, "trainer.py", "config.yaml", "--set", f"run.dir={short_run.runs_dir}",
         "--set", f"run.name={short_run.name}", "--set", f"model.name={tiny_model}", "--export", str(tmp_path / "again")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    serve = subprocess.Popen(
        [sys.executable, "trainer.py", "config.yaml", "--serve", "--set", f"model.name={out}",
         "--set", "server.port=0", "--set", "model.max_model_len=512"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_for_endpoint(serve)
        body = json.dumps({"model": "policy", "max_tokens": 4, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is 2 + 3?"}]}).encode()
        req = urllib.request.Request(f"{url}/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] == 4
    finally:
        serve.terminate()
        serve.wait(60)


def wait_for_endpoint(p: subprocess.Popen, timeout_s: float = 300) -> str:
    deadline = time.time() + timeout_s
    assert p.stdout is not None
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"--serve exited with {p.wait()}")
        if line.startswith("policy endpoint "):
            return line.split()[2]
    raise AssertionError("--serve did not print its endpoint")
