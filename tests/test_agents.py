"""Prompt/token building, action parsing, reflection memory and expert IL data."""

from __future__ import annotations

import pytest

from agents.actor import ActorPrompt
from agents.episode import TrialBuilder, trial_return
from agents.expert import demo_episodes, expert_completion, templated_reflection, template_thought
from agents.memory import HEADER, ReflectionMemory
from agents.parsing import parse_react
from agents.reflector import ReflectorPrompt
from agents.trajectory import EXPERT_VERSION, Episode, Generation
from envs.demos import Replay, Transition


def _t(action, obs="ok", won=False, score=0.0, valid=True, done=False):
    return Transition(action, obs, float(won), score, won, valid, done or won, ["go east", "take key"])


def _replay(actions, won_last=True):
    trs = [_t(a) for a in actions[:-1]] + [_t(actions[-1], won=won_last, score=1.0 if won_last else 0.5)]
    return Replay("tw-0", "Find the key.", "You are in a room.", ["go east", "take key"], trs)


# -- parsing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, action, ok",
    [
        ("Thought: the key is here.\nAction: take key", "take key", True),
        ("thought: go\naction:  Go East.", "go east", True),
        ("Thought: hmm\nAction: `open door`\nObservation: lies", "open door", True),
        ("Action: take key", "take key", False),  # no thought: still acted on, counted as a format error
        ("I think I should take key", "i think i should take key", False),
        ("Thought: nothing to do\nAction:", "", False),
        ("Thought: look it up\nAction: Search[Milhouse Van Houten]", "search[milhouse van houten]", True),
        ("Thought: buy\nAction: click[Buy Now]", "click[buy now]", True),
        ("Thought: go\nAction: [go east]", "go east", True),
        ("Thought: go\nAction: <`go east`>.", "go east", True),
        ("", "", False),
    ],
)
def test_parse_react(text, action, ok):
    parsed = parse_react(text)
    assert parsed.action == action
    assert parsed.ok is ok


# -- chat tokens ----------------------------------------------------------------------------------------
def test_appended_ids_equal_the_chat_template(formatter, tokenizer):
    ids = formatter.start("SYS", "hello")
    completion = formatter.encode("Thought: x\nAction: go east") + [formatter.eos_id]
    ids = ids + completion + formatter.close_turn(completion) + formatter.user_turn("Observation: a room")
    expected = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "SYS"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Thought: x\nAction: go east"},
            {"role": "user", "content": "Observation: a room"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tokenizer.decode(ids) == expected


def test_close_turn_adds_eos_only_when_missing(formatter):
    assert formatter.close_turn([5, formatter.eos_id]) == []
    assert formatter.close_turn([5, 6]) == [formatter.eos_id]


def test_trial_builder_appends_sampled_ids_unchanged(formatter):
    prompt = ActorPrompt(formatter)
    builder = TrialBuilder(prompt, 0, ReflectionMemory(), "Find the key.", "A room.", ["take key"])
    start = list(builder.ids)
    odd_ids = [9999, 12, 4242]  # ids that need not round-trip through text
    gen = Generation("actor", list(builder.ids), odd_ids, [-0.1, -0.2, -0.3], 3, "Thought: t\nAction: take key")
    builder.add(gen, parse_react(gen.text), _t("take key", won=True, score=1.0))
    assert builder.ids[: len(start)] == start
    assert builder.ids[len(start) : len(start) + 3] == odd_ids
    assert builder.ids[len(start) + 3] == formatter.eos_id  # turn closed because the model did not emit eos
    trial = builder.trial
    assert trial.success and trial.ret == 1.0 and trial.format_errors == 0
    with pytest.raises(ValueError):  # a generation from a stale context is refused
        builder.add(gen, parse_react(gen.text), _t("look"))


def test_trial_return_is_normalised():
    assert trial_return(_t("x", won=True, score=0.3)) == 1.0
    assert trial_return(_t("x", score=0.25)) == 0.25
    assert trial_return(_t("x", score=-1.0)) == 0.0
    assert trial_return(None) == 0.0


# -- memory ---------------------------------------------------------------------------------------------
def test_memory_keeps_last_three_before_the_task(formatter, tokenizer):
    memory = ReflectionMemory(size=3)
    assert memory.render() == ""
    for i in range(5):
        memory.add(f"reflection {i}\n  with   spaces")
    assert memory.items == ["reflection 2 with spaces", "reflection 3 with spaces", "reflection 4 with spaces"]
    text = tokenizer.decode(ActorPrompt(formatter).start("Find the key.", "A room.", memory.render(), None))
    assert text.index(HEADER) < text.index("Task: Find the key.")
    assert "reflection 1" not in text and "reflection 4" in text


# -- expert data ----------------------------------------------------------------------------------------
def test_template_thoughts_have_react_format():
    assert template_thought("take red key") == "I need the red key, so I will take it."
    assert template_thought("xyzzy") == "Next I will xyzzy."
    # ScienceWorld's two-word verbs: the thought names the action once ("focus on on dove" was IL data once)
    assert template_thought("focus on dove").endswith("so I will focus on dove.")
    assert template_thought("teleport to kitchen") == "I will teleport to kitchen, where the task needs me."
    parsed = parse_react(expert_completion("open door"))
    assert parsed.ok and parsed.action == "open door"


def test_templated_reflection_names_the_divergence():
    failed = _replay(["go east", "take apple", "eat apple"], won_last=False)
    text = templated_reflection(failed, ["go east", "take key"])
    assert "'take apple'" in text and "'take key'" in text and "go east, take key" in text


def test_demo_episodes(formatter):
    prompt, reflector = ActorPrompt(formatter), ReflectorPrompt(formatter)
    expert = _replay(["go east", "take key"])
    failed = _replay(["go east", "take apple"], won_last=False)
    episodes = demo_episodes(prompt, reflector, "textworld", "train", expert, failed, memory_size=3)
    assert len(episodes) == 2 and len({e.episode_id for e in episodes}) == 2
    plain, with_reflection = episodes
    assert plain.success and len(plain.trials) == 1
    assert all(s.generation.version == EXPERT_VERSION for s in plain.trials[0].steps)
    assert [s.action for s in plain.trials[0].steps] == ["go east", "take key"]
    first, second = with_reflection.trials
    assert not first.success and second.success
    assert first.reflection is not None and second.memory == [first.reflection.text]
    assert first.reflection.completion_ids[-1] == formatter.eos_id
    last = second.steps[-1].generation  # the trial's last actor prompt + completion
    assert formatter.decode(last.prompt_ids + last.completion_ids).count("Attempt 1:") == 1
    # Records survive the store's JSON round trip unchanged.
    assert Episode.from_dict(with_reflection.to_dict()) == with_reflection
    assert demo_episodes(prompt, reflector, "textworld", "train", failed, None, 3) == []  # losing expert: nothing
