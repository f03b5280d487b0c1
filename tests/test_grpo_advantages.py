"""Group advantages: each rollout judged against the other rollouts of its own row."""

import pytest

from grpo.advantages import group_advantages, zero_variance_groups


def test_a_group_with_equal_rewards_gets_zero_advantages():
    assert group_advantages([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], 4) == [0.0] * 8


def test_mean_baseline_without_std():
    # mean 0.25
    assert group_advantages([1, 0, 0, 0], 4, normalize_std=False) == [0.75, -0.25, -0.25, -0.25]


def test_std_normalisation_divides_by_the_sample_std():
    # sample std of [1,0,0,0]: sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert group_advantages([1, 0, 0, 0], 4, eps=0.0) == [1.5, -0.5, -0.5, -0.5]
    assert group_advantages([1, 0, 0, 0], 4) == pytest.approx([0.75 / 0.500001, -0.25 / 0.500001] + [-0.25 / 0.500001] * 2)


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    # r0: others mean 0 -> 1; r1..r3: others mean 1/3 -> -1/3
    assert group_advantages([1, 0, 0, 0], 4, baseline="leave_one_out", normalize_std=False) == pytest.approx(
        [1.0, -1 / 3, -1 / 3, -1 / 3]
    )
    assert group_advantages([1, 0, 0, 0], 4, baseline="leave_one_out", eps=0.0) == pytest.approx(
        [2.0, -2 / 3, -2 / 3, -2 / 3]
    )


def test_groups_are_independent():
    # group 1: mean 0.5, sample std sqrt(0.5); group 2: equal rewards
    adv = group_advantages([1.0, 0.0, 3.0, 3.0], 2, eps=0.0)
    assert adv == pytest.approx([0.5 ** 0.5, -(0.5 ** 0.5), 0.0, 0.0])


def test_rewards_that_do_not_fill_whole_groups_are_an_error():
    with pytest.raises(ValueError):
        group_advantages([1.0, 0.0, 1.0], 2)
    with pytest.raises(ValueError):
        group_advantages([1.0], 1, baseline="leave_one_out")


def test_zero_variance_groups_flags_groups_with_no_signal():
    assert zero_variance_groups([1, 1, 0, 1, 2, 2], 2) == [True, False, True]


def test_rollouts_left_out_of_the_baseline_get_zero_and_do_not_move_it():
    # the 4th rollout is out: baseline = mean(1, 0, 0) = 1/3
    adv = group_advantages([1, 0, 0, 1], 4, normalize_std=False, include=[True, True, True, False])
    assert adv == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0])


def test_a_group_with_one_rollout_left_has_no_leave_one_out_baseline():
    assert group_advantages([1, 0], 2, "leave_one_out", include=[True, False]) == [0.0, 0.0]


def test_overlong_penalty_falls_linearly_over_the_buffer():
    from grpo.advantages import overlong_penalty

    # max_tokens 100, buffer 20: free up to 80 tokens, -1 at 100 and beyond
    assert [overlong_penalty(n, 100, 20) for n in (80, 90, 100, 120)] == [0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(90, 100, 20, factor=0.5) == -0.25
    assert overlong_penalty(100, 100, 0) == 0.0   # buffer 0: off
