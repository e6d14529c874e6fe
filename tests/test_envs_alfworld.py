"""The alfworld family: offline-generated games, expert replays, invalid actions, truncation, the game cache, the
official-data loader (on a folder laid out like `alfworld-download`'s, filled with generated games), errors.

Builds 5 small games (3 task types) once per module into a temp cache (~5 s on 2 cores). Tests that play games are
skipped when the alfworld package (with textworld[pddl]'s fast-downward) is absent; the error tests need neither.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

import envs
from envs import INVALID_ACTION_OBS, SPLITS, EnvError
from envs._alfgen import scene_pool
from envs.alfworld_env import AlfWorldEnv

HAVE_PACKAGE = all(importlib.util.find_spec(m) is not None for m in ("alfworld", "fast_downward"))
needs_alfworld = pytest.mark.skipif(not HAVE_PACKAGE, reason="needs pip install 'retrorl[alfworld]'")
TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_two_obj_and_place")  # hand-coded and planner experts
SMALL = dict(task_types=TYPES, n_train=3, n_seen=1, n_unseen=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("alf-cache")


@pytest.fixture(scope="module")
def env(cache: Path):
    e = AlfWorldEnv(cache_dir=cache, workers=2, **SMALL)
    start = time.perf_counter()
    e.prepare()
    e.build_seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    yield e
    e.close()


def _all_tasks(env: AlfWorldEnv):
    return [t for split in SPLITS for t in env.tasks(split)]


def _game_files(cache: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (cache / "alfworld").glob("gen-*/*/*/*")}


def _replay(env: AlfWorldEnv, task_id: str, actions: list[str]) -> dict:
    env.reset(options={"task": task_id})
    info: dict = {}
    for i, action in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(action)
        assert info["valid"], (task_id, action, obs)
        assert terminated == (i == len(actions) - 1), (task_id, i, obs)
        assert not truncated and 0.0 <= info["score"] <= 1.0
    return info


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "alfworld", None)  # makes `import alfworld` fail
    with pytest.raises(EnvError, match=r"retrorl\[alfworld\]"):
        AlfWorldEnv()


@needs_alfworld
def test_task_lists(env: AlfWorldEnv, cache: Path):
    assert {split: len(env.tasks(split)) for split in SPLITS} == {"train": 3, "valid": 1, "seen": 1, "unseen": 1}
    tasks = _all_tasks(env)
    assert len({t.task_id for t in tasks}) == len(tasks)
    assert [t.kind for t in env.tasks("train")] == list(TYPES)  # spread over (and interleaved by) task type
    for t in tasks:
        family, source, name = t.task_id.split(":")
        assert (family, source) == ("alfworld", f"gen-{t.split}") and name.startswith(t.kind + "-")
        assert t.max_steps == 50 and env.task(t.task_id) == t
        actions = env.expert_actions(t.task_id)
        assert 2 <= len(actions) <= 40, (t, actions)
    smaller = AlfWorldEnv(cache_dir=cache, **{**SMALL, "n_train": 2})
    assert smaller.tasks("train") == env.tasks("train")[:2]  # a smaller count's games are a prefix (same ids)
    assert env.split_sizes() == {"train": 3, "valid": 1, "seen": 1, "unseen": 1}


@needs_alfworld
def test_valid_split_has_its_own_seeds_on_training_scenes(env: AlfWorldEnv, cache: Path):
    # valid defaults to as many as seen, listed without building
    assert AlfWorldEnv(cache_dir=cache).split_sizes() == {"train": 60, "valid": 30, "seen": 30, "unseen": 30}
    assert AlfWorldEnv(cache_dir=cache, n_valid=4).split_sizes()["valid"] == 4
    ids = {split: [t.task_id for t in env.tasks(split)] for split in SPLITS}
    assert ids["valid"] == ["alfworld:gen-valid:pick_and_place_simple-0000"]
    metas = {tid: json.loads((Path(env._meta(tid)["game"]).parent / "meta.json").read_text())
             for split in SPLITS for tid in ids[split]}
    # train / seen / unseen ids and seeds as recorded before valid existed: the same games
    assert ids["train"] == [f"alfworld:gen-train:{t}-0000" for t in TYPES]
    recorded = {"alfworld:gen-train:pick_and_place_simple-0000": 1711009412,
                "alfworld:gen-train:look_at_obj_in_light-0000": 2708501165,
                "alfworld:gen-seen:pick_and_place_simple-0000": 2880479005,
                "alfworld:gen-unseen:pick_and_place_simple-0000": 2169973844,
                "alfworld:gen-valid:pick_and_place_simple-0000": 161986796}
    assert {tid: metas[tid]["seed"] for tid in recorded} == recorded
    assert len({m["seed"] for m in metas.values()}) == len(metas)
    assert metas[ids["valid"][0]]["scene"] in scene_pool("seen") and scene_pool("valid") == scene_pool("train")


@needs_alfworld
def test_reset_and_step_api(env: AlfWorldEnv):
    task = env.tasks("train")[0]
    argv = list(sys.argv)
    obs, info = env.reset(options={"task": task.task_id})
    assert sys.argv == argv  # fast_downward's translator rewrites sys.argv on every load; the env restores it
    assert obs.startswith("You are in the middle of a room. Looking quickly around you, you see ")
    assert "Welcome" not in obs and "Your task is to" not in obs
    assert set(info) >= {"instruction", "task_id", "max_steps", "admissible"}
    assert info["task_id"] == task.task_id and info["max_steps"] == 50
    assert info["instruction"].startswith("put ") and info["instruction"] not in obs
    assert info["admissible"] == sorted(info["admissible"]) and "look" in info["admissible"]
    go = next(a for a in info["admissible"] if a.startswith("go to "))
    obs, reward, terminated, truncated, sinfo = env.step(go.upper() + ".")  # case and a full stop are tolerated
    assert obs.startswith("You arrive at ") and sinfo["valid"] is True
    assert (reward, terminated, truncated, sinfo["score"], sinfo["won"]) == (0.0, False, False, 0.0, False)
    assert set(sinfo) >= {"score", "won", "valid", "admissible"} and sinfo["admissible"] != info["admissible"]


@needs_alfworld
def test_expert_wins_on_every_split(env: AlfWorldEnv):
    for split in SPLITS:
        task = env.tasks(split)[0]
        info = _replay(env, task.task_id, env.expert_actions(task.task_id))
        assert info["won"] and info["score"] == 1.0 and info["admissible"] == [], task.task_id
        # after the end the outcome stays and nothing reaches the game
        obs, reward, terminated, _, info = env.step("look")
        assert (obs, reward, terminated, info["won"], info["valid"]) == (INVALID_ACTION_OBS, 1.0, True, True, False)
    # the planner expert (pick_two) wins too
    two = next(t for t in env.tasks("train") if t.kind == "pick_two_obj_and_place")
    assert _replay(env, two.task_id, env.expert_actions(two.task_id))["won"]


@needs_alfworld
def test_invalid_actions_are_observations(env: AlfWorldEnv):
    task = env.tasks("seen")[0]
    env.reset(options={"task": task.task_id})
    for action in ["dance wildly", "", "   ", "take the moon\nand the stars", "x" * 2000, "go to the moon", "quit"]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs == INVALID_ACTION_OBS, action
        assert info["valid"] is False and not terminated and reward == 0.0 and info["admissible"], action
    # the game state is intact, and ReAct's older `put X in/on Y` reads as the grammar's `move X to Y`
    actions = [a.replace("move ", "put ", 1).replace(" to ", " in/on ", 1) if a.startswith("move ") else a
               for a in env.expert_actions(task.task_id)]
    assert any(a.startswith("put ") for a in actions)
    for action in actions:
        *_, info = env.step(action)
        assert info["valid"], action
    assert info["won"]


@needs_alfworld
def test_truncation_at_max_steps(cache: Path, env: AlfWorldEnv):
    short = AlfWorldEnv(cache_dir=cache, max_steps=3, **SMALL)
    try:
        task = short.tasks("unseen")[0]
        assert task.max_steps == 3
        short.reset(options={"task": task.task_id})
        for i in range(3):
            _, _, terminated, truncated, info = short.step("look")
            assert not terminated and truncated == (i == 2) and info["valid"] and info["score"] == 0.0
    finally:
        short.close()


@needs_alfworld
def test_cache_is_reused_and_half_built_games_are_never_used(env: AlfWorldEnv, cache: Path):
    before = _game_files(cache)
    assert before and not any(".tmp-" in p for p in before)
    start = time.perf_counter()
    again = AlfWorldEnv(cache_dir=cache, **SMALL)
    again.prepare()
    assert time.perf_counter() - start < 1.0 and _game_files(cache) == before  # nothing rebuilt
    assert _all_tasks(again) == _all_tasks(env)
    # a crash mid-build leaves a temp folder (never read) and no final folder; the rebuild is identical
    task = env.tasks("seen")[0]
    game_dir = Path(env._meta(task.task_id)["game"]).parent
    files_before = {p.name: p.read_bytes() for p in game_dir.iterdir()}
    stale = game_dir.parent / f".tmp-{game_dir.name}-12345-deadbeef"
    shutil.copytree(game_dir, stale)
    (stale / "game.tw-pddl").write_text("{truncated")
    shutil.rmtree(game_dir)
    fresh = AlfWorldEnv(cache_dir=cache, **SMALL)
    try:
        assert fresh.expert_actions(task.task_id) == env.expert_actions(task.task_id)
        assert not stale.exists()
        assert {p.name: p.read_bytes() for p in game_dir.iterdir()} == files_before  # fixed seeds, any process
    finally:
        fresh.close()


def _official_folder(env: AlfWorldEnv, root: Path) -> dict[str, list[str]]:
    """A data folder laid out like alfworld-download's, from generated games; returns the rel paths per folder."""
    layout: dict[str, list[str]] = {}
    # the train folder gets the generated valid games too: with 2 games of one type, one of them is official valid
    folders = {"train": ("train", "valid"), "valid_seen": ("seen",), "valid_unseen": ("unseen",)}
    for folder, splits in folders.items():
        for i, task in enumerate(t for split in splits for t in env.tasks(split)):
            src = Path(env._meta(task.task_id)["game"]).parent
            rel = f"{task.kind}-Obj-None-Recep-{i}/trial_T2019_{i:04d}"
            dest = root / "json_2.1.1" / folder / rel
            dest.mkdir(parents=True)
            for name in ("game.tw-pddl", "traj_data.json"):
                shutil.copy(src / name, dest / name)
            layout.setdefault(folder, []).append(rel)
    train = root / "json_2.1.1" / "train"
    src = train / layout["train"][0]
    skipped_trials = ("pick_and_place_with_movable_recep-X-Y-Z-1/trial_1", "unsolvable/trial_1", "no_game/trial_1",
                      "pick_heat_then_place_in_recep-AppleSliced-None-Z-1/trial_1")
    for skipped in skipped_trials:
        shutil.copytree(src, train / skipped)
    game = json.loads((train / "unsolvable/trial_1/game.tw-pddl").read_text())
    (train / "unsolvable/trial_1/game.tw-pddl").write_text(json.dumps({**game, "solvable": False}))
    (train / "no_game/trial_1/game.tw-pddl").unlink()
    return layout


