"""`retroact.replay` / `eto.replay`: a stored first round is reused only by a run it belongs to, in task order."""

from __future__ import annotations

import pytest

from agents.trajectory import Episode, Generation, Step, Trial, new_episode_id
from cluster.config import ConfigError, load_config
from cluster.replay import explored_tasks, replayed_round
from cluster.run_dir import RunDir


def _episode(task: str) -> Episode:
    gen = Generation("actor", [1, 2], [3], [-0.7], 1, "Action: go east")
    trial = Trial(0, [], [Step("obs", "go east", "", 0.0, 1.0, True, True, gen)], ret=1.0, success=True)
    return Episode(new_episode_id(), "textworld", task, "train", "rollout", [trial])


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoints" / "sft"
    folder.mkdir(parents=True)
    (folder / "learner.json").write_text("{}")  # what the config checks for a learner checkpoint
    return folder


def _source(tmp_path, checkpoint, *extra: str) -> RunDir:
    cfg = load_config(None, [f"run_root={tmp_path / 'runs'}", f"init.checkpoint={checkpoint}", *extra])
    run = RunDir.create(cfg)
    run.store.append([_episode("b"), _episode("a")], phase="explore-1")
    run.store.append([_episode("a")], phase="eval-retroact")  # another phase of the same task is not replayed
    return run


def test_replay_returns_the_stored_round_in_task_order(tmp_path, checkpoint):
    source = _source(tmp_path, checkpoint)
    stored = {e.task_id: e for e in source.store.episodes("explore-1")}
    cfg = load_config(None, [f"init.checkpoint={checkpoint}", f"retroact.replay={source.path}",
                             "retroact.lr=1e-5"])  # RL settings may differ: that is what a replay is for
    got = replayed_round(cfg, [("a", "train"), ("b", "train")], "explore-1")
    assert [e.episode_id for e in got] == [stored["a"].episode_id, stored["b"].episode_id]


@pytest.mark.parametrize("override, names", [
    ("retroact.trials=4", "retroact.trials"),
    ("env.kwargs={n_train: 3}", "env.kwargs"),
    ("model.path=tiny-llama", "model.path"),
    ("agent.max_context_tokens=2048", "agent.max_context_tokens"),
    ("agent.actor.top_p=0.9", "agent.actor"),
    ("model.dtype=float32", "rollout.dtype / model.dtype"),
])
def test_replay_of_a_different_run_names_what_differs(tmp_path, checkpoint, override, names):
    source = _source(tmp_path, checkpoint)
    cfg = load_config(None, [f"init.checkpoint={checkpoint}", f"retroact.replay={source.path}", override])
    with pytest.raises(ConfigError, match=f"its {names} differ"):
        replayed_round(cfg, [("a", "train")], "explore-1")


def test_eto_replay_takes_an_eto_runs_round_explored_alike(tmp_path, checkpoint):
    """ETO's round is one greedy trajectory per task: another seed or DPO setting may reuse it, another
    exploration temperature or a RetroAct run's round may not."""
    source = _source(tmp_path, checkpoint, "method=eto")
    stored = {e.task_id: e for e in source.store.episodes("explore-1")}
    cfg = load_config(None, [f"init.checkpoint={checkpoint}", "method=eto", f"eto.replay={source.path}", "seed=2",
                             "eto.lr=[5e-5]"])
    assert [e.episode_id for e in replayed_round(cfg, [("a", "train")], "explore-1")] == [stored["a"].episode_id]
    hot = load_config(None, [f"init.checkpoint={checkpoint}", "method=eto", f"eto.replay={source.path}",
                             "eto.temperature=1.0"])
    with pytest.raises(ConfigError, match="eto.replay .*its eto.temperature differ"):
        replayed_round(hot, [("a", "train")], "explore-1")
    other = _source(tmp_path, checkpoint)  # a RetroAct run
    cfg = load_config(None, [f"init.checkpoint={checkpoint}", "method=eto", f"eto.replay={other.path}"])
    with pytest.raises(ConfigError, match="its method differ"):
        replayed_round(cfg, [("a", "train")], "explore-1")


def test_replay_needs_every_task_and_a_run_directory(tmp_path, checkpoint):
    source = _source(tmp_path, checkpoint)
    cfg = load_config(None, [f"init.checkpoint={checkpoint}", f"retroact.replay={source.path}"])
    with pytest.raises(ConfigError, match="too few explore-1 episodes for 1 of the 2 training tasks"):
        replayed_round(cfg, [("a", "train"), ("c", "train")], "explore-1")
    cfg = load_config(None, [f"init.checkpoint={checkpoint}", f"retroact.replay={tmp_path}"])
    with pytest.raises(ConfigError, match="not a run directory"):
        replayed_round(cfg, [("a", "train")], "explore-1")


@pytest.mark.parametrize("override, message", [
    ([], "set init.checkpoint"),
    (["method=eto"], "method=retroact"),
    (["rollout.mode=async"], "rollout.mode=sync"),
])
def test_replay_config_errors_name_the_fix(tmp_path, checkpoint, override, message):
    start = [f"init.checkpoint={checkpoint}"] if override else []
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"retroact.replay={tmp_path}", *start, *override])


@pytest.mark.parametrize("override, message", [
    (["method=eto"], "eto.replay reuses .* set init.checkpoint"),
    (["method=retroact", "init.checkpoint={checkpoint}"], "set method=eto"),
])
def test_eto_replay_config_errors_name_the_fix(tmp_path, checkpoint, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"eto.replay={tmp_path}", *(o.format(checkpoint=checkpoint) for o in override)])


def test_eto_samples_replay_takes_that_many_episodes_per_task(tmp_path, checkpoint):
    """eto.samples > 1 explores each task that many times: a replay hands each listed entry its own stored episode
    (none twice), and a run explored with another number of samples is not this run's round."""
    source = _source(tmp_path, checkpoint, "method=eto", "eto.samples=2", "eto.temperature=1.0")
    source.store.append([_episode("a"), _episode("b")], phase="explore-1")
    cfg = load_config(None, [f"init.checkpoint={checkpoint}", "method=eto", f"eto.replay={source.path}",
                             "eto.samples=2", "eto.temperature=1.0"])
    tasks = explored_tasks(cfg, [("a", "train"), ("b", "train")])
    assert tasks == [("a", "train"), ("a", "train"), ("b", "train"), ("b", "train")]
    got = replayed_round(cfg, tasks, "explore-1")
    assert [e.task_id for e in got] == ["a", "a", "b", "b"] and len({e.episode_id for e in got}) == 4
    three = load_config(None, [f"init.checkpoint={checkpoint}", "method=eto", f"eto.replay={source.path}",
                               "eto.samples=3", "eto.temperature=1.0"])
    with pytest.raises(ConfigError, match="its eto.samples differ"):
        replayed_round(three, explored_tasks(three, [("a", "train")]), "explore-1")
    with pytest.raises(ConfigError, match="too few explore-1 episodes for 1 of the 2"):
        replayed_round(cfg, explored_tasks(cfg, [("a", "train"), ("c", "train")]), "explore-1")
    with pytest.raises(ConfigError, match=r"eto.temperature > 0"):
        load_config(None, ["method=eto", "eto.samples=2"])
