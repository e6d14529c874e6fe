"""The text-environment API every family implements, and the registry that names the families.

An env is a `gymnasium.Env` with text observations and actions:
  reset(seed=None, options={"task": task_id}) -> (obs, info)   info: instruction, task_id, max_steps
  step(action: str) -> (obs, reward, terminated, truncated, info)   info: score in [0,1], won, valid
An action the game does not understand is an observation ("Nothing happens."), never an exception. A family lists
its tasks per split and yields expert actions that win each task.

Four disjoint splits per family:
  train   the tasks methods learn from (expert demos, exploration).
  valid   held-out in-distribution tasks, drawn like seen's (the settings / scenes / kinds seen shares with train),
          disjoint from every other split: the split for choosing settings (learning rates, checkpoints, prompts).
  seen    test: new tasks of the trained distribution (in-distribution generalisation).
  unseen  test: tasks of held-out settings / kinds (out-of-distribution generalisation).
The test splits are evaluated once per reported configuration; every choice is made on `valid` only. Adding valid
changed no other split's task ids or games: valid has its own seeds / goal range, or comes off the END of the pool
another split takes its first N from (`split_off_valid`), so a capped split keeps exactly its tasks; only a split
that takes its whole pool (count None) gives up the valid tasks (each family's docstring says which, if any).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import gymnasium as gym

SPLITS = ("train", "valid", "seen", "unseen")
INVALID_ACTION_OBS = "Nothing happens."


_T = TypeVar("_T")


def split_off_valid(pool: Sequence[_T], n_train: int | None, n_valid: int | None) -> tuple[list[_T], list[_T]]:
    """(train, valid) from one ordered pool: train = the pool's first `n_train` (None: all it leaves), valid = the
    pool's LAST `n_valid`, never overlapping train. Taken from the end, valid does not move train: the first
    `n_train` are the same whatever `n_valid` is, and valid's tasks stay the same when `n_train` changes (as long as
    the pool leaves room). A capped train leaves valid only what lies beyond its cap (fewer than `n_valid` on a
    short pool, possibly none); an uncapped train gives valid at most half the pool (rounded down), so train keeps
    some. `n_valid` None: all that is left (uncapped train: half the pool)."""
    size = len(pool)
    keep = min(n_train, size) if n_train is not None else size - size // 2
    start = keep if n_valid is None else max(size - n_valid, keep)
    train = pool[:n_train] if n_train is not None else pool[:start]
    return list(train), list(pool[start:])


class EnvError(RuntimeError):
    """An env cannot be built (unknown name, missing package or Java); the message names the fix."""


def check_split(split: str) -> None:
    """The error every family gives for a split it does not have."""
    if split not in SPLITS:
        raise EnvError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


class EnvLost(RuntimeError):
    """The process behind an env (ScienceWorld's JVM) died mid-episode. The episode cannot go on; the env itself
    can: its next reset starts a new process."""


@dataclass(frozen=True)
class Task:
    task_id: str
    split: str
    max_steps: int
    kind: str  # game kind / task family, for per-kind reporting


def balanced_prefix(tasks: Sequence[Task], n: int | None) -> list[Task]:
    """The first `n` tasks of a round-robin over the kinds (each kind's tasks in list order), kept in list order:
    what a cap on a split (env.train_tasks, env.eval_tasks) or demos.tasks takes. A family may list its tasks kind
    by kind (twx: a game's seeds, then the next game's), and a plain prefix would then hold the first kinds only.
    Stable: a larger `n` takes a superset. None, or `n` past the list: all of it."""
    if n is None or n >= len(tasks):
        return list(tasks)
    by_kind: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        by_kind.setdefault(task.kind, []).append(i)
    queues = [iter(indices) for indices in by_kind.values()]
    chosen: set[int] = set()
    while len(chosen) < n:
        for queue in queues:
            i = next(queue, None)
            if i is not None and len(chosen) < n:
                chosen.add(i)
    return [task for i, task in enumerate(tasks) if i in chosen]


@dataclass(frozen=True)
class StepInfo:
    score: float  # progress in [0, 1]; 1.0 when won
    won: bool
    valid: bool

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "won": self.won, "valid": self.valid}


class TextEnv(gym.Env):
    """Base class: text in, text out. Families implement `_reset`, `_step`, `tasks` and `expert_actions`."""

    metadata = {"render_modes": []}
    observation_space = gym.spaces.Text(max_length=1 << 16)
    action_space = gym.spaces.Text(max_length=512)
    family: str = ""
    needs: str = ""  # what building it takes beyond the base install, for `retrorl envs` ("" = nothing)
    data: str = ""  # where its tasks come from, for `retrorl envs`
    has_demos: bool = True  # expert_actions wins its tasks; False: it raises EnvError (no expert exists)

    def __init__(self) -> None:
        super().__init__()
        self._task: Task | None = None
        self._steps = 0

    # -- what a family provides -------------------------------------------------------------------
    def tasks(self, split: str) -> list[Task]:
        raise NotImplementedError

    def expert_actions(self, task_id: str) -> list[str]:
        raise NotImplementedError

    def split_sizes(self) -> dict[str, int]:
        """Tasks per split, for `retrorl envs`; families whose listing builds games override it with a cheap count."""
        return {split: len(self.tasks(split)) for split in SPLITS}

    def prepare(self) -> None:
        """Build whatever the tasks need (games, caches) now, once, before many workers start."""

    def _reset(self, task: Task, seed: int | None) -> tuple[str, str]:
        """Start `task`; return (instruction, first observation)."""
        raise NotImplementedError

    def _step(self, action: str) -> tuple[str, StepInfo, bool]:
        """Apply `action`; return (observation, info, game_over)."""
        raise NotImplementedError

    def _extra_info(self) -> dict[str, Any]:
        """Family-specific keys merged into both reset and step infos (e.g. textworld's `admissible`)."""
        return {}

    # -- the gymnasium surface ----------------------------------------------------------------------
    def task(self, task_id: str) -> Task:
        for split in SPLITS:
            for task in self.tasks(split):
                if task.task_id == task_id:
                    return task
        raise EnvError(f"unknown task {task_id!r} for env {self.family!r}")

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if not options or "task" not in options:
            raise EnvError("reset needs options={'task': task_id}; list them with env.tasks(split)")
        self._task = self.task(options["task"])
        self._steps = 0
        instruction, obs = self._reset(self._task, seed)
        info = {"instruction": instruction, "task_id": self._task.task_id, "kind": self._task.kind,
                "max_steps": self._task.max_steps}
        info.update(self._extra_info())
        return obs, info

    def step(self, action: str):
        if self._task is None:
            raise EnvError("call reset before step")
        self._steps += 1
        # Control characters (a NUL a policy emitted) never reach a game: families echo unknown actions into the
        # observation, and from there into the next prompt. Line breaks stay: a family reads what they mean.
        action = "".join(ch for ch in str(action) if ch.isprintable() or ch in "\n\t")
        obs, info, over = self._step(action.strip())
        reward = 1.0 if info.won else 0.0
        truncated = not over and self._steps >= self._task.max_steps
        return obs, reward, over, truncated, {**info.as_dict(), **self._extra_info()}


_FAMILIES: dict[str, Callable[..., TextEnv]] = {}


def register_family(name: str, factory: Callable[..., TextEnv]) -> None:
    """Name a family for `make_env` and gymnasium (`gym.make("retrorl/<name>-v0", **kwargs)`)."""
    _FAMILIES[name] = factory
    env_id = f"retrorl/{name}-v0"
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=factory, disable_env_checker=True)


def make_env(name: str, **kwargs: Any) -> TextEnv:
    if name not in _FAMILIES:
        raise EnvError(f"unknown env {name!r}; choose one of: {', '.join(sorted(_FAMILIES))}")
    factory = _FAMILIES[name]
    check_kwargs(name, factory, kwargs)
    return factory(**kwargs)


def check_kwargs(name: str, factory: Callable[..., TextEnv], kwargs: dict[str, Any]) -> None:
    """Every family's options checked against its constructor's signature, one mechanism for all: an unknown
    key, or a value not of the annotated type (strictly: `n_train: "3"` is refused, not coerced), is an EnvError
    naming the key and the type, before the family runs any code with it."""
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise EnvError(f"env {name!r} has no option {', '.join(unknown)} (env.kwargs); it takes: {', '.join(params)}")
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    for key, value in kwargs.items():
        if key not in hints:
            continue
        try:
            TypeAdapter(hints[key], config=ConfigDict(strict=True)).validate_python(value)
        except ValidationError:
            shown = params[key].annotation  # the source text under `from __future__ import annotations`
            raise EnvError(f"env.kwargs.{key}={value!r} ({type(value).__name__}): env {name!r} takes "
                           f"{key}: {shown if isinstance(shown, str) else getattr(shown, '__name__', shown)}; "
                           f"fix it with --set env.kwargs.{key}=VALUE") from None


def families() -> list[str]:
    return sorted(_FAMILIES)
