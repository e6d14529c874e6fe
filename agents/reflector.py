"""The reflector (retrospective model): after a failed trial, writes a short diagnosis and plan for the next one."""

from __future__ import annotations

from dataclasses import dataclass

from agents.chat import ChatFormatter
from agents.trajectory import Trial

SYSTEM = (
    "You review a failed attempt at a text-game task. In at most three sentences, say what went wrong "
    "and give a concrete plan (the commands to try) for the next attempt."
)


def render_attempt(actions: list[str], observations: list[str], max_steps_shown: int) -> str:
    """The trial as `> action` / observation lines, keeping its last steps when it is long."""
    pairs = list(zip(actions, observations))
    skipped = len(pairs) - max_steps_shown
    lines = [f"(... {skipped} earlier steps ...)"] if skipped > 0 else []
    for action, obs in pairs[-max_steps_shown:]:
        lines.append(f"> {action}\n{' '.join(obs.split())}")
    return "\n".join(lines)


@dataclass
class ReflectorPrompt:
    formatter: ChatFormatter
    max_steps_shown: int = 12

    def build(self, instruction: str, first_observation: str, trial: Trial, memory: str) -> list[int]:
        actions = [s.action for s in trial.steps]
        observations = [s.observation for s in trial.steps]
        user = (
            f"{memory}Task: {instruction}\n\nStart: {' '.join(first_observation.split())}\n\n"
            f"Attempt:\n{render_attempt(actions, observations, self.max_steps_shown)}\n\n"
            f"Outcome: failed (score {trial.ret:.2f}). Write your reflection."
        )
        return self.formatter.start(SYSTEM, user)
