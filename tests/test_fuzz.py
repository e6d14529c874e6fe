"""Bounded fuzzing (seeded, a few seconds): malformed input is either accepted or one clean error, never another
exception. Config: random and malformed `--set` assignments through the CLI's config loading. Actions: random and
malformed completions through agents.parsing and a TextWorld env's step."""

from __future__ import annotations

import random
import string

import pytest
from pydantic import BaseModel

from agents.parsing import parse_react
from cluster.config import Config, ConfigError, load_config

_SEED = 23
_ODD_VALUES = ["", "[", "]", "{", "{a:", "{a: [1,", "!!python/object:os.system", "&a", "*a", "---", "...", "~", "null",
               "-1", "0", "1e999", "-1e-9", ".nan", ".inf", "0x10", "1_000", "true", "no", "[1, [2, {a: b}]]",
               "{n_train: a}", "{kinds: 3}", "'unterminated", "\"x", "%", "@x", "`x`", "a: b: c", "\t", "é", "\x00",
               "[" * 200, "9" * 400, "- - -", "? x", "{? x}", "[q_proj, 3]", "{r: -1}"]


def _keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every config key, dotted, sections included."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _keys(field.annotation, f"{prefix}{name}.")
    return keys


def _value(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(_ODD_VALUES)
    if kind == 1:
        return str(rng.choice([rng.randint(-10**6, 10**6), rng.uniform(-1e3, 1e3)]))
    if kind == 2:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(12)))
    if kind == 3:
        return f"[{', '.join(_value(rng) for _ in range(rng.randrange(3)))}]"
    return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(6)))


def _assignment(rng: random.Random, keys: list[str]) -> str:
    key = rng.choice(keys)
    roll = rng.random()
    if roll < 0.1:
        key += "." + rng.choice(["x", "", "r", "0"])
    elif roll < 0.15:
        key = key.replace(".", rng.choice(["..", "/", " "]))
    elif roll < 0.2:
        return rng.choice(["", "=", "==", "novalue", ".=1", "a.b.c.d=e"])
    return f"{key}={_value(rng)}"


def test_fuzz_config_overrides_are_a_config_or_one_config_error():
    rng = random.Random(_SEED)
    keys = _keys()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(600):
        overrides = [_assignment(rng, keys) for _ in range(rng.randrange(1, 4))]
        try:
            cfg = load_config(None, overrides)
        except ConfigError as exc:
            assert str(exc) and "\n" not in str(exc), (overrides, str(exc))  # the CLI prints it as one line
            outcomes["error"] += 1
        else:
            # A valid config survives its own round trip (RunDir writes it to config.yaml; --resume reads it).
            assert Config.model_validate(cfg.model_dump()) == cfg
            outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["error"] > 100, outcomes  # both paths were exercised


def _completion(rng: random.Random) -> str:
    parts = ["Thought:", "Action:", "action :", "ACTION：", "Thought: go\n", "\n", " ", "``", "\"", "[", "]", ".", "!",
             "go east", "take key", "\\help", "quit", "restart", "save", "x" * 300, "\x00", "\t", "é", "🙂", "\r\n"]
    return "".join(rng.choice(parts) if rng.random() < 0.7 else rng.choice(string.printable)
                   for _ in range(rng.randrange(12)))


def test_fuzz_react_parsing_never_raises():
    rng = random.Random(_SEED)
    for _ in range(3000):
        text = _completion(rng)
        parsed = parse_react(text)
        assert isinstance(parsed.action, str) and len(parsed.action) <= 200 and "\n" not in parsed.action
        assert not parsed.ok or (parsed.action and "action" in text.lower())  # ok needs a non-empty Action line


@pytest.fixture(scope="module")
def textworld():
    from envs import TextWorldEnv

    env = TextWorldEnv(kinds=["treasure"], n_train=1, n_seen=0, n_unseen=0, n_valid=0)
    env.prepare()
    yield env
    env.close()


def test_fuzz_textworld_steps_report_invalid_actions_and_never_raise(textworld):
    rng = random.Random(_SEED)
    task = textworld.tasks("train")[0].task_id
    for episode in range(3):
        obs, info = textworld.reset(options={"task": task})
        admissible = set(info["admissible"])
        for _ in range(40):
            action = parse_react(_completion(rng)).action if rng.random() < 0.8 else _completion(rng)
            obs, reward, terminated, truncated, info = textworld.step(action)
            assert isinstance(obs, str) and obs and reward in (0.0, 1.0)
            assert isinstance(info["valid"], bool) and 0.0 <= info["score"] <= 1.0
            if action.strip().lower() not in admissible:
                assert not info["valid"], action
            admissible = set(info["admissible"])
            if terminated or truncated:
                break


# Per family: the packages it needs (the extras `make setup` installs) and a few tasks' constructor options.
_FAMILIES = {
    "alfworld": (("alfworld", "fast_downward"), {"task_types": ["pick_and_place_simple"], "n_train": 1,
                                                 "n_seen": 1, "n_unseen": 1}),
    "twx": (("textworld_express",), {"games": ["coin"], "n_train": 1, "n_seen": 1, "n_unseen": 1}),
    "textcraft": (("textcraft",), {"n_train": 2, "n_seen": 1, "n_unseen": 0}),
    "hotpotqa": ((), {"n_train": 2, "n_seen": 2, "n_unseen": 2}),
}


@pytest.mark.parametrize("family", ["alfworld", "twx", "textcraft", "hotpotqa"])
def test_fuzz_every_familys_steps_are_observations_never_errors(family, tmp_path):
    """Random and malformed actions (what a policy can emit) against each family: every step answers with a
    non-empty observation free of control characters and a well-formed outcome; nothing raises."""
    import importlib.util
    import shutil

    from envs import make_env

    packages, kwargs = _FAMILIES[family]
    if any(importlib.util.find_spec(p) is None for p in packages) or (family == "twx" and not shutil.which("java")):
        pytest.skip(f"needs {', '.join(packages)} (and Java for twx)")
    if family == "hotpotqa":  # no registry ships HotpotQA: a few questions in its format (tests/hotpotqa_data.py)
        from hotpotqa_data import write_questions

        kwargs = {**kwargs, "data_file": str(write_questions(tmp_path / "hotpot.json")), "cache_dir": str(tmp_path)}
    env = make_env(family, **kwargs)
    rng = random.Random(_SEED)
    try:
        task = env.tasks("train")[0].task_id
        for _ in range(2):
            env.reset(options={"task": task})
            for _ in range(25):
                action = parse_react(_completion(rng)).action if rng.random() < 0.8 else _completion(rng)
                obs, reward, terminated, truncated, info = env.step(action)
                assert isinstance(obs, str) and obs.strip(), (family, action)
                assert not any(ord(c) < 32 and c not in "\n\t" for c in obs), (family, action, obs)
                assert reward in (0.0, 1.0) and 0.0 <= info["score"] <= 1.0 and isinstance(info["valid"], bool)
                if terminated or truncated:
                    break
    finally:
        env.close()
