"""What every method's pipeline shares: preflight checks and a `Session` that owns the Ray actors of one run and
its common steps (expert demos, rollouts, IL or a starting checkpoint, adapter broadcast, evaluation).

The methods themselves (SFT, ETO, Retroformer, RetroAct) are short scripts over a Session in cluster/methods.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray

from agents.actor import ActorPrompt
from agents.adapters import read_folder, write_folder
from agents.chat import ChatFormatter
from agents.expert import demo_episodes, expert_completion, turn_ids
from agents.model import load_tokenizer, resolve_model
from agents.reflector import ReflectorPrompt
from agents.trajectory import REFLECTOR, Episode
from cluster.checks import (chat_formatter, check_checkpoint, check_samples_fit, check_model, check_weights,
                            meta_model)
from cluster.config import AgentCfg, Config, ConfigError
from cluster.evaluation import eval_phase, evaluate
from cluster.progress import Progress, TrainingProgress, say
from cluster.replay import explored_tasks, replayed_round
from cluster.run_dir import RunDir
from cluster.resume import Resume
from cluster.runtime import PROGRESS_GROUP, check_address, check_backend, check_resources, init_ray, start_actors
from cluster.telemetry import Telemetry
from envs import Task, TextEnv, make_env
from envs.core import balanced_prefix
from learners.batching import TokenSample, generation_sample, il_samples
from rollout.engine import SamplingParams
from rollout.engine_pool import ACTOR_DIED, EnginePool
from rollout.runner import EpisodeRunner, RolloutSettings

PARTIAL_SFT = "sft.partial"  # an IL phase in progress (learner.checkpoint_minutes), under RUN/checkpoints/
_READ_ONLY = frozenset({"pid", "versions", "score_reflections"})  # learner calls that change nothing
_RESTART_WAIT_S = 600.0  # a restarted learner reloads the model and starts DeepSpeed
_TRAIN_POLL_S = 1.0  # a training call's live line is refreshed this often (one small learner call each time)


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed per (run seed, purpose, index...): distinct streams that do not depend on call order."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rollout_settings(agent: AgentCfg, trials: int, seed: int) -> RolloutSettings:
    """The runner's settings from a config's `agent` section (the one place its defaults live)."""
    def sampling(role):
        return SamplingParams(temperature=role.temperature, max_new_tokens=role.max_new_tokens, top_p=role.top_p)

    return RolloutSettings(trials=trials, memory_size=agent.memory_size, actor=sampling(agent.actor),
                           reflector=sampling(agent.reflector), max_context_tokens=agent.max_context_tokens,
                           show_actions=agent.show_actions, max_steps=agent.max_steps, seed=seed)


Tasks = list[tuple[str, str]]  # (task_id, split)


def split_tasks(env: TextEnv, split: str, limit: int | None) -> Tasks:
    return _ids(balanced_prefix(env.tasks(split), limit))


def train_tasks(cfg: Config, env: TextEnv) -> tuple[Tasks, Tasks]:
    """The training tasks IL learns from (those with expert demos) and those the exploration rounds play: the
    same list, or with demos.tasks = N a balanced N of them (`balanced_prefix`) and the rest."""
    tasks = balanced_prefix(env.tasks("train"), cfg.env.train_tasks)
    if cfg.demos.tasks is None:
        return _ids(tasks), _ids(tasks)
    demos = balanced_prefix(tasks, cfg.demos.tasks)
    with_demos = set(demos)
    return _ids(demos), _ids([t for t in tasks if t not in with_demos])


def _ids(tasks: list[Task]) -> Tasks:
    return [(t.task_id, t.split) for t in tasks]


@dataclass
class Prepared:
    """What `preflight` checked and built: the model folder, the driver's env (for task lists), on --resume what
    the run directory holds, and the replayed round's episodes (retroact / eto.replay) when this run still needs them."""

    model_path: str
    env: TextEnv
    resume: Resume | None = None
    replayed: list[Episode] | None = None


def check_turn_budget(cfg: Config, env: TextEnv, formatter: ChatFormatter) -> None:
    """Every expert turn the actor imitates must fit in agent.actor.max_new_tokens: a longer one is cut at
    generation, so the trained actor could never write its whole action. (TextCraft's crafting turns run to 65
    tokens; with the default 32 its SFT actor wrote `craft 1 red nether bricks using` and won 0 of 16 games.)"""
    budget = cfg.agent.actor.max_new_tokens
    lengths = [len(turn_ids(formatter, expert_completion(action)))
               for task_id, _ in train_tasks(cfg, env)[0] for action in env.expert_actions(task_id)]
    over = [n for n in lengths if n > budget]
    if over:
        raise ConfigError(f"agent.actor.max_new_tokens={budget} cuts {len(over)} of the {len(lengths)} expert turns "
                          f"the actor imitates on {cfg.env.name!r} (the longest is {max(over)} tokens), so the trained "
                          f"actor could not finish their actions: set --set agent.actor.max_new_tokens={max(over)} "
                          "or more")


