"""Building a trial's records turn by turn, the same way for sampled and for expert turns."""

from __future__ import annotations

from agents.actor import ActorPrompt
from agents.memory import ReflectionMemory
from agents.parsing import Parsed
from agents.trajectory import Generation, Step, Trial
from envs.demos import Transition


def trial_return(transition: Transition | None) -> float:
    """R_k in [0, 1]: 1 for a win, else the env's progress score at the end of the trial."""
    if transition is None:
        return 0.0
    return 1.0 if transition.won else min(max(transition.score, 0.0), 1.0)


class TrialBuilder:
    """Holds the growing actor token sequence of one trial and appends each turn's records."""

    def __init__(
        self,
        prompt: ActorPrompt,
        index: int,
        memory: ReflectionMemory,
        instruction: str,
        observation: str,
        admissible: list[str],
    ) -> None:
        self.prompt = prompt
        self.ids = prompt.start(instruction, observation, memory.render(), admissible)
        self.trial = Trial(index=index, memory=list(memory.items))

    def add(self, generation: Generation, parsed: Parsed, transition: Transition) -> None:
        if generation.prompt_ids != self.ids:
            raise ValueError("a turn must be generated from the trial's current token sequence")
        self.trial.steps.append(
            Step(
                observation=transition.observation,
                action=parsed.action,
                thought=parsed.thought,
                reward=transition.reward,
                score=transition.score,
                valid=transition.valid,
                format_ok=parsed.ok,
                generation=generation,
            )
        )
        self.trial.format_errors += 0 if parsed.ok else 1
        self.trial.ret = trial_return(transition)
        self.trial.success = transition.won
        self.ids = self.ids + generation.completion_ids + self.prompt.observe(
            generation.completion_ids, transition.observation, transition.admissible
        )
