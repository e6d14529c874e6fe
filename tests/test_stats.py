"""cluster/stats.py against values worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from cluster.stats import bootstrap_ci, compare, mcnemar_exact, mean_ci, paired_t_p, success_diff


def test_exact_mcnemar():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 2 * P(X <= 0), X ~ Bin(6, 1/2)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_exact(2, 1) == 1.0  # 2 * (1 + 3) / 8 = 1, capped
    assert mcnemar_exact(0, 0) == 1.0  # no discordant task, no evidence


def test_paired_t():
    # diffs 1, 1, 1, 0: mean 0.75, sd 0.5, t = 0.75 / (0.5 / 2) = 3 on 3 df; Student's t with 3 df has the CDF
    # 1/2 + (t / (sqrt3 (1 + t^2 / 3)) + atan(t / sqrt3)) / pi.
    cdf = 0.5 + (3 / (math.sqrt(3) * 4) + math.atan(3 / math.sqrt(3))) / math.pi
    assert paired_t_p([1, 1, 1, 0]) == pytest.approx(2 * (1 - cdf))
    assert paired_t_p([1, 1, 1, 0]) == pytest.approx(0.05767, abs=1e-5)
    assert paired_t_p([0.0, 0.0, 0.0]) == 1.0 and paired_t_p([0.5, 0.5]) is None and paired_t_p([1.0]) is None


def test_mean_ci_across_seeds():
    mean, low, high = mean_ci([0.2, 0.4, 0.6])  # sd 0.2, se 0.2 / sqrt 3, t(0.975, 2 df) = 4.302653
    half = 4.302653 * 0.2 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((0.4, 0.4 - half, 0.4 + half), abs=1e-6)
    assert mean_ci([0.3]) == (0.3, None, None)


def test_bootstrap_ci():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    low, high = bootstrap_ci([0.0] * 50 + [1.0] * 50)  # mean 0.5, se 0.05: about 0.5 -+ 1.96 * 0.05
    assert 0.38 < low < 0.42 and 0.58 < high < 0.62
    assert bootstrap_ci([0.0] * 50 + [1.0] * 50) == (low, high)  # seeded: a report renders the same figures
    assert bootstrap_ci([]) is None


def test_compare_pairs_only_common_tasks():
    a = {"t1": (True, 1.0), "t2": (False, 0.5), "t3": (True, 1.0), "extra": (True, 1.0)}
    b = {"t1": (False, 0.0), "t2": (False, 0.5), "t3": (True, 1.0)}
    c = compare(a, b)
    assert (c.tasks, c.only_a, c.only_b, c.both) == (3, 1, 0, 1)
    assert c.p_success == 1.0 and c.return_diff == pytest.approx(1 / 3)
    assert c.success_diff == pytest.approx(1 / 3) and c.success_ci == success_diff(1, 1, 0, 3)[1]
    assert compare({"x": (True, 1.0)}, b) is None


def test_success_difference_interval_matches_the_published_example():
    """Newcombe's paired interval on the worked example of Fagerland, Lydersen & Laake (2017), chapter 8 (59 tasks
    won by both, 6 by the first only, 16 by the second only, 80 by neither): -0.0621, 95% CI -0.1186 to -0.0046."""
    diff, (low, high) = success_diff(59, 6, 16, 161)
    assert (round(diff, 4), round(low, 4), round(high, 4)) == (-0.0621, -0.1186, -0.0046)
    # a swap of the two policies mirrors the interval
    assert success_diff(59, 16, 6, 161)[1] == pytest.approx((-high, -low))


def test_success_difference_interval_stays_wide_with_few_discordant_tasks():
    """0 against 1 of 50 tasks does not rule out a gain (a bootstrap over tasks would say [-6, 0]); identical
    outcomes give an interval around 0; counts that do not fit the tasks are refused."""
    diff, (low, high) = success_diff(17, 0, 1, 50)
    assert diff == pytest.approx(-0.02) and low < -0.06 and high > 0.03
    assert success_diff(18, 0, 0, 50)[1][0] == pytest.approx(-success_diff(18, 0, 0, 50)[1][1])
    assert success_diff(0, 0, 0, 0) == (0.0, None)
    with pytest.raises(ValueError, match="must fit in 5 tasks"):
        success_diff(0, 4, 2, 5)


def test_success_difference_interval_covers_the_true_difference():
    """Coverage: paired outcomes drawn with a known difference (-5 points) on 50 tasks; the 95% interval holds it
    in about 95% of 2000 draws (Newcombe's method errs on the conservative side)."""
    rng = random.Random(0)
    cells = [0.3, 0.05, 0.1, 0.55]  # both, first only, second only, neither
    covered = 0
    for _ in range(2000):
        draw = rng.choices(range(4), weights=cells, k=50)
        _, (low, high) = success_diff(draw.count(0), draw.count(1), draw.count(2), 50)
        covered += low <= -0.05 <= high
    assert 0.93 <= covered / 2000 <= 0.99


def test_tasks_needed_for_a_five_point_gain():
    # (1.95996 sqrt(0.2) + 0.84162 sqrt(0.2 - 0.0025))^2 / 0.0025 = (0.87652 + 0.37403)^2 / 0.0025 = 625.5
    from cluster.stats import mcnemar_tasks_needed

    assert mcnemar_tasks_needed(0.05, 0.2) == 626
    # d = 0.1: (1.95996 * 0.31623 + 0.84162 * 0.31225)^2 / 0.0025 = (0.61979 + 0.26280)^2 / 0.0025 = 311.5
    assert mcnemar_tasks_needed(0.05, 0.1) == 312
    with pytest.raises(ValueError):
        mcnemar_tasks_needed(0.2, 0.1)  # a difference larger than the discordant fraction is impossible
