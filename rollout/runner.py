"""The episode runner: plays many multi-trial episodes concurrently against engine and env-worker actors.

Each episode is a coroutine: up to K trials of one task; after a failed trial the reflector writes a reflection that
goes into the next trial's prompt. Concurrency comes from many episodes awaiting their engine calls at once, which
the engines batch; env slots are leased from a pool so no two episodes share an env.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Sequence

from agents.actor import ActorPrompt
from agents.chat import ChatFormatter
from agents.episode import TrialBuilder
from agents.memory import ReflectionMemory
from agents.parsing import parse_react
from agents.reflector import ReflectorPrompt
from agents.trajectory import ACTOR, REFLECTOR, Episode, Generation, new_episode_id
from rollout.engine import GenerateResult, SamplingParams
from rollout.engine_pool import EnginePool, until_answering
from rollout.workers import EpisodeLost


@dataclass(frozen=True)
class RolloutSettings:
    # No defaults for the agent's settings: a run's come from its config's `agent` section (cluster/config.py;
    # cluster.pipeline.rollout_settings builds them from it).
    trials: int
    memory_size: int
    actor: SamplingParams
    reflector: SamplingParams
    max_context_tokens: int  # a trial ends early rather than overflow the model's context
    show_actions: bool
    reflect: bool = True  # False: retry without reflections (or set trials=1 for plain ReAct)
    max_steps: int | None = None  # cap on steps per trial below the task's own limit (None: the task's limit)
    seed: int = 0
    reflection_candidates: int = 1  # >1: sample this many reflections and keep the one `rank` picks (best-of-n)


@dataclass
class RolloutStats:
    episodes: int = 0
    env_steps: int = 0
    tokens: int = 0
    generate_calls: int = 0
    seconds: float = 0.0
    episode_retries: int = 0  # episodes replayed from the start after an actor they used died
    versions: dict[str, set[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        secs = max(self.seconds, 1e-9)
        return {
            "episodes": self.episodes,
            "env_steps": self.env_steps,
            "tokens": self.tokens,
            "generate_calls": self.generate_calls,
            "episode_retries": self.episode_retries,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": self.tokens / secs,
            "env_steps_per_s": self.env_steps / secs,
            "versions": {role: sorted(v) for role, v in self.versions.items()},
        }


class EpisodeRunner:
    def __init__(
        self,
        engines: EnginePool,
        workers: Sequence[Any],
        envs_per_worker: int,
        formatter: ChatFormatter,
        env_name: str,
        settings: RolloutSettings,
        rank: Callable[[list[Generation]], Awaitable[int]] | None = None,
        retry_on: tuple[type[BaseException], ...] = (),
        max_episode_retries: int = 3,
    ) -> None:
        """`engines`: the replicas behind one pool, which also resends a request whose replica died.
        `retry_on`: errors meaning an env worker died mid-episode (Ray's RayActorError / ActorUnavailableError).
        Such an episode is discarded and, once its worker answers again, replayed from its first trial, up to
        `max_episode_retries` times; an episode only leaves `run` (and reaches `on_episode`) whole, so nothing is
        lost or written twice."""
        if not workers:
            raise ValueError("the runner needs at least one env worker")
        if settings.reflection_candidates > 1 and (rank is None or settings.reflector.temperature == 0):
            raise ValueError("best-of-n reflections need a rank function and a reflector temperature > 0")
        self.rank = rank
        self.retry_on = retry_on
        self.max_episode_retries = max_episode_retries
        self.engines = engines
        self.slots = [(w, s) for s in range(envs_per_worker) for w in workers]  # interleaved: spread over workers
        self.formatter = formatter
        self.env_name = env_name
        self.settings = settings
        self.actor_prompt = ActorPrompt(formatter, show_actions=settings.show_actions)
        self.reflector_prompt = ReflectorPrompt(formatter)
        self._seeds = itertools.count(settings.seed * 1_000_003)

    async def _generate(self, ids: list[int], role: str, sampling: SamplingParams, stats: RolloutStats):
        if sampling.temperature > 0:
            sampling = replace(sampling, seed=next(self._seeds))
        result: GenerateResult = await self.engines.generate(ids, role, sampling)
        stats.tokens += len(result.completion_ids)
        stats.generate_calls += 1
        stats.versions.setdefault(role, set()).add(result.version)
        text = self.formatter.decode(result.completion_ids)
        return Generation(role, ids, result.completion_ids, result.logprobs, result.version, text,
                          result.finish_reason)

    async def _reflect(self, prompt_ids: list[int], stats: RolloutStats) -> Generation:
        n = self.settings.reflection_candidates
        if n == 1:
            return await self._generate(prompt_ids, REFLECTOR, self.settings.reflector, stats)
        candidates = await asyncio.gather(
            *(self._generate(prompt_ids, REFLECTOR, self.settings.reflector, stats) for _ in range(n)))
        assert self.rank is not None
        return candidates[await self.rank(list(candidates))]

    async def run_episode(self, task_id: str, split: str, slot, stats: RolloutStats, tags: dict) -> Episode:
        worker, index = slot
        cfg = self.settings
        episode = Episode(new_episode_id(), self.env_name, task_id, split, "rollout", tags=dict(tags))
        memory = ReflectionMemory(cfg.memory_size)
        for k in range(cfg.trials):
            obs, info = await worker.reset.remote(index, task_id)
            instruction, first_obs = info["instruction"], obs
            episode.tags.setdefault("kind", info["kind"])  # the game kind, for per-kind results (retrorl report)
            builder = TrialBuilder(self.actor_prompt, k, memory, instruction, obs, info.get("admissible") or [])
            for _ in range(min(info["max_steps"], cfg.max_steps or info["max_steps"])):
                if len(builder.ids) + cfg.actor.max_new_tokens > cfg.max_context_tokens:
                    break
                generation = await self._generate(builder.ids, ACTOR, cfg.actor, stats)
                parsed = parse_react(generation.text)
                transition = await worker.step.remote(index, parsed.action, info.get("worker"))
                stats.env_steps += 1
                builder.add(generation, parsed, transition)
                if transition.done:
                    break
            trial = builder.trial
            episode.trials.append(trial)
            if trial.success or k == cfg.trials - 1:
                break
            if cfg.reflect:
                prompt_ids = self.reflector_prompt.build(instruction, first_obs, trial, memory.render())
                trial.reflection = await self._reflect(prompt_ids, stats)
                memory.add(trial.reflection.text)
        return episode

    async def run(
        self,
        tasks: Sequence[tuple[str, str]],
        tags: dict | None = None,
        on_episode: Callable[[Episode], None] | None = None,
    ) -> tuple[list[Episode], RolloutStats]:
        """Play one episode per (task_id, split); results keep the order of `tasks`."""
        stats = RolloutStats()
        free: asyncio.Queue = asyncio.Queue()
        for slot in self.slots:
            free.put_nowait(slot)
        start = time.perf_counter()

        async def one(task_id: str, split: str) -> Episode:
            slot = await free.get()
            try:
                for attempt in itertools.count():
                    try:
                        episode = await self.run_episode(task_id, split, slot, stats, tags or {})
                        break
                    except (EpisodeLost, *self.retry_on) as e:
                        if attempt >= self.max_episode_retries:
                            raise
                        stats.episode_retries += 1  # the actor restarts (Ray); its envs start fresh
                        if not isinstance(e, EpisodeLost):  # a worker on a lost node takes seconds to come back
                            await until_answering(slot[0].pid.remote)
            finally:
                free.put_nowait(slot)
            stats.episodes += 1
            if on_episode is not None:
                on_episode(episode)
            return episode

        episodes = await asyncio.gather(*(one(t, s) for t, s in tasks))
        stats.seconds = time.perf_counter() - start
        return list(episodes), stats
