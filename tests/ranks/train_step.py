"""One GRPO train_step on the tiny model, run by tests/test_ranks.py under torchrun (N gloo ranks)
or in one process; writes what the step produced to the JSON file given as argv[2]."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def samples(model: str):
    """Four groups: 4 + 4 + 2 + 3 sequences sharing their group's prompt, completions of several
    lengths; the last group's rewards were all equal (advantage 0: measured, not run backward)."""
    from grpo.policy import TrainSample

    out = []
    for g, (prompt_len, n) in enumerate([(12, 4), (20, 4), (9, 2), (15, 3)]):
        prompt = [(7 * g + i) % 500 + 10 for i in range(prompt_len)]
        for k in range(n):
            completion = [(31 * g + 17 * k + i) % 700 + 20 for i in range(3 + 2 * k)]
            ids = prompt + completion
            mask = [0] * prompt_len + [1] * len(completion)
            adv = 0.0 if g == 3 else (-1.0) ** (k + g) * (k + 1) / 3
            out.append(TrainSample(ids, mask, [-1.5 if m else 0.0 for m in mask], adv))
    return out


def fingerprints(trainer) -> dict[str, list[float]]:
    """Two numbers per tensor: its sum and a fixed weighting of its elements."""
    import torch

    return {k: [v.double().sum().item(),
                (v.double().flatten() * torch.linspace(-1, 1, v.numel(), dtype=torch.float64)).sum().item()]
            for k, v in trainer.named_weights()}


def main() -> None:
    """Step 1, a checkpoint, step 2; or with RESUME_FROM (a checkpoint of any number of ranks) only
    step 2 from it."""
    import torch

    from grpo import ranks
    from grpo.policy import PolicyTrainer, TrainerConfig

    model, out = sys.argv[1], Path(sys.argv[2])
    ranks.init()
    torch.set_num_threads(1)
    # adam_eps = 1: the update is ~lr * gradient, so the weights compare the summed gradients (with
    # a tiny eps Adam's first step is lr * sign(g), which flips on 1e-9 noise in near-zero gradients)
    cfg = TrainerConfig(lr=0.1, adam_eps=1.0, num_minibatches=int(os.environ.get("MINIBATCHES", "1")))
    trainer = PolicyTrainer(model, cfg, seed=0)
    result = {"world": ranks.world_size(), "sharded": trainer.sharded,
              "held": sum(getattr(p, "_local_tensor", p).numel() for p in trainer.model.parameters()),
              "total": sum(ranks.full(p.detach()).numel() for p in trainer.model.parameters())}
    if os.environ.get("RESUME_FROM"):
        trainer.load_checkpoint(Path(os.environ["RESUME_FROM"]))
    else:
        result["weights_before"] = fingerprints(trainer)
        stats = trainer.train_step(samples(model))
        result.update(loss=stats.loss, grad_norm=stats.grad_norm, tokens=stats.num_model_tokens, entropy=stats.entropy,
                      train_logprobs=stats.train_logprobs, weights=fingerprints(trainer))
        trainer.save_checkpoint(out.with_suffix(".ckpt"))
    trainer.train_step(samples(model))  # moves by Adam's moments from step 1 too
    result["weights_2"] = fingerprints(trainer)
    if ranks.rank() == 0:
        out.write_text(json.dumps(result))
    if ranks.world_size() > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
