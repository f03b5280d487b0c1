"""N training ranks (torchrun, gloo on CPU) take exactly the step one process takes on the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.packing import packed_length
from grpo.ranks import share
from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "ranks" / "train_step.py"


def test_ranks_share_a_batch_by_whole_groups_balanced_by_packed_tokens():
    rows = [[1] * 10 + [2], [1] * 10 + [3], [5] * 30 + [6], [5] * 30 + [7], [8] * 12, [9] * 12]
    shares = [share(rows, range(6), 2, r) for r in range(2)]
    assert shares == [[2, 3], [0, 1, 4, 5]]
    assert [sum(packed_length(rows, [i]) for i in s) for s in shares] == [62, 46]
    assert share(rows, [0, 1], 1, 0) == [0, 1]


def run_step(tmp: Path, model: str, ranks: int, minibatches: int = 1) -> dict:
    out = tmp / f"step-{ranks}-{minibatches}.json"
    env = {**os.environ, "MINIBATCHES": str(minibatches), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, str(SCRIPT)] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(SCRIPT)]
    p = subprocess.run(launcher + [model, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("minibatches", [1, 2])
def test_two_gloo_ranks_take_the_one_process_step(tiny_model, tmp_path, minibatches):
    one = run_step(tmp_path, tiny_model, 1, minibatches)
    two = run_step(tmp_path, tiny_model, 2, minibatches)
    assert (one["world"], two["world"]) == (1, 2)
    assert two["tokens"] == one["tokens"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)  # fp32, other summation order
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert two["entropy"] == pytest.approx(one["entropy"], rel=1e-5)
    for a, b in zip(two["train_logprobs"], one["train_logprobs"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert two["weights"].keys() == one["weights"].keys()
    for k, v in one["weights"].items():
        assert two["weights"][k] == pytest.approx(v, rel=1e-5, abs=1e-5), k  # fp32 over millions of elements
    moved = [k for k, v in one["weights"].items() if v != pytest.approx(one["weights_before"][k], abs=1e-4)]
    assert len(moved) == len(one["weights"])  # the step moved every tensor: the comparison is not vacuous