def preflight(cfg: Config, with_learner: bool = True, needs_demos: bool = True,
              run: RunDir | None = None, reflector_checkpoint: str | None = None) -> Prepared:
    """Everything that can fail on bad input, done before a run directory or a Ray actor exists: the model
    resolves (converted once if needed) and fits the config (cluster/checks.py), the env family builds its tasks
    (games generated once, here), a resumed run's stored episodes and a replayed round's source read back, and Ray
    can hold the actors (a local Ray; a cluster gets `runtime.reserve`'s wait instead). `needs_demos`: the command
    plays expert demos (train and demos do; eval does not). `run`: the run directory of a --resume.
    `reflector_checkpoint`: eval's --reflector-checkpoint, checked as init.checkpoint is."""
    check_address(cfg)
    model_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    formatter = chat_formatter(model_path)
    check_weights(model_path)
    model = meta_model(cfg, model_path)
    check_model(cfg, model)
    if cfg.init.checkpoint is not None:
        check_checkpoint(cfg, model_path, model)
    if reflector_checkpoint is not None:
        if cfg.learner.shared_adapter:
            raise ConfigError("--reflector-checkpoint serves another checkpoint's reflector adapter, but with "
                              "learner.shared_adapter=true the actor and the reflector are one adapter: compare "
                              "whole checkpoints instead")
        check_checkpoint(cfg, model_path, model, reflector_checkpoint, "--reflector-checkpoint")
    env = make_env(cfg.env.name, **cfg.env.kwargs)
    if needs_demos and not env.has_demos:
        raise ConfigError(f"env {cfg.env.name!r} has no expert demos, and every method starts from them (IL, or "
                          "ETO's expert side): evaluate on it with `retrorl eval` (zero-shot, or a checkpoint "
                          "trained on another env via --set init.checkpoint=RUN/checkpoints/NAME)")
    env.prepare()
    if needs_demos:
        check_turn_budget(cfg, env, formatter)
    if cfg.method in ("retroformer", "retroact") and not train_tasks(cfg, env)[1]:
        raise ConfigError(f"demos.tasks={cfg.demos.tasks} gives expert demos to every training task, so "
                          f"{cfg.method} has none left to explore: lower demos.tasks, or list more training tasks "
                          "(env.train_tasks, or the env's own count such as env.kwargs.n_train)")
    resume = Resume.of(run) if run is not None else None
    replayed = None
    if cfg.replay is not None and not (resume and resume.episodes.get("explore-1")):
        replayed = replayed_round(cfg, explored_tasks(cfg, train_tasks(cfg, env)[1]), "explore-1")
    check_backend(cfg)
    init_ray(cfg)
    check_resources(cfg, with_learner)
    return Prepared(model_path, env, resume, replayed)


