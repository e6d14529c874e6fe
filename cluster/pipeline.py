"""The main job: expert demos -> zero-shot eval (ReAct, Reflexion) -> IL for actor and reflector -> eval -> table.

A `Session` owns the Ray actors of one run and the steps every method shares (demos, rollouts, learner updates
and adapter broadcast); the IL pipeline is a short script over it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import ray

from agents.actor import ActorPrompt
from agents.chat import ChatFormatter
from agents.expert import demo_episodes
from agents.model import load_tokenizer, resolve_model
from agents.reflector import ReflectorPrompt
from agents.trajectory import Episode
from cluster.config import Config
from cluster.evaluation import evaluate, markdown_table
from cluster.progress import Progress, say
from cluster.run_dir import RunDir
from cluster.runtime import init_ray, start_actors
from envs import TextEnv, make_env
from learners.batching import il_samples
from rollout.engine import SamplingParams
from rollout.runner import EpisodeRunner, RolloutSettings


@dataclass
class Prepared:
    """What `preflight` checked and built: the model folder and the driver's env (for task lists)."""

    model_path: str
    env: TextEnv


def preflight(cfg: Config) -> Prepared:
    """Everything that can fail on bad input, done before a run directory or a Ray actor exists: the model
    resolves (converted once if needed) and the env family builds its tasks (games generated once, here)."""
    model_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    load_tokenizer(model_path)
    env = make_env(cfg.env.name, **cfg.env.kwargs)
    env.prepare()
    return Prepared(model_path, env)


