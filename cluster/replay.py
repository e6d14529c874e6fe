"""`retroact.replay` / `eto.replay`: a method's first exploration round is another run's stored one.

RetroAct's loss is off-policy (every generated token keeps the log-prob of the policy that sampled it), so one
replay buffer can train several RL settings; ETO explores greedily by default, so runs from one start explore
alike and differ only in DPO (with eto.samples > 1 at a temperature, runs share one sampled exploration). The
replayed run must be of the same method and have started from the same checkpoint, model, environment and
exploration settings, or its round would not be this run's first round."""

from __future__ import annotations

from pathlib import Path

from agents.trajectory import Episode
from cluster.config import Config, ConfigError, load_config
from cluster.resume import match_stored
from rollout.store import TrajectoryStore


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def explored_tasks(cfg: Config, tasks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What one exploration round plays, in order: each task once, ETO's `eto.samples` times."""
    return [task for task in tasks for _ in range(cfg.eto.samples if cfg.method == "eto" else 1)]


def replayed_round(cfg: Config, tasks: list[tuple[str, str]], phase: str) -> list[Episode]:
    """The episodes of `phase` that cfg.replay stored, one per entry of `tasks` in that order (a task listed n
    times takes n of its stored episodes)."""
    key, source = f"{cfg.method}.replay", Path(cfg.replay or "")
    if not (source / "config.yaml").is_file() or not (source / "trajectories").is_dir():
        raise ConfigError(f"{key} {str(source)!r} is not a run directory (no config.yaml / trajectories/): give "
                          f"the folder a `retrorl train --method {cfg.method}` printed as its run directory")
    theirs = load_config(source / "config.yaml")
    # How the round was played: RetroAct's trials per task, ETO's exploration temperature.
    played = ({"retroact.trials": (theirs.retroact.trials, cfg.retroact.trials)} if cfg.method == "retroact"
              else {"eto.temperature": (theirs.eto.temperature, cfg.eto.temperature),
                    "eto.samples": (theirs.eto.samples, cfg.eto.samples)})
    same = {
        "method": (theirs.method, cfg.method),
        "model.path": (theirs.model.path, cfg.model.path),
        "env.name": (theirs.env.name, cfg.env.name),
        "env.kwargs": (theirs.env.kwargs, cfg.env.kwargs),
        "init.checkpoint": (_resolved(theirs.init.checkpoint), _resolved(cfg.init.checkpoint)),
        **played,
        # The stored prompts and behaviour log-probs were made with these: another context budget, memory or
        # sampling, or another engine precision, and the importance weights would be against the wrong policy.
        **{f"agent.{key}": (value, getattr(cfg.agent, key)) for key, value in theirs.agent},
        "rollout.dtype / model.dtype": (theirs.rollout.dtype or theirs.model.dtype,
                                        cfg.rollout.dtype or cfg.model.dtype),
    }
    differ = [key for key, (a, b) in same.items() if a != b]
    if differ:
        raise ConfigError(f"{key} {source}: its {', '.join(differ)} differ from this run's, so its {phase} is "
                          f"not this run's first round; replay a {cfg.method} run started with the same ones")
    done, todo = match_stored(TrajectoryStore(source / "trajectories").episodes(phase), tasks)
    if todo:
        missing = list(dict.fromkeys(tasks[i] for i in todo))
        raise ConfigError(f"{key} {source} holds too few {phase} episodes for {len(missing)} of the "
                          f"{len(set(tasks))} training tasks (first: {missing[0][0]}); replay a run whose first "
                          "round was played in full on the same training tasks (or finish it with --resume)")
    return [done[i] for i in range(len(tasks))]
