"""Reflection memory: the last few reflections, placed before the task in the actor's next trial."""

from __future__ import annotations

from dataclasses import dataclass, field

HEADER = "Your memory (reflections on your earlier failed attempts at this task):"


@dataclass
class ReflectionMemory:
    size: int = 3
    items: list[str] = field(default_factory=list)

    def add(self, reflection: str) -> None:
        text = " ".join(reflection.split())
        if text:
            self.items = (self.items + [text])[-self.size :] if self.size > 0 else []

    def render(self) -> str:
        """The prompt block, or "" when empty so a first trial's prompt has no memory section at all."""
        if not self.items:
            return ""
        lines = [f"- Attempt {i + 1}: {r}" for i, r in enumerate(self.items)]
        return HEADER + "\n" + "\n".join(lines) + "\n\n"
