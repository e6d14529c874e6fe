"""Scripted plays of a task: expert replays (kept only when they win) and deliberately failed attempts.

Both feed imitation learning: expert replays teach the actor; a failed attempt followed by the expert's winning
play gives the reflector a (failure, what-to-do-instead) pair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from envs.core import TextEnv


@dataclass
class Transition:
    action: str
    observation: str
    reward: float
    score: float
    won: bool
    valid: bool
    done: bool
    admissible: list[str] = field(default_factory=list)


@dataclass
class Replay:
    task_id: str
    instruction: str
    observation: str  # the first observation
    admissible: list[str]
    transitions: list[Transition]

    @property
    def won(self) -> bool:
        return bool(self.transitions) and self.transitions[-1].won

    @property
    def score(self) -> float:
        return self.transitions[-1].score if self.transitions else 0.0


def to_transition(action: str, step_out: tuple) -> Transition:
    obs, reward, terminated, truncated, info = step_out
    return Transition(
        action=action,
        observation=obs,
        reward=float(reward),
        score=float(info["score"]),
        won=bool(info["won"]),
        valid=bool(info["valid"]),
        done=bool(terminated or truncated),
        admissible=list(info.get("admissible") or []),
    )


def play(env: TextEnv, task_id: str, actions: list[str], seed: int | None = None) -> Replay:
    """Play `actions` in order, stopping early if the episode ends."""
    obs, info = env.reset(seed=seed, options={"task": task_id})
    replay = Replay(task_id, info["instruction"], obs, list(info.get("admissible") or []), [])
    for action in actions:
        replay.transitions.append(to_transition(action, env.step(action)))
        if replay.transitions[-1].done:
            break
    return replay


def expert_replay(env: TextEnv, task_id: str) -> Replay:
    return play(env, task_id, env.expert_actions(task_id))


def failed_replay(env: TextEnv, task_id: str, rng: random.Random, wrong_steps: int = 3) -> Replay | None:
    """Follow the expert for a random prefix, then take `wrong_steps` admissible actions off the expert's path.
    A family that lists no admissible actions (textcraft, hotpotqa) gets the expert's later steps out of order
    instead (crafting before gathering, answering before searching).

    Returns None when the attempt does not fail (no off-path action exists, or a wrong step still won).
    """
    expert = env.expert_actions(task_id)
    prefix = rng.randrange(len(expert)) if expert else 0
    replay = play(env, task_id, expert[:prefix])
    if replay.transitions and replay.transitions[-1].done:
        return None
    admissible = replay.transitions[-1].admissible if replay.transitions else replay.admissible
    avoid = {expert[prefix]} if prefix < len(expert) else set()
    for _ in range(wrong_steps):
        options = sorted(a for a in (admissible or expert[prefix + 1:]) if a not in avoid)
        if not options:
            break
        action = rng.choice(options)
        replay.transitions.append(to_transition(action, env.step(action)))
        admissible = replay.transitions[-1].admissible
        avoid = set()
        if replay.transitions[-1].done:
            break
    return None if replay.won or len(replay.transitions) == prefix else replay