@needs_alfworld
def test_official_data_folder(env: AlfWorldEnv, tmp_path: Path, monkeypatch):
    layout = _official_folder(env, tmp_path / "data")
    # one game without a stored walkthrough: the hand-coded expert runs once (cached)
    first = tmp_path / "data" / "json_2.1.1" / "valid_seen" / layout["valid_seen"][0] / "game.tw-pddl"
    game = json.loads(first.read_text())
    first.write_text(json.dumps({**game, "walkthrough": None}))
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "data"))
    official = AlfWorldEnv(data_dir="$ALFWORLD_DATA", cache_dir=tmp_path / "cache", max_steps=40, task_types=TYPES)
    try:
        # movable, sliced, unsolvable trials and those without a game file are skipped, as ALFWorld does
        assert official.split_sizes() == {"train": 3, "valid": 1, "seen": 1, "unseen": 1}
        for split, folder in {"seen": "valid_seen", "unseen": "valid_unseen"}.items():
            ids = sorted(f"alfworld:{folder}:{rel}" for rel in layout[folder])
            assert [t.task_id for t in official.tasks(split)] == ids
        # valid: of the type with 2 train-folder games (at most half a type's games), the first by SHA-1 of its folder
        pair = [f"alfworld:train:{rel}" for rel in layout["train"] if rel.startswith(TYPES[0])]
        (valid,) = [t.task_id for t in official.tasks("valid")]
        assert valid == min(pair, key=lambda tid: hashlib.sha1(tid.split(":", 2)[2].encode()).hexdigest())
        train_ids = sorted(f"alfworld:train:{rel}" for rel in layout["train"])
        assert [t.task_id for t in official.tasks("train")] == [tid for tid in train_ids if tid != valid]
        generated = env.tasks("train") + env.tasks("valid")
        for i, rel in enumerate(layout["train"]):  # same games, same kinds, the stored walkthroughs
            task = official.task(f"alfworld:train:{rel}")
            assert (task.kind, task.split, task.max_steps) == (
                generated[i].kind, "valid" if task.task_id == valid else "train", 40)
            assert official.expert_actions(task.task_id) == env.expert_actions(generated[i].task_id)
        assert _replay(official, valid, official.expert_actions(valid))["won"]
        assert AlfWorldEnv(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", task_types=TYPES,
                           n_valid=0).split_sizes() == {"train": 4, "valid": 0, "seen": 1, "unseen": 1}
        seen = official.tasks("seen")[0]
        actions = official.expert_actions(seen.task_id)  # computed by the hand-coded expert
        assert _replay(official, seen.task_id, actions)["won"]
        assert AlfWorldEnv(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", task_types=TYPES).expert_actions(
            seen.task_id) == actions  # cached, not recomputed
        with pytest.raises(EnvError):
            official.task(env.tasks("seen")[0].task_id)  # generated ids are not official ones
    finally:
        official.close()


