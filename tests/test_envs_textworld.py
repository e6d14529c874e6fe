"""The textworld family: API shape, expert replays, invalid actions, truncation, the game cache, errors.

Builds 10 small games (5 treasure, 5 cooking) once per module into a temp cache (~15 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import gymnasium as gym
import pytest

import envs
from envs import INVALID_ACTION_OBS, SPLITS, EnvError, TextWorldEnv, make_env
from envs.textworld_env import KINDS, max_steps_for

SMALL = dict(n_train=4, n_seen=2, n_unseen=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tw-cache")


@pytest.fixture(scope="module")
def env(cache: Path):
    e = TextWorldEnv(cache_dir=cache, **SMALL)
    e.prepare()
    yield e
    e.close()


def _all_tasks(env: TextWorldEnv):
    return [t for split in SPLITS for t in env.tasks(split)]


def _game_files(cache: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (cache / "textworld").glob("*/seed-*/*")}


def test_task_lists(env: TextWorldEnv, cache: Path):
    counts = {split: len(env.tasks(split)) for split in SPLITS}
    assert counts == {"train": 4, "valid": 2, "seen": 2, "unseen": 2}  # valid: as many as seen
    tasks = _all_tasks(env)
    assert len({t.task_id for t in tasks}) == len(tasks)
    for split in SPLITS:
        assert {t.kind for t in env.tasks(split)} == {"treasure", "cooking"}  # spread over the kinds
    for t in tasks:
        kind, split, idx = t.task_id.split("-")
        assert (kind, split) == (t.kind, t.split) and len(idx) == 4
        walkthrough = env.expert_actions(t.task_id)
        assert t.max_steps == max_steps_for(walkthrough) >= len(walkthrough) + 4
        if t.split != "unseen":
            assert 2 <= len(walkthrough) <= 8, (t, walkthrough)
        assert env.task(t.task_id) == t
    # Interleaved over the kinds: a smaller count's tasks (the same games, from the cache) are a prefix.
    assert [t.kind for t in env.tasks("train")] == ["treasure", "cooking"] * 2
    smaller = TextWorldEnv(cache_dir=cache, **{**SMALL, "n_train": 2})
    assert smaller.tasks("train") == env.tasks("train")[:2]
    # train and seen share settings but are different games
    digests = {t.task_id: hashlib.sha1((Path(env._meta(t.task_id)["dir"]) / "tw-game.z8").read_bytes()).hexdigest()
               for t in tasks}
    assert len(set(digests.values())) == len(digests)


def test_valid_split_is_seen_settings_with_its_own_seeds(env: TextWorldEnv, cache: Path):
    default = TextWorldEnv(cache_dir=cache)
    assert default.split_sizes() == {"train": 12, "valid": 4, "seen": 4, "unseen": 4}  # listed without building
    assert TextWorldEnv(cache_dir=cache, n_valid=3).split_sizes()["valid"] == 3
    ids = {split: [t.task_id for t in env.tasks(split)] for split in SPLITS}
    assert ids["valid"] == ["treasure-valid-0000", "cooking-valid-0000"]
    # the other splits' ids and games are what they were before valid existed (recorded then)
    assert ids["train"][:3] == ["treasure-train-0000", "cooking-train-0000", "treasure-train-0001"]
    assert ids["seen"] == ["treasure-seen-0000", "cooking-seen-0000"]
    assert ids["unseen"] == ["treasure-unseen-0000", "cooking-unseen-0000"]
    metas = {tid: env._meta(tid) for split in SPLITS for tid in ids[split]}
    seeds = {tid: m["seed"] % 100_003 for tid, m in metas.items()}  # the first seed tried (+ k * retry stride)
    assert seeds["treasure-train-0000"] == 10_000 and seeds["cooking-seen-0000"] == 20_000
    assert seeds["treasure-unseen-0000"] == 30_000 and seeds["cooking-valid-0000"] == 40_000
    for tid in ids["valid"]:  # seen's settings and cache folder, another game
        twin = tid.replace("valid", "seen")
        assert metas[tid]["settings"] == metas[twin]["settings"]
        assert Path(metas[tid]["dir"]).parent == Path(metas[twin]["dir"]).parent
    assert len({m["dir"] for m in metas.values()}) == len(metas)


def test_reset_and_step_api(env: TextWorldEnv):
    task = env.tasks("train")[-1]
    obs, info = env.reset(options={"task": task.task_id})
    assert isinstance(obs, str) and obs and "$$" not in obs  # the ASCII banner is gone
    assert set(info) >= {"instruction", "task_id", "max_steps", "admissible"}
    assert info["task_id"] == task.task_id and info["max_steps"] == task.max_steps and info["kind"] == task.kind
    assert info["instruction"] and info["instruction"] not in obs
    assert info["admissible"] == sorted(info["admissible"]) and all(isinstance(a, str) for a in info["admissible"])
    obs, reward, terminated, truncated, sinfo = env.step(info["admissible"][0])
    assert isinstance(obs, str) and obs
    # One step into a game of max_steps > 1: not over, not cut off, and the reward is the win indicator.
    assert (reward, terminated, truncated) == (float(sinfo["won"]), sinfo["won"], False)
    assert set(sinfo) >= {"score", "won", "valid", "admissible"}
    assert 0.0 <= sinfo["score"] <= 1.0 and sinfo["valid"] is True


def test_every_expert_walkthrough_wins(env: TextWorldEnv):
    for task in _all_tasks(env):
        env.reset(options={"task": task.task_id})
        actions = env.expert_actions(task.task_id)
        for i, action in enumerate(actions):
            obs, reward, terminated, truncated, info = env.step(action)
            assert info["valid"], (task.task_id, action)
            assert 0.0 <= info["score"] <= 1.0
            assert terminated == (i == len(actions) - 1), (task.task_id, i, obs)
        assert info["won"] and info["score"] == 1.0 and reward == 1.0 and not truncated, task.task_id
        # after the end the outcome stays, and nothing is forwarded to the interpreter
        obs, reward, terminated, _, info = env.step("look")
        assert terminated and info["won"] and obs == INVALID_ACTION_OBS


def test_invalid_actions_are_observations(env: TextWorldEnv):
    task = env.tasks("seen")[0]
    env.reset(options={"task": task.task_id})
    for action in ["dance wildly", "", "   ", "quit", "restart", "script", "take the moon\nand the stars", "x" * 2000, "\\help", "\\cm"]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, str) and obs, action
        assert info["valid"] is False and not terminated and reward == 0.0, action
    assert env.step("quit")[0] == INVALID_ACTION_OBS and env.step("\\help")[0] == INVALID_ACTION_OBS
    # the game state is intact: the walkthrough still wins
    for action in env.expert_actions(task.task_id):
        *_, info = env.step(action)
    assert info["won"]


def test_truncation_at_max_steps(env: TextWorldEnv):
    task = env.tasks("unseen")[0]
    _, info = env.reset(options={"task": task.task_id})
    for i in range(task.max_steps):
        _, _, terminated, truncated, step_info = env.step("look")
        assert not terminated and truncated == (i == task.max_steps - 1)
        assert step_info["valid"] and step_info["score"] == 0.0


def test_task_switching_with_small_lru(cache: Path, env: TextWorldEnv):
    small = TextWorldEnv(cache_dir=cache, max_loaded=1, **SMALL)
    try:
        for task in _all_tasks(small)[:3] * 2:
            obs, info = small.reset(options={"task": task.task_id})
            assert info["task_id"] == task.task_id and obs
            assert len(small._loaded) == 1
    finally:
        small.close()


def test_cache_is_reused(env: TextWorldEnv, cache: Path, monkeypatch):
    import envs._twbuild

    before = _game_files(cache)
    assert before and not any(".tmp-" in p for p in before)
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}

    def no_build(specs, workers):
        raise AssertionError(f"rebuilt {[s['task_id'] for s in specs]} from a complete cache")

    monkeypatch.setattr(envs._twbuild, "build_games", no_build)
    again = TextWorldEnv(cache_dir=cache, **SMALL)
    again.prepare()
    assert _game_files(cache) == before  # nothing rebuilt, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [t for s in SPLITS for t in again.tasks(s)] == _all_tasks(env)


def test_half_built_games_are_never_used(env: TextWorldEnv, cache: Path):
    task = env.tasks("seen")[1]
    game_dir = Path(env._meta(task.task_id)["dir"])
    meta_before = (game_dir / "meta.json").read_text()
    # a crash mid-build leaves a temp folder (never read) and no final folder
    stale = game_dir.parent / f".tmp-{game_dir.name}-12345-deadbeef"
    shutil.copytree(game_dir, stale)
    (stale / "tw-game.z8").write_bytes(b"truncated")
    shutil.rmtree(game_dir)
    fresh = TextWorldEnv(cache_dir=cache, **SMALL)
    try:
        assert fresh.expert_actions(task.task_id) == env.expert_actions(task.task_id)
        assert not stale.exists()
        assert (game_dir / "meta.json").read_text() == meta_before  # rebuilt identically (fixed seeds)
        fresh.reset(options={"task": task.task_id})
        for action in fresh.expert_actions(task.task_id):
            *_, info = fresh.step(action)
        assert info["won"]
    finally:
        fresh.close()


def test_make_env_and_gym_make(cache: Path):
    env = make_env("textworld", cache_dir=cache, **SMALL)
    assert "textworld" in envs.families() and env.family == "textworld"
    assert [t.task_id for s in SPLITS for t in env.tasks(s)] == [t.task_id for s in SPLITS for t in
                                                                   TextWorldEnv(cache_dir=cache, **SMALL).tasks(s)]
    env.close()
    genv = gym.make("retrorl/textworld-v0", cache_dir=cache, **SMALL)
    try:
        task = genv.unwrapped.tasks("train")[0]
        obs, info = genv.reset(options={"task": task.task_id})
        assert info["task_id"] == task.task_id
        obs, reward, terminated, truncated, info = genv.step("dance wildly")
        assert info["valid"] is False
    finally:
        genv.close()


def test_errors(env: TextWorldEnv):
    with pytest.raises(EnvError, match="textworld"):
        make_env("no-such-env")
    with pytest.raises(EnvError, match="sciworld"):
        make_env("no-such-env")
    for bad in ["cooking-train-9999", "nope", "cooking-bogus-0000", ""]:
        with pytest.raises(EnvError):
            env.reset(options={"task": bad})
        with pytest.raises(EnvError):
            env.expert_actions(bad)
    with pytest.raises(EnvError):
        env.reset()
    with pytest.raises(EnvError):
        env.tasks("test")
    with pytest.raises(EnvError, match="treasure"):
        TextWorldEnv(kinds=("nope",))
    assert set(KINDS) >= {"treasure", "cooking", "coin"}
