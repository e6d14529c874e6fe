"""Expert trajectories in the agent's own format: template thoughts for the actor, templated reflections.

The env's walkthroughs hold actions only. Template thoughts give IL data the same `Thought:`/`Action:` shape as
rollouts; a templated reflection ("what went wrong, what to do instead") built from the difference between a failed
attempt and the expert's play gives the reflector its IL data.
"""

from __future__ import annotations

from agents.actor import ActorPrompt
from agents.chat import ChatFormatter
from agents.episode import TrialBuilder
from agents.memory import ReflectionMemory
from agents.parsing import parse_react
from agents.reflector import ReflectorPrompt
from agents.trajectory import ACTOR, EXPERT_VERSION, REFLECTOR, Episode, Generation, Trial, new_episode_id
from envs.demos import Replay

_THOUGHTS = {
    "go": "I should go {rest} to get closer to what the task needs.",
    "take": "I need the {rest}, so I will take it.",
    "open": "The {rest} is closed; I will open it.",
    "unlock": "The {rest} is locked; I will unlock it.",
    "drop": "I will drop the {rest} here.",
    "put": "The task wants this placed; I will put {rest}.",
    "insert": "The task wants this inside; I will insert {rest}.",
    "eat": "The task is to eat it, so I will eat the {rest}.",
    "prepare": "I have what the recipe needs, so I will prepare the {rest}.",
    "cook": "The recipe says to cook it; I will cook {rest}.",
    "slice": "The recipe says to slice it; I will slice {rest}.",
    "chop": "The recipe says to chop it; I will chop {rest}.",
    "dice": "The recipe says to dice it; I will dice {rest}.",
    "examine": "I should look at the {rest} more closely.",
    "read": "The {rest} may tell me what to do; I will read it.",
    "focus": "This is what the task is about, so I will focus {rest}.",  # rest: "on <thing>"
    "teleport": "I will teleport {rest}, where the task needs me.",  # rest: "to <room>"
}


def template_thought(action: str) -> str:
    verb, _, rest = action.partition(" ")
    template = _THOUGHTS.get(verb.lower())
    return template.format(rest=rest) if template and rest else f"Next I will {action}."


def expert_completion(action: str) -> str:
    return f"Thought: {template_thought(action)}\nAction: {action}"


def turn_ids(formatter: ChatFormatter, text: str) -> list[int]:
    """The ids of a scripted turn: the text, then eos, which the model must learn to emit."""
    return formatter.encode(text) + [formatter.eos_id]


def _expert_generation(formatter: ChatFormatter, role: str, prompt_ids: list[int], text: str) -> Generation:
    ids = turn_ids(formatter, text)
    return Generation(role, prompt_ids, ids, [0.0] * len(ids), EXPERT_VERSION, text, "expert")


def scripted_trial(prompt: ActorPrompt, replay: Replay, index: int, memory: ReflectionMemory) -> Trial:
    """A trial whose every actor turn is the template completion of the replay's action."""
    builder = TrialBuilder(prompt, index, memory, replay.instruction, replay.observation, replay.admissible)
    for transition in replay.transitions:
        text = expert_completion(transition.action)
        generation = _expert_generation(prompt.formatter, ACTOR, builder.ids, text)
        builder.add(generation, parse_react(text), transition)
    return builder.trial


def templated_reflection(failed: Replay, expert_actions: list[str]) -> str:
    """Name the first step that left the expert's path and give the expert's plan for the next attempt."""
    for i, transition in enumerate(failed.transitions):
        if i >= len(expert_actions) or transition.action != expert_actions[i]:
            wrong = f"I did '{transition.action}' when I should have done '{expert_actions[i]}'" if i < len(
                expert_actions
            ) else f"I did '{transition.action}' after the plan was done"
            break
    else:
        wrong = "I stopped before finishing the task"
    plan = ", ".join(expert_actions)
    return f"I failed because {wrong}. Next time I will follow this plan: {plan}."


def demo_episodes(
    prompt: ActorPrompt,
    reflector: ReflectorPrompt,
    env: str,
    split: str,
    expert: Replay,
    failed: Replay | None,
    memory_size: int,
) -> list[Episode]:
    """IL episodes for one task: the expert's winning play; and, given a failed attempt, that attempt, its
    templated reflection, then the expert's play with the reflection in memory. Losing replays give nothing."""
    if not expert.won:
        return []
    actions = [t.action for t in expert.transitions]
    episodes = [Episode(new_episode_id(), env, expert.task_id, split, "expert",
                        [scripted_trial(prompt, expert, 0, ReflectionMemory(memory_size))])]
    if failed is not None:
        memory = ReflectionMemory(memory_size)
        first = scripted_trial(prompt, failed, 0, memory)
        text = templated_reflection(failed, actions)
        reflection_prompt = reflector.build(failed.instruction, failed.observation, first, memory.render())
        first.reflection = _expert_generation(reflector.formatter, REFLECTOR, reflection_prompt, text)
        memory.add(text)
        episodes.append(Episode(new_episode_id(), env, expert.task_id, split, "expert",
                                [first, scripted_trial(prompt, expert, 1, memory)]))
    return episodes
