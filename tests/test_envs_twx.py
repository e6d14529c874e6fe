"""The twx family (TextWorld-Express): splits, gold replays on every split, invalid actions, truncation, game
failure, the gold cache, the JVM's heap cap and lifecycle (a killed JVM), errors.

Tests that run the JAR are marked `twx` and skipped when the textworld-express package or Java is absent; the
error-message tests need neither. A JVM starts in ~0.3 s; the module plays ~40 short games.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from envs import INVALID_ACTION_OBS, SPLITS, EnvError, EnvLost, Task
from envs.core import balanced_prefix
from envs.twx_env import DEFAULT_GAMES, GAMES, TwxEnv

HAVE_PACKAGE = importlib.util.find_spec("textworld_express") is not None
HAVE_JAVA = shutil.which("java") is not None
needs_twx = pytest.mark.skipif(
    not (HAVE_PACKAGE and HAVE_JAVA),
    reason="needs the textworld-express package (pip install 'retrorl[twx]') and Java 17 on PATH",
)
SMALL = dict(n_train=2, n_seen=1, n_unseen=1)
UNKNOWN = "Unknown action: I'm not sure what you mean."


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("twx-cache")


@pytest.fixture(scope="module")
def env(cache: Path):
    e = TwxEnv(cache_dir=cache, **SMALL)
    e.prepare()  # seed lists and every task's gold path, generated once into the module's cache
    yield e
    e.close()


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "textworld_express", None)  # makes `import textworld_express` fail
    with pytest.raises(EnvError, match=r"retrorl\[twx\]"):
        TwxEnv()


@pytest.mark.skipif(not HAVE_PACKAGE, reason="needs the textworld-express package to get past the package check")
def test_missing_java_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvError, match="openjdk-17"):
        TwxEnv()


@pytest.mark.skipif(not HAVE_PACKAGE, reason="needs the textworld-express package")
def test_unknown_games_are_refused():
    with pytest.raises(EnvError, match="unknown twx games"):
        TwxEnv(games=["coin", "zork"])
    with pytest.raises(EnvError, match="unknown twx games"):
        TwxEnv(max_steps={"zork": 3})


@pytest.mark.twx
@needs_twx
def test_splits_are_the_games_own_folds(env: TwxEnv, cache: Path):
    tasks = {split: env.tasks(split) for split in SPLITS}
    assert {s: len(t) for s, t in tasks.items()} == {"train": 10, "valid": 5, "seen": 5, "unseen": 5}
    assert [t.kind for t in tasks["seen"]] == list(DEFAULT_GAMES)
    for split, fold, first_seed in (("train", "train", 0), ("valid", "dev", 10000), ("seen", "dev", 10000),
                                    ("unseen", "test", 20000)):
        for t in tasks[split]:
            family, game, t_fold, seed = t.task_id.split(":")
            assert (family, game, t_fold, t.split) == ("twx", t.kind, fold, split)
            assert int(seed) >= first_seed and t.max_steps == GAMES[game].max_steps
            assert env.task(t.task_id) == t
    assert tasks["train"][:2] == [t for t in tasks["train"] if t.kind == "cookingworld"]
    # train / seen / unseen as recorded before valid existed; valid: the dev fold's last seeds (seen's fold)
    ids = {split: [t.task_id for t in ts] for split, ts in tasks.items()}
    assert ids["train"][:3] == ["twx:cookingworld:train:0", "twx:cookingworld:train:1", "twx:coin:train:0"]
    assert ids["seen"][0] == "twx:cookingworld:dev:10000" and ids["unseen"][0] == "twx:cookingworld:test:20000"
    assert [i for i in ids["valid"] if ":coin:" in i] == ["twx:coin:dev:10999"]
    every = [i for ts in ids.values() for i in ts]
    assert len(every) == len(set(every))
    default = TwxEnv(cache_dir=cache)  # the module's cache: seed lists without a JVM
    sizes = {split: len(default.tasks(split)) for split in SPLITS}
    assert sizes == {"train": 250, "valid": 50, "seen": 50, "unseen": 50}  # valid: as many as seen
    valid = [t.task_id for t in default.tasks("valid") if t.kind == "coin"]
    assert valid == [f"twx:coin:dev:{seed}" for seed in range(10990, 11000)]
    assert not set(valid) & {t.task_id for t in TwxEnv(cache_dir=cache, n_seen=990).tasks("seen")}
    # seen uncapped: valid comes off the end of the dev fold and seen keeps the rest
    uncapped = TwxEnv(cache_dir=cache, games=["coin"], n_seen=None, n_valid=10)
    assert len(uncapped.tasks("seen")) == 990 and [t.task_id for t in uncapped.tasks("valid")] == valid
    assert default._sim is None and uncapped._sim is None
    with pytest.raises(EnvError, match="unknown split"):
        env.tasks("test")
    with pytest.raises(EnvError, match="unknown task"):
        env.task("twx:coin:test:29999")
    with pytest.raises(EnvError, match="unknown task"):
        env.reset(options={"task": "twx:zork:train:0"})


def test_a_balanced_prefix_takes_the_kinds_in_turn_and_keeps_list_order():
    """A split listed kind by kind (as twx lists a game's seeds, then the next game's): a cap takes each kind's
    first tasks in turn, a kind that runs out is skipped, and a larger cap takes a superset."""
    tasks = [Task(f"{kind}-{i}", "train", 5, kind) for kind, n in (("a", 4), ("b", 1), ("c", 3)) for i in range(n)]
    ids = lambda n: [t.task_id for t in balanced_prefix(tasks, n)]  # noqa: E731
    assert ids(3) == ["a-0", "b-0", "c-0"]
    assert ids(6) == ["a-0", "a-1", "a-2", "b-0", "c-0", "c-1"]
    assert ids(None) == ids(8) == ids(99) == [t.task_id for t in tasks]
    assert all(set(ids(n)) < set(ids(n + 1)) for n in range(1, 8))


@pytest.mark.twx
@needs_twx
def test_caps_and_demos_tasks_give_every_game_its_share(env: TwxEnv):
    """env.train_tasks and demos.tasks on a split listed game by game: demos.tasks=5 gives each of the 5 games
    one demo task (not cookingworld's two and coin's first), and exploration plays the rest."""
    from cluster.config import load_config
    from cluster.pipeline import split_tasks, train_tasks

    demos, explore = train_tasks(load_config(None, ["demos.tasks=5"]), env)
    assert sorted(task_id.split(":")[1] for task_id, _ in demos) == sorted(DEFAULT_GAMES)
    assert {task_id.split(":")[3] for task_id, _ in demos} == {"0"}
    assert len(explore) == 5 and not set(demos) & set(explore)
    assert set(demos) | set(explore) == {(t.task_id, "train") for t in env.tasks("train")}
    capped, _ = train_tasks(load_config(None, ["env.train_tasks=7"]), env)
    assert len(capped) == 7 and {task_id.split(":")[1] for task_id, _ in capped} == set(DEFAULT_GAMES)
    assert [task_id.split(":")[1] for task_id, _ in split_tasks(env, "seen", 2)] == list(DEFAULT_GAMES[:2])


@pytest.mark.twx
@needs_twx
@pytest.mark.parametrize("split", SPLITS)
def test_gold_paths_win_every_task(env: TwxEnv, cache: Path, split: str):
    for task in env.tasks(split):
        gold = env.expert_actions(task.task_id)
        obs, info = env.reset(options={"task": task.task_id})
        assert obs and set(info) >= {"instruction", "task_id", "max_steps", "admissible"}
        assert info["instruction"] and info["instruction"] not in obs and info["max_steps"] == task.max_steps
        assert info["kind"] == task.kind == task.task_id.split(":")[1]  # the game
        assert info["admissible"] and info["admissible"] == sorted(info["admissible"])
        assert 0 < len(gold) <= task.max_steps
        for i, action in enumerate(gold):
            obs, reward, terminated, truncated, step_info = env.step(action)
            assert step_info["valid"] and 0.0 <= step_info["score"] <= 1.0 and isinstance(obs, str)
            assert terminated == (i == len(gold) - 1) and not truncated
        assert step_info["won"] and step_info["score"] == 1.0 and reward == 1.0 and step_info["admissible"] == []
        assert env.expert_actions(task.task_id) == gold  # cached: the same demo every time
        # after the end: the outcome stays, nothing reaches the game
        obs, reward, terminated, _, step_info = env.step("look around")
        assert obs == INVALID_ACTION_OBS and terminated and step_info["won"] and not step_info["valid"]
    assert len(list((cache / "twx").glob("*/gold/*/*.json"))) >= len(env.tasks(split))


@pytest.mark.twx
@needs_twx
def test_invalid_actions_are_observations(env: TwxEnv):
    _, info = env.reset(options={"task": "twx:coin:train:0"})
    for action in ["dance wildly", "", "take the moon\nnow", "open door to nowhere"]:
        obs, reward, terminated, truncated, step_info = env.step(action)
        assert obs == UNKNOWN and step_info["valid"] is False and not terminated and reward == 0.0
        assert step_info["admissible"] == info["admissible"]  # nothing changed
    obs, _, _, _, step_info = env.step("  LOOK   Around ")  # agents' casing and spacing are tolerated
    assert step_info["valid"] and obs.startswith("You are in")


@pytest.mark.twx
@needs_twx
def test_sorting_out_of_order_fails_the_episode(env: TwxEnv):
    task = next(t for t in env.tasks("train") if t.kind == "sorting")
    gold = env.expert_actions(task.task_id)
    env.reset(options={"task": task.task_id})
    last = gold[-1].replace("put ", "take ", 1).split(" in box")[0]  # the largest quantity, taken first
    env.step(last)
    obs, reward, terminated, truncated, info = env.step(gold[-1])
    assert terminated and not info["won"] and info["score"] == 0.0 and reward == 0.0


@pytest.mark.twx
@needs_twx
def test_truncation_at_max_steps(cache: Path):
    env = TwxEnv(cache_dir=cache, games=["arithmetic"], max_steps={"arithmetic": 4}, **SMALL)
    try:
        task = env.tasks("unseen")[0]
        assert task.max_steps == 4
        env.reset(options={"task": task.task_id})
        for i in range(task.max_steps):
            _, _, terminated, truncated, _ = env.step("look around")
            assert not terminated and truncated == (i == task.max_steps - 1)
    finally:
        env.close()


@pytest.mark.twx
@needs_twx
def test_game_params_key_the_cache_and_bad_ones_are_an_error(cache: Path):
    env = TwxEnv(cache_dir=cache, games=["coin"], game_params={"coin": "numLocations=2,includeDoors=0"}, **SMALL)
    try:
        task = env.tasks("train")[0]
        assert env._gold_file(task) != TwxEnv(cache_dir=cache, games=["coin"], **SMALL)._gold_file(task)
        env.reset(options={"task": task.task_id})
        for action in env.expert_actions(task.task_id):
            info = env.step(action)[4]
        assert info["won"]
    finally:
        env.close()
    bad = TwxEnv(cache_dir=cache, games=["coin"], game_params={"coin": "numRooms=3"}, **SMALL)
    try:
        with pytest.raises(EnvError, match="numRooms"):
            bad.reset(options={"task": bad.tasks("train")[0].task_id})
    finally:
        bad.close()


@pytest.mark.twx
@needs_twx
def test_expert_actions_mid_episode_keep_the_episode(tmp_path: Path):
    env = TwxEnv(cache_dir=tmp_path, games=["mapreader", "coin"], **SMALL)  # an empty cache: gold is generated
    try:
        task = env.tasks("train")[0]
        env.reset(options={"task": task.task_id})
        first = env.step("read map")[0]
        assert first.startswith("The map reads")
        assert env.expert_actions("twx:coin:dev:10000")  # loads another game to make its gold path
        assert env.step("read map")[0] == first
        assert env.expert_actions(task.task_id)
    finally:
        env.close()


@pytest.mark.twx
@needs_twx
def test_listing_from_cache_needs_no_jvm_the_heap_is_capped_and_close_stops_it(env: TwxEnv, cache: Path):
    env.tasks("train")  # seed lists are cached by now
    before = os.environ.get("JAVA_TOOL_OPTIONS")
    other = TwxEnv(cache_dir=cache, **SMALL)
    assert other.tasks("unseen") == env.tasks("unseen") and other._sim is None
    task = other.tasks("train")[0].task_id
    assert other.expert_actions(task) == env.expert_actions(task) and other._sim is None  # from the cache
    other.reset(options={"task": task})
    proc = other._sim._gateway.java_process
    if Path(f"/proc/{proc.pid}/environ").exists():
        jvm_env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        opts = next(v for v in jvm_env if v.startswith(b"JAVA_TOOL_OPTIONS=")).decode()
        assert "-Xmx128m" in opts and "-XX:+UseSerialGC" in opts
    assert os.environ.get("JAVA_TOOL_OPTIONS") == before  # the cap was for that JVM only
    other.close()
    assert proc.poll() is not None and other._sim is None
    other.close()  # idempotent


@pytest.mark.twx
@needs_twx
def test_a_killed_jvm_loses_the_episode_and_the_next_reset_starts_a_new_one(cache: Path):
    env = TwxEnv(cache_dir=cache, **SMALL)
    try:
        task = "twx:mapreader:train:0"
        env.reset(options={"task": task})
        env.step("read map")
        pid = env.jvm_pid()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EnvLost, match="JVM died"):
            env.step("look around")
        assert env.jvm_pid() is None
        obs, info = env.reset(options={"task": task})  # a new JVM; the task plays from its start again
        assert env.jvm_pid() not in (None, pid) and info["task_id"] == task
        assert env.step("read map")[0].startswith("The map reads")
    finally:
        env.close()
