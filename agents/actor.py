"""The actor (planner): a ReAct agent that writes `Thought:` then `Action:` each turn."""

from __future__ import annotations

from dataclasses import dataclass

from agents.chat import ChatFormatter

SYSTEM = (
    "You are an agent in a text-based game. Each turn, read the observation and reply with exactly two lines:\n"
    "Thought: <one short sentence of reasoning>\n"
    "Action: <one game command>"
)


@dataclass
class ActorPrompt:
    formatter: ChatFormatter
    show_actions: bool = True  # list the env's admissible commands when it provides them
    max_listed_actions: int = 30

    def _actions(self, admissible: list[str] | None) -> str:
        if not self.show_actions or not admissible:
            return ""
        return "\nAvailable actions: " + ", ".join(admissible[: self.max_listed_actions])

    def start(self, instruction: str, observation: str, memory: str, admissible: list[str] | None) -> list[int]:
        user = f"{memory}Task: {instruction}\n\nObservation: {observation}{self._actions(admissible)}"
        return self.formatter.start(SYSTEM, user)

    def observe(self, completion_ids: list[int], observation: str, admissible: list[str] | None) -> list[int]:
        """Ids appended after the actor's completion: turn close, the observation, next generation prompt."""
        return self.formatter.close_turn(completion_ids) + self.formatter.user_turn(
            f"Observation: {observation}{self._actions(admissible)}"
        )
