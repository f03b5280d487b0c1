"""The loop's choices per step: which rollouts train and what they are judged against."""

from pathlib import Path

import pytest

from grpo.config import load_config
from grpo.loop import advantages_for
from gym.rollouts import to_rollout
from tests.test_gym_sequence import MAX_TOKENS, SINGLE_TURN

ROOT = Path(__file__).resolve().parent.parent


def _group():
    # rewards 1, 0, 0, 1; the third stopped at its token limit
    results = [SINGLE_TURN, dict(SINGLE_TURN, reward=0.0), MAX_TOKENS, SINGLE_TURN]
    return [to_rollout(r, 0, g, "sm", "a", 1.0) for g, r in enumerate(results)]


def _cfg(truncated: str):
    return load_config(ROOT / "config.yaml", {"grpo.truncated": truncated, "grpo.normalize_std": False,
                                              "grpo.rows_per_step": 1, "grpo.group_size": 4})


def test_truncated_drop_leaves_the_rollout_out_of_the_baseline_and_the_loss():
    adv, keep = advantages_for(_group(), _cfg("drop"))
    assert adv == pytest.approx([1 / 3, -2 / 3, 0.0, 1 / 3])   # baseline mean(1, 0, 1)
    assert keep == [True, True, False, True]


def test_truncated_mask_keeps_the_rollout_in_the_baseline_but_out_of_the_loss():
    adv, keep = advantages_for(_group(), _cfg("mask"))
    assert adv == pytest.approx([0.5, -0.5, -0.5, 0.5])        # baseline mean(1, 0, 0, 1)
    assert keep == [True, True, False, True]


def test_truncated_keep_trains_on_everything():
    adv, keep = advantages_for(_group(), _cfg("keep"))
    assert adv == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert keep == [True] * 4


def test_dr_grpo_drops_the_std_normalisation():
    cfg = load_config(ROOT / "config.yaml", {"grpo.loss": "dr_grpo", "grpo.normalize_std": True,
                                             "grpo.rows_per_step": 1, "grpo.group_size": 4})
    adv, _ = advantages_for(_group(), cfg)
    assert adv == pytest.approx([0.5, -0.5, -0.5, 0.5])   # r - mean, not divided by the std (0.577)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "gspo", "cispo"])
def test_the_loss_variant_reaches_the_trainer(kind):
    from trainer import trainer_config

    cfg = load_config(ROOT / "config.yaml", {"grpo.loss": kind, "grpo.ratio_clip_c": 3.0, "grpo.max_tokens": 96})
    loss = trainer_config(cfg).loss
    assert (loss.kind, loss.ratio_clip_c, loss.constant_normalizer) == (kind, 3.0, 96)


def test_the_overlong_penalty_shapes_the_reward_the_advantage_sees():
    import copy

    longer = copy.deepcopy(SINGLE_TURN)
    item = longer["response"]["output"][0]
    item["generation_token_ids"], item["generation_log_probs"] = [7, 8, 9, 10, 2], [-0.1] * 5
    group = _group()[:3] + [to_rollout(longer, 0, 3, "sm", "a", 1.0)]
    cfg = load_config(ROOT / "config.yaml", {"grpo.max_tokens": 6, "grpo.overlong_buffer": 4, "grpo.normalize_std": False,
                                             "grpo.rows_per_step": 1, "grpo.group_size": 4})
    # 3 generated tokens: -0.25, 5 tokens: -0.75 -> shaped rewards 0.75, -0.25, -0.25, 0.25; mean 0.125
    adv, _ = advantages_for(group, cfg)
    assert adv == pytest.approx([0.625, -0.375, -0.375, 0.125])
