"""Engine replicas behind one call: requests spread over the replicas, adapters broadcast to all of them, and a
replica that Ray restarted brought back to the latest adapter versions before it serves again.

Engines are stateless between requests (a request carries its whole prompt), so a request that died with its
replica is simply sent again; the episode that made it goes on. Engine actors are started with Ray's max_restarts;
a restarted one comes back serving version 0 of every role, and `_recover` republishes what the pool last
broadcast (kept here as object refs, so nothing is serialised twice).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray

from agents.adapters import AdapterUpdate
from rollout.engine import GenerateResult, SamplingParams

# An actor that died (RayActorError) or is being restarted by Ray (ActorUnavailableError).
ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
RESTART_WAIT_S = 600.0  # how long a dead actor may take to come back on a node Ray places it on (vLLM reloads)


async def until_answering(ping: Callable[[], Any], wait_s: float = RESTART_WAIT_S) -> Any:
    """Await `ping()` (an actor call) until the actor answers, retrying while Ray reports it unavailable.

    ActorUnavailableError (ray/exceptions.py:531) means the actor's old address refused the call and Ray has not
    yet placed it again; an immediate retry fails the same way, so a caller that retried at once would spend its
    whole retry budget in milliseconds while the actor restarts. A permanent death (RayActorError) is raised."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await ping()
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@dataclass
class PoolStats:
    restarts_seen: int = 0  # replicas found restarted (and brought back to the latest versions)
    resent: int = 0  # requests sent again after their replica died
    per_engine: list[int] = field(default_factory=list)  # requests answered, per replica


class EnginePool:
    def __init__(self, engines: Sequence[Any], retries: int = 3, restart_wait_s: float = RESTART_WAIT_S) -> None:
        """`retries`: how often one request is sent again after replica deaths before the error is raised;
        `restart_wait_s`: how long a dead replica may take to come back (vLLM loads its model again)."""
        if not engines:
            raise ValueError("the pool needs at least one engine")
        self.engines = list(engines)
        self.retries = retries
        self.restart_wait_s = restart_wait_s
        self.in_flight = [0] * len(self.engines)
        self.latest: dict[str, tuple[int, Any]] = {}  # role -> (version, ObjectRef of its AdapterUpdate)
        self.stats = PoolStats(per_engine=[0] * len(self.engines))
        self._locks: dict[tuple[int, int], asyncio.Lock] = {}  # (event loop, replica): each rollout runs its own loop

    # -- requests -------------------------------------------------------------------------------------------
    async def generate(self, ids: list[int], role: str, sampling: SamplingParams) -> GenerateResult:
        for attempt in range(self.retries + 1):
            i = min(range(len(self.engines)), key=self.in_flight.__getitem__)  # least-loaded replica
            self.in_flight[i] += 1
            try:
                result: GenerateResult = await self.engines[i].generate.remote(ids, role, sampling)
                self.stats.per_engine[i] += 1
                return result
            except ACTOR_DIED:
                if attempt == self.retries:
                    raise
                self.stats.resent += 1
            finally:
                self.in_flight[i] -= 1
            await self._recover(i)
        raise AssertionError("unreachable")

    async def _recover(self, i: int) -> None:
        """Wait until replica i answers again, then load the latest adapters into it if it restarted."""
        lock = self._locks.setdefault((id(asyncio.get_running_loop()), i), asyncio.Lock())
        async with lock:  # the first failed request recovers; the others wait and find it done
            versions = await until_answering(self.engines[i].versions.remote, self.restart_wait_s)
            behind = [ref for role, (v, ref) in self.latest.items() if versions.get(role, 0) < v]
            if behind:
                self.stats.restarts_seen += 1
                await asyncio.gather(*(self.engines[i].update_adapter.remote(ref) for ref in behind))

    # -- adapters -------------------------------------------------------------------------------------------
    def broadcast(self, updates: Sequence[AdapterUpdate]) -> None:
        """Load `updates` into every replica (each serialised once); replicas that died meanwhile are recovered."""
        refs = {u.role: (u.version, ray.put(u)) for u in updates}
        self.latest.update(refs)
        pending = {i: [e.update_adapter.remote(ref) for _, ref in refs.values()] for i, e in enumerate(self.engines)}
        dead = []
        for i, calls in pending.items():
            try:
                ray.get(calls)
            except ACTOR_DIED:
                dead.append(i)
        for i in dead:
            asyncio.run(self._recover(i))  # driver code: no event loop runs in this thread
