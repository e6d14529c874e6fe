"""What `retrorl envs` prints: each registered family, what it needs, where its tasks come from, its split sizes.

A family whose package, runtime or data is missing is listed with the error its constructor raises (that message
names the fix), so the listing doubles as an installation check. Sizes are those of the default kwargs, or of the
kwargs given for that family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .core import SPLITS, EnvError, _FAMILIES, make_env


@dataclass(frozen=True)
class FamilyRow:
    name: str
    needs: str
    data: str
    sizes: dict[str, int] | None  # None when the family cannot be built here
    problem: str = ""  # why it cannot, with the fix


def describe(name: str, **kwargs: Any) -> FamilyRow:
    factory = _FAMILIES[name]
    needs, data = getattr(factory, "needs", ""), getattr(factory, "data", "")
    try:
        env = make_env(name, **kwargs)
    except EnvError as exc:
        return FamilyRow(name, needs, data, None, str(exc))
    try:
        return FamilyRow(name, env.needs, env.data, env.split_sizes())
    except EnvError as exc:
        return FamilyRow(name, env.needs, env.data, None, str(exc))
    finally:
        env.close()


def markdown(rows: list[FamilyRow]) -> str:
    lines = ["| env | " + " | ".join(SPLITS) + " | needs | tasks from |", "|---" * (len(SPLITS) + 3) + "|"]
    for row in rows:
        sizes = [str(row.sizes[s]) for s in SPLITS] if row.sizes is not None else ["-"] * len(SPLITS)
        lines.append(f"| {row.name} | " + " | ".join(sizes) + f" | {row.needs or '-'} | {row.data} |")
    problems = [f"- {row.name}: {row.problem}" for row in rows if row.problem]
    return "\n".join(lines + ([""] + ["Not usable here:"] + problems if problems else []))