class Session:
    def __init__(self, cfg: Config, run: RunDir, prepared: Prepared, with_learner: bool = True) -> None:
        self.cfg, self.run, self.env = cfg, run, prepared.env
        self.model_path = prepared.model_path
        say(f"run directory: {run.path}")
        self.formatter = ChatFormatter(load_tokenizer(self.model_path))
        init_ray(cfg)
        t0 = time.perf_counter()
        self.actors = start_actors(cfg, with_learner)
        self.engines = EnginePool(self.actors.engines, retries=cfg.rollout.engine_restarts)
        self._journal: list[tuple[str, tuple, dict]] = []  # learner calls since its last checkpoint (see `call`)
        self.learner_restarts = 0
        # What the run directory already holds (empty for a new run; preflight read a --resume's).
        self.resume = prepared.resume if prepared.resume is not None else Resume.of(run)
        self.replayed = prepared.replayed  # the replayed first round (retroact / eto.replay), if still needed
        self._restore: str | None = None  # a finished round's checkpoint to load before the learner is next used
        self._asleep = False  # engines sleeping while the learner trains (rollout.vllm.sleep_while_training)
        learner = ""
        if with_learner:  # logged at every start, so a --resume on another machine shows in metrics.jsonl
            info = run.log("learner", **ray.get(self.actors.learner.describe.remote()))
            learner = f", 1 learner ({info['dtype']}, {info['cpu_capability']})"
        say(f"actors up in {time.perf_counter() - t0:.0f}s: {len(self.actors.engines)} engine(s), "
            f"{len(self.actors.workers)} env worker(s) x {cfg.rollout.envs_per_worker} envs" + learner)
        t = cfg.telemetry
        self.telemetry = Telemetry(run.path / "tensorboard" if t.tensorboard else None, run.path.name, t.ray_metrics)
        run.listeners.append(self.telemetry.record)

    # -- tasks --------------------------------------------------------------------------------------------
    def tasks(self, split: str, limit: int | None) -> Tasks:
        return split_tasks(self.env, split, limit)

    def il_tasks(self) -> Tasks:
        """The training tasks with expert demos (demos.tasks)."""
        return train_tasks(self.cfg, self.env)[0]

    def explore_tasks(self) -> Tasks:
        """The training tasks the exploration rounds play (those without demos when demos.tasks is set)."""
        return train_tasks(self.cfg, self.env)[1]

    def eval_tasks(self) -> list[tuple[str, str]]:
        return [t for split in self.cfg.eval.splits for t in self.tasks(split, self.cfg.env.eval_tasks)]

    # -- demonstrations -----------------------------------------------------------------------------------
    def demos(self, tasks: list[tuple[str, str]]) -> list[Episode]:
        """Expert replays (and failed attempts with templated reflections) as IL episodes, stored as they come."""
        cfg, workers = self.cfg, self.actors.workers
        prompt = ActorPrompt(self.formatter, show_actions=cfg.agent.show_actions)
        reflector = ReflectorPrompt(self.formatter)
        stored: dict[str, list[Episode]] = {}
        for e in self.resume.episodes.get("demos", []):  # a task's demos are stored together or not at all
            stored.setdefault(e.task_id, []).append(e)
        progress = Progress("demos", len(tasks))
        episodes: list[Episode] = []
        for i, (task_id, split) in enumerate(tasks):
            if task_id in stored:
                episodes += stored[task_id]
                progress.update(True)
                continue
            worker = workers[i % len(workers)]
            expert = worker.expert.remote(0, task_id)
            failed = [worker.failed.remote(0, task_id, derive_seed(cfg.seed, "failed-demo", task_id, j),
                                           cfg.demos.wrong_steps)
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
        if not self.resume.logged("demos"):
            self.run.log("demos", tasks=len(tasks), episodes=len(episodes),
                          expert_wins=sum(e.success for e in episodes if len(e.trials) == 1))
        return episodes

    # -- rollouts -----------------------------------------------------------------------------------------
    def settings(self, trials: int, actor_temperature: float | None = None,
                 reflector_temperature: float | None = None, seed: int | None = None) -> RolloutSettings:
        settings = rollout_settings(self.cfg.agent, trials, self.cfg.seed if seed is None else seed)
        if actor_temperature is not None:
            settings = replace(settings, actor=replace(settings.actor, temperature=actor_temperature))
        if reflector_temperature is not None:
            settings = replace(settings, reflector=replace(settings.reflector, temperature=reflector_temperature))
        return settings

    def rollout(self, tasks: list[tuple[str, str]], phase: str, trials: int,
                settings: RolloutSettings | None = None, rank: Any = None, restore: bool = True) -> list[Episode]:
        """One episode per task, stored as each finishes. On --resume, the episodes this phase already stored
        are reused and only the other tasks are played. `restore=False`: called from the async producer's
        thread, which never talks to the learner (a pending checkpoint is loaded by the driver thread)."""
        done, todo = self.resume.split(phase, tasks)
        if done:
            say(f"[{phase}] resumed: {len(done)} of {len(tasks)} episodes already stored")
        if not todo:
            return [done[i] for i in range(len(tasks))]
        if restore:
            self.restore_pending()
        played = self._play([tasks[i] for i in todo], phase, trials, settings, rank)
        done.update(zip(todo, played))
        return [done[i] for i in range(len(tasks))]

    def _play(self, tasks: list[tuple[str, str]], phase: str, trials: int,
              settings: RolloutSettings | None, rank: Any) -> list[Episode]:
        self._engines_awake()
        runner = EpisodeRunner(self.engines, self.actors.workers, self.cfg.rollout.envs_per_worker,
                               self.formatter, self.cfg.env.name, settings or self.settings(trials), rank,
                               retry_on=ACTOR_DIED, max_episode_retries=self.cfg.rollout.episode_retries)
        progress = Progress(phase, len(tasks), concurrency=len(runner.slots))

        def keep(episode: Episode) -> None:  # each finished episode is on disk before the next one is counted
            self.run.store.append([episode], phase=phase)
            progress.update(episode.success)

        async def run_and_watch() -> tuple[list[Episode], Any]:
            watcher = asyncio.create_task(self._watch_engines())
            try:
                return await runner.run(tasks, tags={"phase": phase}, on_episode=keep)
            finally:
                watcher.cancel()

        episodes, stats = asyncio.run(run_and_watch())
        engines = ray.get([e.stats.remote() for e in self.actors.engines])  # cumulative since engine start
        served = ray.get(self.actors.engines[0].versions.remote())
        s = stats.as_dict()
        self.run.log("rollout", phase=phase, engines=engines, **s,
                     success_rate=sum(e.success for e in episodes) / max(len(episodes), 1),
                     policy_lag=policy_lag(episodes, served))
        batch = sum(e["mean_batch_size"] for e in engines) / len(engines)
        say(f"[{phase}] {s['tokens_per_s']:.0f} tok/s, {s['env_steps_per_s']:.1f} env steps/s, "
            f"mean engine batch {batch:.1f}, adapter versions {s['versions']}")
        return episodes

    async def _watch_engines(self) -> None:
        """Engine stats to the telemetry every telemetry.poll_s while a rollout runs (queue depth is live)."""
        while True:
            try:
                self.telemetry.engines(await asyncio.gather(*[e.stats.remote() for e in self.actors.engines]))
            except ACTOR_DIED:  # a replica is restarting (the pool recovers it); poll again next time
                pass
            await asyncio.sleep(self.cfg.telemetry.poll_s)

    def evaluate(self, label: str, best_of: int = 1, temperature: float = 0.0) -> list[dict[str, Any]]:
        """The evaluation protocol on the held-out splits, greedy, K = eval.trials with reflections. With
        `best_of` > 1 each reflection is the learner reward model's pick of that many sampled at `temperature`."""
        phase = eval_phase(label)
        trials = self.cfg.eval.trials
        settings, rank = None, None
        if best_of > 1:
            settings = replace(self.settings(trials, reflector_temperature=temperature),
                               reflection_candidates=best_of)
            rank = self.rank_reflections
        rows = evaluate(self.rollout(self.eval_tasks(), phase, trials, settings, rank), label, trials)
        if not self.resume.logged("eval", label=label):
            self.run.log("eval", label=label, rows=rows)
        return rows

    # -- learning -----------------------------------------------------------------------------------------
    def _engines_idle(self) -> None:
        # Synchronous mode: engines idle while the learner trains, so their prefix caches give the memory back, or,
        # with the learner on their GPU, they sleep (vLLM's weights to CPU memory) until they are next needed.
        # In async mode they keep serving rollouts, caches included.
        if self.cfg.rollout.mode == "async":
            return
        if self.cfg.engines_sleep:
            ray.get([e.sleep.remote() for e in self.actors.engines])
            self._asleep = True
        else:
            ray.get([e.release_memory.remote() for e in self.actors.engines])

    def _engines_awake(self) -> None:
        """Wake sleeping engines before they load adapters or serve (a no-op unless they sleep)."""
        if self._asleep:
            ray.get([e.wake_up.remote() for e in self.actors.engines])
            self._asleep = False

    def imitation(self, demos: list[Episode]) -> list[TokenSample]:
        """The IL samples of the demos (SFT's data and RetroAct's IL regulariser), with demos.memory_only."""
        return il_samples(demos, self.cfg.demos.memory_only, self.cfg.seed)

    def train_il(self, episodes: list[Episode]) -> dict[str, Any]:
        if self.resumed("sft"):
            record = self.resume.logged("train", phase="sft") or {}
            return {k: v for k, v in record.items() if k not in ("time", "event", "phase", "checkpoint")}
        cfg = self.cfg.learner
        samples = self.imitation(episodes)
        check_samples_fit(samples, cfg.max_sample_tokens, "SFT")
        roles = {r: sum(s.role == r for s in samples) for r in sorted({s.role for s in samples})}
        say(f"[sft] {len(samples)} samples {roles}, {cfg.epochs} epochs"
            + (f" ({', '.join(f'{r} {n}' for r, n in cfg.role_epochs.items())})" if cfg.role_epochs else ""))
        self._engines_idle()
        partial = self.run.path / "checkpoints" / PARTIAL_SFT
        if PARTIAL_SFT in self.resume.checkpoints:  # a --resume of a run stopped inside IL
            self.call("load_checkpoint_files", read_folder(partial))
            self.run.log("resume", checkpoint=str(partial))
        budget = None if cfg.checkpoint_minutes is None else cfg.checkpoint_minutes * 60
        while True:  # one call per budget, each followed by a checkpoint --resume continues from
            metrics = self.call("train_il", samples, epochs=cfg.epochs, lr=cfg.lr, role_epochs=cfg.role_epochs,
                                max_tokens_per_batch=cfg.max_tokens_per_batch, budget_s=budget, watch="sft")
            if metrics.get("finished", True):
                break
            write_folder(self.call("checkpoint_files"), partial)
            self.run.log("checkpoint", phase="sft", step=metrics["step"], total=metrics["total"])
            say(f"[sft] step {metrics['step']}/{metrics['total']}: checkpoints/{PARTIAL_SFT} saved "
                f"(--resume continues from there)")
        checkpoint = self.checkpoint("sft")
        shutil.rmtree(partial, ignore_errors=True)  # after "sft" is whole: a crash between leaves a finished phase
        self.run.log("train", phase="sft", checkpoint=checkpoint, **metrics)
        say(f"[sft] done: {_brief(metrics)}")
        self.broadcast()
        return metrics

    def start_policy(self, demos: list[Episode], roles: list[str] | None = None,
                     reflector_from: str | None = None) -> None:
        """The starting policy of every method: IL (SFT) on the demos, or the learner checkpoint in init.checkpoint
        (its adapters republished as this run's versions, so every engine serves them; with `roles`, only those
        roles' adapters are served and the others stay the base model; with `reflector_from`, another checkpoint's
        reflector replaces its own, for evaluation only)."""
        if self.cfg.init.checkpoint is None:
            self.train_il(demos)
            return
        self.call("load_checkpoint_files", read_folder(self.cfg.init.checkpoint))
        self.call("reseed")  # this run's seed, not the checkpoint's RNG, orders its batches and draws dropout
        self.run.log("init", checkpoint=self.cfg.init.checkpoint, reflector_checkpoint=reflector_from)
        say(f"[init] learner restored from {self.cfg.init.checkpoint}")
        if reflector_from is not None:
            # Only the adapters and learner.json travel: the other checkpoint's optimizer state is not used.
            files = {name: Path(reflector_from, name).read_bytes() for name in ("adapters.safetensors", "learner.json")}
            self.call("load_role_files", REFLECTOR, files)
            say(f"[init] reflector from {reflector_from}")
        self.broadcast(force=True, roles=roles)

    def resumed(self, checkpoint: str) -> bool:
        """True if this run already finished the step that ends with `checkpoint` (a --resume): the step is then
        skipped, and the checkpoint is loaded before the learner or the engines are next needed."""
        if checkpoint not in self.resume.checkpoints:
            return False
        self._restore = str(self.run.path / "checkpoints" / checkpoint)
        say(f"[resume] {checkpoint}: done before the restart")
        return True

    def restore_pending(self) -> None:
        """Load and serve the checkpoint `resumed` marked, if any (driver thread only)."""
        if self._restore is None:
            return
        path, self._restore = self._restore, None
        self.call("load_checkpoint_files", read_folder(path))
        self.run.log("resume", checkpoint=path)
        self.broadcast(force=True)

    def call(self, method: str, *args: Any, watch: str | None = None, **kwargs: Any) -> Any:
        """A learner method (learners.methods.MethodLearner), waited for; with `watch` (a training call's phase),
        under a live progress line.

        Learner faults: the calls made since the last checkpoint are journaled. If the learner dies, Ray restarts
        it (learner.restarts), the journal is replayed from that checkpoint's load (adapters, optimizer, step, RNG),
        and the call is made again: it computes what it would have, and only the work in flight is lost."""
        if method != "load_checkpoint_files":
            self.restore_pending()
        for attempt in itertools.count():
            try:
                if attempt:
                    self._replay_journal()
                result = self._wait(getattr(self.actors.learner, method).remote(*args, **kwargs), watch)
                break
            except ACTOR_DIED:
                if attempt >= self.cfg.learner.restarts:
                    raise
                self.learner_restarts += 1
                say(f"[learner] died during {method}; restoring it (restart {self.learner_restarts})")
        if method in ("checkpoint_files", "load_checkpoint_files"):  # the state is now that checkpoint's
            files = ray.put(result if method == "checkpoint_files" else args[0])  # one copy, however often replayed
            self._journal = [("load_checkpoint_files", (files,), {})]
        elif method not in _READ_ONLY:
            self._journal.append((method, args, kwargs))
        return result

    def _wait(self, ref: Any, watch: str | None) -> Any:
        """The call's result; meanwhile, with `watch`, the learner's `progress()` as a live line, and each logged
        line (every tenth of the steps) as a `train_progress` record in metrics.jsonl."""
        if watch is None:
            return ray.get(ref)
        line = TrainingProgress(watch)
        poll = self.actors.learner.progress.options(concurrency_group=PROGRESS_GROUP)

        def show(snap: dict[str, Any]) -> None:
            if line.update(snap):
                self.run.log("train_progress", phase=watch, **{k: v for k, v in snap.items() if k != "running"})

        while not ray.wait([ref], timeout=_TRAIN_POLL_S)[0]:
            try:
                snap = ray.get(poll.remote())
            except ray.exceptions.RayError:  # the learner died: the call's own result raises it below
                break
            if snap["running"]:  # else the previous call's state: this call has not started yet
                show(snap)
        result = ray.get(ref)
        show(ray.get(poll.remote()))  # the last step (a short call may end before the first poll)
        return result

    def _replay_journal(self) -> None:
        deadline = time.monotonic() + _RESTART_WAIT_S
        while True:  # until Ray has the learner back (it reloads the model and starts DeepSpeed)
            try:
                ray.get(self.actors.learner.pid.remote())
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        for method, args, kwargs in self._journal:
            ray.get(getattr(self.actors.learner, method).remote(*args, **kwargs))
        self.run.log("learner_restart", restarts=self.learner_restarts, replayed=[m for m, _, _ in self._journal])

    def train(self, phase: str, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One learner update (`method` of learners.methods.MethodLearner, whose first argument is its samples or
        DPO pairs, checked against learner.max_sample_tokens first), then the broadcast."""
        check_samples_fit(args[0], self.cfg.learner.max_sample_tokens, phase)
        self._engines_idle()
        metrics = self.call(method, *args, watch=phase, **kwargs)
        self.run.log("train", phase=phase, **metrics)
        say(f"[{phase}] {_brief(metrics)}")
        if metrics.get("steps"):
            self.broadcast()
        return metrics

    async def rank_reflections(self, candidates: list[Any]) -> int:
        """Index of the candidate reflection the learner's reward model scores highest."""
        scores = await self.actors.learner.score_reflections.remote([generation_sample(g) for g in candidates])
        return max(range(len(scores)), key=scores.__getitem__)

    def checkpoint(self, name: str) -> str:
        """A learner checkpoint, stored by the driver in RUN/checkpoints/<name> (the learner's node may be gone
        when --resume or init.checkpoint reads it)."""
        return str(write_folder(self.call("checkpoint_files"), self.run.path / "checkpoints" / name))

    def broadcast(self, force: bool = False, roles: list[str] | None = None) -> dict[str, int]:
        """Publish the learner's adapters (of `roles`, default all) and load them into every engine; only LoRA
        tensors travel."""
        t0 = time.perf_counter()
        self._engines_awake()
        updates, folders = self.call("publish_files", roles=roles, force=force)
        for key, files in folders.items():  # RUN/adapters/<role>/v<N>, on the driver's filesystem
            write_folder(files, self.run.adapters / key)
        self.engines.broadcast(updates)
        versions = {u.role: u.version for u in updates}
        nbytes = sum(t.numel() * t.element_size() for u in updates for t in u.tensors.values())
        self.run.log("broadcast", versions=versions, bytes=nbytes, seconds=time.perf_counter() - t0)
        return versions

    def close(self) -> None:
        self.actors.shutdown()
        self.env.close()
        self.telemetry.close()


def policy_lag(episodes: list[Episode], served: dict[str, int]) -> dict[str, int]:
    """Per role, the largest number of versions a generation of these episodes was behind the version served at
    the end of the rollout (0 in synchronous mode, where no update lands during a rollout)."""
    lag: dict[str, int] = {}
    for e in episodes:
        for t in e.trials:
            gens = [s.generation for s in t.steps] + ([t.reflection] if t.reflection is not None else [])
            for g in gens:
                if g.role in served:
                    lag[g.role] = max(lag.get(g.role, 0), served[g.role] - g.version)
    return lag


def _brief(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                     if not isinstance(v, (dict, list)))