def test_missing_data_folder_names_alfworld_download(tmp_path: Path):
    if not HAVE_PACKAGE:
        pytest.skip("needs the alfworld package to get past the package check")
    (tmp_path / "json_2.1.1" / "train").mkdir(parents=True)
    for data_dir in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(EnvError, match="alfworld-download") as err:
            AlfWorldEnv(data_dir=data_dir)
        assert "data_dir" in str(err.value) and "valid_seen" in str(err.value)


@needs_alfworld
def test_errors(env: AlfWorldEnv):
    for bad in ["alfworld:gen-train:pick_and_place_simple-9999", "nope", "alfworld:gen-test:pick_and_place_simple-0000",
                "alfworld:valid_seen:x/y", "textworld:gen-train:pick_and_place_simple-0000", ""]:
        with pytest.raises(EnvError):
            env.reset(options={"task": bad})
        with pytest.raises(EnvError):
            env.expert_actions(bad)
    with pytest.raises(EnvError):
        env.reset()
    with pytest.raises(EnvError):
        env.tasks("test")
    with pytest.raises(EnvError, match="pick_and_place_simple"):
        AlfWorldEnv(task_types=("nope",))
    with pytest.raises(EnvError):
        AlfWorldEnv(task_types=[7])
    both = ("pick_and_place_simple", "look_at_obj_in_light")
    assert AlfWorldEnv(task_types="1,look_at_obj_in_light").task_types == both


@pytest.mark.skipif("alfworld" not in envs.families(), reason="registered by envs/__init__.py")
def test_make_env_and_gym_make(cache: Path):
    import gymnasium as gym

    if not HAVE_PACKAGE:
        pytest.skip("needs pip install 'retrorl[alfworld]'")
    genv = gym.make("retrorl/alfworld-v0", cache_dir=cache, **SMALL)
    try:
        task = genv.unwrapped.tasks("train")[0]
        _, info = genv.reset(options={"task": task.task_id})
        assert info["task_id"] == task.task_id and genv.step("dance")[-1]["valid"] is False
    finally:
        genv.close()
    made = envs.make_env("alfworld", cache_dir=cache, **SMALL)
    assert made.family == "alfworld"
    assert [t.task_id for t in made.tasks("train")] == [t.task_id for t in AlfWorldEnv(cache_dir=cache, **SMALL).tasks("train")]
