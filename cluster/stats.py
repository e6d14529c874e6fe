"""Paired statistics for comparing two evaluations on the same tasks, and a mean's interval across seeds.

Two runs evaluated on the same task ids give paired outcomes per task: success (won within the row's trials) and
return (the row's last padded trial return: IR for a one-trial row, FR for a K-trial row). Success is compared with
an exact McNemar test (only the discordant tasks carry information: a two-sided binomial test of `only_a` against
`only_a + only_b` at 1/2), and its effect size is the success-rate difference with Newcombe's paired score 95% CI
(what a negative result rules out: an interval whose upper end is +5 points excludes a gain of 10); returns with a
paired t-test and a percentile-bootstrap 95% CI of the mean difference. Across seeds, a t interval of the mean.
scipy provides the distributions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

LEVEL = 0.95  # every interval here
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # a report renders the same figures every time


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    from scipy.stats import binom

    n = only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2 * float(binom.cdf(min(only_a, only_b), n, 0.5)))


def paired_t_p(diffs: Sequence[float]) -> float | None:
    """Two-sided p of a paired t-test on the differences; 1.0 when they are all equal to 0, None when undefined
    (fewer than 2 pairs, or all equal but not 0)."""
    from scipy.stats import t as student

    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else None
    return float(2 * student.sf(abs(mean / (sd / math.sqrt(n))), n - 1))


def bootstrap_ci(diffs: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval (LEVEL) of the mean of `diffs`; None without any."""
    if not diffs:
        return None
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    tail = (1 - LEVEL) / 2
    return means[int(tail * resamples)], means[min(resamples - 1, int((1 - tail) * resamples))]


def wilson_ci(successes: int, n: int) -> tuple[float, float]:
    """Wilson score interval (LEVEL) of a binomial proportion."""
    from scipy.stats import norm

    z = norm.ppf(1 - (1 - LEVEL) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def success_diff(both: int, only_a: int, only_b: int, tasks: int) -> tuple[float, tuple[float, float] | None]:
    """The success-rate difference a - b over `tasks` paired tasks and its LEVEL interval: Newcombe's hybrid
    score interval for paired proportions (Stat Med 1998;17:2635, method 10), Wilson intervals of both rates
    combined through the correlation of the paired outcomes. Unlike a bootstrap over tasks it stays wide when few
    tasks are discordant (0 against 1 of 50 does not rule out a gain)."""
    neither = tasks - both - only_a - only_b
    if min(both, only_a, only_b, neither) < 0:
        raise ValueError(f"won by both ({both}), by a only ({only_a}), by b only ({only_b}) must fit in {tasks} tasks")
    if tasks == 0:
        return 0.0, None
    p1, p2 = (both + only_a) / tasks, (both + only_b) / tasks
    (l1, u1), (l2, u2) = wilson_ci(both + only_a, tasks), wilson_ci(both + only_b, tasks)
    # The correlation of the paired outcomes, a positive one shrunk by a continuity correction of tasks / 2
    # (Newcombe's phi-hat; Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables, 2017, sec. 8.5).
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    cross = cross - tasks / 2 if cross > tasks / 2 else min(cross, 0)
    phi = cross / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return diff, (max(-1.0, diff - below), min(1.0, diff + above))


def mean_ci(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean and its t interval (LEVEL); no interval from a single value."""
    from scipy.stats import t as student

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    half = student.ppf(1 - (1 - LEVEL) / 2, n - 1) * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, mean - half, mean + half


def mcnemar_tasks_needed(delta: float, discordant: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Tasks a paired success comparison needs to detect a success-rate difference `delta` with McNemar's test
    (two-sided `alpha`, the given power), when a fraction `discordant` of tasks is won by exactly one of the two
    policies (Connor 1987's normal approximation: n = (z_a sqrt(d) + z_b sqrt(d - delta^2))^2 / delta^2)."""
    from scipy.stats import norm

    if not 0 < abs(delta) <= discordant <= 1:
        raise ValueError("need 0 < |delta| <= discordant <= 1")
    z_a, z_b = norm.ppf(1 - alpha / 2), norm.ppf(power)
    return math.ceil((z_a * math.sqrt(discordant) + z_b * math.sqrt(discordant - delta**2)) ** 2 / delta**2)


@dataclass(frozen=True)
class Paired:
    tasks: int  # tasks evaluated by both
    only_a: int  # won by a, not by b
    only_b: int
    both: int
    p_success: float  # exact McNemar
    success_diff: float  # success rate of a - b
    success_ci: tuple[float, float] | None
    return_diff: float | None = None  # mean of a - b; None: compared on success alone
    return_ci: tuple[float, float] | None = None
    p_return: float | None = None  # paired t


def from_counts(both: int, only_a: int, only_b: int, tasks: int) -> Paired:
    """The success side of a comparison, which the counts of tasks won by both and by each alone determine."""
    return Paired(tasks, only_a, only_b, both, mcnemar_exact(only_a, only_b), *success_diff(both, only_a, only_b, tasks))


def compare(a: Mapping[str, tuple[bool, float]], b: Mapping[str, tuple[bool, float]]) -> Paired | None:
    """`a` against `b` over the tasks both evaluated: task id -> (success, return). None when they share none."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    only_a = sum(a[t][0] and not b[t][0] for t in common)
    only_b = sum(b[t][0] and not a[t][0] for t in common)
    both = sum(a[t][0] and b[t][0] for t in common)
    diffs = [a[t][1] - b[t][1] for t in common]
    return replace(from_counts(both, only_a, only_b, len(common)), return_diff=sum(diffs) / len(diffs),
                   return_ci=bootstrap_ci(diffs), p_return=paired_t_p(diffs))
