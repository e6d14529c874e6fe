"""The evaluation protocol (ALGORITHMS.md): IR / FR / AR / success per method and split, as a table."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from statistics import mean
from typing import Any

from agents.trajectory import Episode


def padded_returns(episode: Episode, trials: int) -> list[float]:
    """Returns of all K trials: an episode stops after a win, and the trials it skipped count as that win."""
    returns = episode.returns[:trials] or [0.0]
    return returns + [returns[-1]] * (trials - len(returns))


def summarise(episodes: Iterable[Episode], trials: int) -> dict[str, Any]:
    episodes = list(episodes)
    if not episodes:
        return {"episodes": 0}
    padded = [padded_returns(e, trials) for e in episodes]
    # Only the first `trials` trials count, so a one-trial (ReAct) row reports no reflections and its own steps.
    reflections = [
        (e.trials[i].ret, e.trials[i + 1].ret)
        for e in episodes
        for i in range(min(trials, len(e.trials)) - 1)
        if e.trials[i].reflection is not None
    ]
    first = [e.trials[0] for e in episodes if e.trials]
    return {
        "episodes": len(episodes),
        "trials": trials,
        "IR": mean(p[0] for p in padded),
        "FR": mean(p[-1] for p in padded),
        "AR": mean(mean(p) for p in padded),
        # mean padded return at trial 1..K: the curve whose first point is IR, last FR and mean AR
        "returns_per_trial": [mean(p[k] for p in padded) for k in range(trials)],
        "success": mean(1.0 if any(t.success for t in e.trials[:trials]) else 0.0 for e in episodes),
        # which tasks, so two runs on the same tasks can be compared game by game (retrorl report)
        "solved": sorted(e.task_id for e in episodes if any(t.success for t in e.trials[:trials])),
        "first_success": mean(1.0 if t.success else 0.0 for t in first),
        "avg_steps": mean(len(t.steps) for e in episodes for t in e.trials[:trials]),
        "format_error_rate": _ratio(sum(t.format_errors for e in episodes for t in e.trials[:trials]),
                                    sum(len(t.steps) for e in episodes for t in e.trials[:trials])),
        "reflections": len(reflections),
        "reflection_improved": _ratio(sum(after > before for before, after in reflections), len(reflections)),
        # per task, so any two runs on the same tasks can be compared with paired statistics (cluster/stats.py)
        # and a table recomputed from the committed results alone
        "outcomes": [_outcome(e, p, trials) for e, p in zip(episodes, padded)],
    }


def _outcome(episode: Episode, padded: list[float], trials: int) -> dict[str, Any]:
    played = episode.trials[:trials]
    kind = {"kind": episode.tags["kind"]} if "kind" in episode.tags else {}  # none if stored before the tag
    return {"task": episode.task_id, **kind, "returns": padded, "success": any(t.success for t in played),
            "steps": sum(len(t.steps) for t in played),
            "versions": sorted({s.generation.version for t in played for s in t.steps})}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def eval_phase(label: str) -> str:
    """The trajectory-store phase of an evaluation labelled `label` ("SFT" -> "eval-sft")."""
    return f"eval-{label.lower().replace(' ', '-')}"


def evaluate(episodes: Iterable[Episode], label: str, trials: int) -> list[dict[str, Any]]:
    """Per split: the first trial alone is the ReAct agent (greedy retries without memory would repeat it), and,
    when K > 1, all K trials are the agent with its reflector (at K = 1 no reflection is written: that row would
    repeat the ReAct row)."""
    by_split: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_split[e.split].append(e)
    rows = []
    for split in sorted(by_split):
        react = summarise(by_split[split], 1)
        rows.append({"method": f"{label} ReAct", "split": split, **react})
        if trials > 1:
            rows.append({"method": f"{label} + reflection", "split": split, **summarise(by_split[split], trials)})
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return "-" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Returns and rates x100, as the papers report them."""
    cols = ["method", "split", "episodes", "trials", "IR", "FR", "AR", "success", "avg_steps",
            "format_error_rate", "reflection_improved"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if c == "avg_steps" else _fmt(row.get(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
