"""The sciworld family: ETO splits, gold replays, wrong actions, score clamping, the JVM's lifecycle, errors.

Tests that run the simulator are marked `sciworld` and skipped when the scienceworld package or Java is absent;
the error-message tests need neither. One JVM serves the module (~2 s to start, ~5 s to list variations once).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

from envs import SPLITS, EnvError, SciWorldEnv, make_env
from envs.sciworld_env import ETO_TASKS, STEP_LIMITS, teleported

HAVE_PACKAGE = importlib.util.find_spec("scienceworld") is not None
HAVE_JAVA = shutil.which("java") is not None
needs_sciworld = pytest.mark.skipif(
    not (HAVE_PACKAGE and HAVE_JAVA),
    reason="needs the scienceworld package (pip install 'retrorl[sciworld]') and Java 17 on PATH",
)

# (task, split) whose gold paths fit ETO's step limits: one per split
GOLD_TASKS = [
    ("sciworld:lifespan-longest-lived:93", "unseen"),
    ("sciworld:find-non-living-thing:150", "seen"),
    ("sciworld:use-thermometer:0", "train"),
    ("sciworld:use-thermometer:265", "valid"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sw-cache")


@pytest.fixture(scope="module")
def env(cache: Path):
    e = SciWorldEnv(cache_dir=cache, with_admissible=True)
    yield e
    e.close()


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scienceworld", None)  # makes `import scienceworld` fail
    with pytest.raises(EnvError, match=r"retrorl\[sciworld\]"):
        make_env("sciworld")


@pytest.mark.skipif(not HAVE_PACKAGE, reason="needs the scienceworld package to get past the package check")
def test_missing_java_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvError, match="openjdk-17"):
        make_env("sciworld")


@pytest.mark.sciworld
@needs_sciworld
def test_eto_splits(env: SciWorldEnv):
    tasks = {split: env.tasks(split) for split in SPLITS}
    assert len(tasks["unseen"]) == 211  # ETO's unseen set: first <= 10 test variations of 24 tasks
    assert 190 <= len(tasks["seen"]) <= 200 and len(tasks["train"]) > 200
    assert {t.kind for t in tasks["unseen"]} == set(ETO_TASKS) and len(ETO_TASKS) == 24
    ids = [t.task_id for ts in tasks.values() for t in ts]
    assert len(ids) == len(set(ids))
    boil = {split: next(t for t in tasks[split] if t.kind == "boil") for split in SPLITS}
    assert boil["unseen"].task_id == "sciworld:boil:21" and boil["unseen"].max_steps == 100  # ETO's limit
    assert boil["train"].max_steps == STEP_LIMITS["boil"][1] > 100  # raised so gold paths fit
    assert env.task("sciworld:boil:21") == boil["unseen"]


@pytest.mark.sciworld
@needs_sciworld
def test_valid_is_train_variations_beyond_the_train_cap(env: SciWorldEnv, cache: Path):
    ids = {split: [t.task_id for t in env.tasks(split)] for split in SPLITS}
    # train / seen / unseen as recorded before valid existed
    assert len(ids["train"]) == 230 and len(ids["seen"]) == 199
    assert ids["train"][:3] == ["sciworld:boil:0", "sciworld:boil:1", "sciworld:boil:2"]
    assert ids["seen"][0] == "sciworld:boil:14" and ids["unseen"][0] == "sciworld:boil:21"
    # valid: the last <= 10 train variations past train's cap; none for tasks with <= 10 train variations
    assert len(ids["valid"]) == 168 and len({t.kind for t in env.tasks("valid")}) == 20
    assert [i for i in ids["valid"] if ":boil:" in i] == [f"sciworld:boil:{v}" for v in range(10, 14)]
    assert [i for i in ids["valid"] if ":use-thermometer:" in i] == [f"sciworld:use-thermometer:{v}"
                                                                     for v in range(260, 270)]
    assert all(t.max_steps == STEP_LIMITS[t.kind][0] for t in env.tasks("valid"))  # ETO's limits, like seen
    every = [i for split in SPLITS for i in ids[split]]
    assert len(every) == len(set(every))
    # with train uncapped, valid comes off the end of train's variations (at most half a task's) and train keeps
    # the rest
    uncapped = SciWorldEnv(cache_dir=cache, per_task={"train": None})
    train, valid = ({t.task_id for t in uncapped.tasks(split) if t.kind == "identify-life-stages-2"}
                    for split in ("train", "valid"))
    assert (train, valid) == ({f"sciworld:identify-life-stages-2:{v}" for v in (0, 1)},
                              {f"sciworld:identify-life-stages-2:{v}" for v in (2, 3)})
    assert not {t.task_id for t in uncapped.tasks("train")} & {t.task_id for t in uncapped.tasks("valid")}
    assert len(SciWorldEnv(cache_dir=cache, per_task={"valid": 2}).tasks("valid")) == 2 * 20
    with pytest.raises(EnvError, match="unknown splits"):
        SciWorldEnv(cache_dir=cache, per_task={"validation": 5})


@pytest.mark.sciworld
@needs_sciworld
@pytest.mark.parametrize("task_id,split", GOLD_TASKS)
def test_gold_actions_replay_to_full_score(env: SciWorldEnv, task_id: str, split: str):
    task = env.task(task_id)
    assert task.split == split
    obs, info = env.reset(options={"task": task_id})
    assert obs and set(info) >= {"instruction", "task_id", "max_steps", "admissible"}
    assert info["instruction"].startswith("Your task") and info["max_steps"] == task.max_steps
    assert info["admissible"] and info["admissible"] == sorted(info["admissible"])
    gold = env.expert_actions(task_id)
    assert 0 < len(gold) <= task.max_steps
    for i, action in enumerate(gold):
        obs, reward, terminated, truncated, step_info = env.step(action)
        assert 0.0 <= step_info["score"] <= 1.0 and isinstance(obs, str)
        assert terminated == (i == len(gold) - 1) and not truncated
    assert step_info["won"] and step_info["score"] == 1.0 and reward == 1.0
    assert env.expert_actions(task_id) == gold  # cached: the same demo every time


def test_teleported_paths_replace_door_walks_and_look_before_acting():
    gold = ["open door to hallway", "go to hallway", "open door to greenhouse", "go to greenhouse",
            "open door to outside", "go to outside", "focus on dove", "pick up dove",
            "open door to kitchen", "go to kitchen", "look around", "move dove to green box"]
    assert teleported(gold) == ["teleport to outside", "look around", "focus on dove", "pick up dove",
                                "teleport to kitchen", "look around", "move dove to green box"]
    assert teleported(["open door to outside", "focus on frog"]) == ["focus on frog"]  # a door opened, no move
    assert teleported(["go to kitchen"]) == ["teleport to kitchen"]  # nothing follows: nothing to look at
    assert teleported(["open freezer", "focus on ice"]) == ["open freezer", "focus on ice"]  # containers stay


@needs_sciworld  # the constructor checks the package and Java first
def test_unknown_expert_path_is_refused(cache: Path):
    with pytest.raises(EnvError, match="expert_path must be one of gold, teleport"):
        SciWorldEnv(cache_dir=cache, expert_path="shortest")


@pytest.mark.sciworld
@needs_sciworld
def test_teleport_expert_path_wins_in_fewer_steps(cache: Path):
    task_id = "sciworld:find-animal:225"  # its gold path walks through two rooms
    env = SciWorldEnv(cache_dir=cache, expert_path="teleport")
    try:
        gold = env._gold(env.task(task_id))["actions"]
        path = env.expert_actions(task_id)
        assert path[0].startswith("teleport to ") and not any(a.startswith(("go to ", "open door")) for a in path)
        assert len(path) < len(gold)
        env.reset(options={"task": task_id})
        for action in path:
            _, reward, terminated, _, info = env.step(action)
        assert terminated and info["won"] and reward == 1.0
    finally:
        env.close()


@pytest.mark.sciworld
@needs_sciworld
def test_wrong_actions_do_not_crash(env: SciWorldEnv):
    env.reset(options={"task": "sciworld:find-plant:225"})
    for action in ["dance wildly", "", "look at", "go to the moon\nnow"]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, str) and obs
        assert info["valid"] is False and not terminated and 0.0 <= info["score"] < 1.0


@pytest.mark.sciworld
@needs_sciworld
def test_wrong_focus_scores_zero_not_negative(env: SciWorldEnv):
    _, info = env.reset(options={"task": "sciworld:boil:21"})
    focus = next(a for a in info["admissible"] if a.startswith("focus on") and "door" in a)
    obs, reward, terminated, truncated, step_info = env.step(focus)  # ScienceWorld scores this -100
    assert terminated and step_info["score"] == 0.0 and not step_info["won"] and reward == 0.0
    obs, _, terminated, _, step_info = env.step("look around")  # after the end: no crash, outcome kept
    assert terminated and step_info["score"] == 0.0


@pytest.mark.sciworld
@needs_sciworld
def test_truncation_at_max_steps(env: SciWorldEnv):
    task = env.task("sciworld:lifespan-shortest-lived:93")
    env.reset(options={"task": task.task_id})
    for i in range(task.max_steps):
        _, _, terminated, truncated, _ = env.step("look around")
        assert not terminated and truncated == (i == task.max_steps - 1)


@pytest.mark.sciworld
@needs_sciworld
def test_expert_actions_mid_episode_keep_the_episode(env: SciWorldEnv):
    env.reset(options={"task": "sciworld:find-animal:225"})
    env.step("open door to hallway")
    room = env.step("go to hallway")[0]
    assert "hallway" in room
    assert env.expert_actions("sciworld:lifespan-shortest-lived:94")  # loads another task to make its gold path
    assert env.step("look around")[0].startswith("This room is called the hallway")


@pytest.mark.sciworld
@needs_sciworld
def test_listing_from_cache_needs_no_jvm_and_close_stops_it(env: SciWorldEnv, cache: Path):
    env.tasks("train")  # variation lists are cached by now
    other = SciWorldEnv(cache_dir=cache)
    assert len(other.tasks("unseen")) == 211 and other._sw is None
    with pytest.raises(EnvError):
        other.task("sciworld:boil:9999")
    with pytest.raises(EnvError):
        other.reset(options={"task": "sciworld:no-such-task:1"})
    before = os.environ.get("JAVA_TOOL_OPTIONS")
    other.reset(options={"task": "sciworld:lifespan-longest-lived:93"})
    proc = other._sw._gateway.java_process
    if Path(f"/proc/{proc.pid}/environ").exists():  # the JVM got the heap cap
        jvm_env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        opts = next(v for v in jvm_env if v.startswith(b"JAVA_TOOL_OPTIONS=")).decode().split("=", 1)[1].split()
        assert any(o.startswith("-Xmx") for o in opts) and "-XX:+UseSerialGC" in opts
    assert os.environ.get("JAVA_TOOL_OPTIONS") == before  # for that JVM only: twx's JVMs keep their own cap
    other.close()
    assert proc.poll() is not None and other._sw is None
    other.close()  # idempotent


@pytest.mark.sciworld
@needs_sciworld
def test_a_killed_jvm_loses_the_episode_and_the_next_reset_starts_a_new_one(cache: Path):
    import signal

    from envs import EnvLost

    env = SciWorldEnv(cache_dir=cache)
    try:
        task = "sciworld:find-animal:225"
        env.reset(options={"task": task})
        env.step("open door to hallway")
        pid = env.jvm_pid()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EnvLost, match="JVM died"):
            env.step("go to hallway")
        assert env.jvm_pid() is None
        obs, info = env.reset(options={"task": task})  # a new JVM; the task plays from its start again
        assert env.jvm_pid() not in (None, pid) and info["task_id"] == task
        env.step("open door to hallway")
        assert "hallway" in env.step("go to hallway")[0]
    finally:
        env.close()