class Session:
    def __init__(self, cfg: Config, run: RunDir, prepared: Prepared, with_learner: bool = True) -> None:
        self.cfg, self.run, self.env = cfg, run, prepared.env
        self.model_path = prepared.model_path
        say(f"run directory: {run.path}")
        self.formatter = ChatFormatter(load_tokenizer(self.model_path))
        init_ray(cfg)
        t0 = time.perf_counter()
        self.actors = start_actors(cfg, self.model_path, str(run.path), with_learner)
        say(f"actors up in {time.perf_counter() - t0:.0f}s: {len(self.actors.engines)} engine(s), "
            f"{len(self.actors.workers)} env worker(s) x {cfg.rollout.envs_per_worker} envs"
            + (", 1 learner" if with_learner else ""))

    # -- tasks --------------------------------------------------------------------------------------------
    def tasks(self, split: str, limit: int | None) -> list[tuple[str, str]]:
        tasks = self.env.tasks(split)
        return [(t.task_id, split) for t in tasks[:limit]]

    def eval_tasks(self) -> list[tuple[str, str]]:
        return [t for split in self.cfg.eval.splits for t in self.tasks(split, self.cfg.env.eval_tasks)]

    # -- demonstrations -----------------------------------------------------------------------------------
    def demos(self, tasks: list[tuple[str, str]]) -> list[Episode]:
        """Expert replays (and failed attempts with templated reflections) as IL episodes, stored as they come."""
        cfg, workers = self.cfg, self.actors.workers
        prompt = ActorPrompt(self.formatter, show_actions=cfg.agent.show_actions)
        reflector = ReflectorPrompt(self.formatter)
        progress = Progress("demos", len(tasks))
        episodes: list[Episode] = []
        for i, (task_id, split) in enumerate(tasks):
            worker = workers[i % len(workers)]
            expert = worker.expert.remote(0, task_id)
            failed = [worker.failed.remote(0, task_id, cfg.seed * 7919 + i * 31 + j, cfg.demos.wrong_steps)
                      for j in range(cfg.demos.failed_per_task)]
            expert, failed = ray.get(expert), ray.get(failed)
            batch = demo_episodes(prompt, reflector, cfg.env.name, split, expert, None, cfg.agent.memory_size)
            for attempt in failed:
                if attempt is not None:
                    batch += demo_episodes(prompt, reflector, cfg.env.name, split, expert, attempt,
                                           cfg.agent.memory_size)[1:]
            self.run.store.append(batch, phase="demos")
            episodes += batch
            progress.update(expert.won)
        self.run.log("demos", tasks=len(tasks), episodes=len(episodes),
                      expert_wins=sum(e.success for e in episodes if len(e.trials) == 1))
        return episodes

    # -- rollouts -----------------------------------------------------------------------------------------
    def settings(self, trials: int) -> RolloutSettings:
        a = self.cfg.agent
        return RolloutSettings(
            trials=trials,
            reflect=True,
            memory_size=a.memory_size,
            actor=SamplingParams(a.actor.temperature, a.actor.top_p, a.actor.max_new_tokens),
            reflector=SamplingParams(a.reflector.temperature, a.reflector.top_p, a.reflector.max_new_tokens),
            max_context_tokens=a.max_context_tokens,
            show_actions=a.show_actions,
            seed=self.cfg.seed,
        )

    def rollout(self, tasks: list[tuple[str, str]], phase: str, trials: int) -> list[Episode]:
        runner = EpisodeRunner(self.actors.engines, self.actors.workers, self.cfg.rollout.envs_per_worker,
                               self.formatter, self.cfg.env.name, self.settings(trials))
        progress = Progress(phase, len(tasks))

        def keep(episode: Episode) -> None:  # each finished episode is on disk before the next one is counted
            self.run.store.append([episode], phase=phase)
            progress.update(episode.success)

        episodes, stats = asyncio.run(runner.run(tasks, tags={"phase": phase}, on_episode=keep))
        engines = ray.get([e.stats.remote() for e in self.actors.engines])  # cumulative since engine start
        s = stats.as_dict()
        self.run.log("rollout", phase=phase, engines=engines, **s)
        batch = sum(e["mean_batch_size"] for e in engines) / len(engines)
        say(f"[{phase}] {s['tokens_per_s']:.0f} tok/s, {s['env_steps_per_s']:.1f} env steps/s, "
            f"mean engine batch {batch:.1f}, adapter versions {s['versions']}")
        return episodes

    # -- learning -----------------------------------------------------------------------------------------
    def train_il(self, episodes: list[Episode]) -> dict[str, Any]:
        cfg = self.cfg.learner
        samples = il_samples(episodes)
        roles = {r: sum(s.role == r for s in samples) for r in sorted({s.role for s in samples})}
        say(f"[il] {len(samples)} samples {roles}, {cfg.epochs} epochs")
        # Synchronous mode: engines idle while the learner trains, so their prefix caches give the memory back.
        ray.get([e.release_memory.remote() for e in self.actors.engines])
        metrics = ray.get(self.actors.learner.train_il.remote(
            samples, epochs=cfg.epochs, lr=cfg.lr, max_tokens_per_batch=cfg.max_tokens_per_batch))
        checkpoint = ray.get(self.actors.learner.save_checkpoint.remote(self.run.path / "checkpoints" / "il"))
        self.run.log("train", phase="il", checkpoint=checkpoint, **metrics)
        say(f"[il] done: {_brief(metrics)}")
        self.broadcast()
        return metrics

    def broadcast(self) -> dict[str, int]:
        """Publish the learner's adapters and load them into every engine; only LoRA tensors travel."""
        t0 = time.perf_counter()
        updates = ray.get(self.actors.learner.publish.remote())
        refs = [ray.put(u) for u in updates]  # each update serialised once, shared by all engines
        ray.get([e.update_adapter.remote(ref) for ref in refs for e in self.actors.engines])
        versions = {u.role: u.version for u in updates}
        nbytes = sum(t.numel() * t.element_size() for u in updates for t in u.tensors.values())
        self.run.log("broadcast", versions=versions, bytes=nbytes, seconds=time.perf_counter() - t0)
        return versions

    def close(self) -> None:
        self.actors.shutdown()
        self.env.close()


def _brief(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                     if not isinstance(v, (dict, list)))


def run_il(cfg: Config, run: RunDir, prepared: Prepared) -> list[dict[str, Any]]:
    """The main job. Returns the evaluation rows, also written to RUN/eval/."""
    t0 = time.perf_counter()
    session = Session(cfg, run, prepared)
    try:
        train = session.tasks("train", cfg.env.train_tasks)
        demos = session.demos(train)
        evaluation = session.eval_tasks()
        rows = evaluate(session.rollout(evaluation, "eval-zero-shot", cfg.eval.trials), "zero-shot", cfg.eval.trials)
        session.train_il(demos)
        rows += evaluate(session.rollout(evaluation, "eval-il", cfg.eval.trials), "IL", cfg.eval.trials)
    finally:
        session.close()
    table = markdown_table(rows)
    run.write_json("eval/results.json", rows)
    run.write_text("eval/table.md", table)
    run.log("done", seconds=time.perf_counter() - t0)
    say("\n" + table)
    say(f"finished in {time.perf_counter() - t0:.0f}s; results in {run.path / 'eval'}")
    return rows
