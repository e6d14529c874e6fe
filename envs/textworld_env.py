"""TextWorld family (the default env): games generated offline with fixed seeds by the `textworld` package.

Game kinds (`kinds=`, default `("treasure", "cooking")`), settings for train/valid/seen -> unseen:

* treasure (tw-treasure_hunter): level 7 (5 rooms, no doors, walkthrough 4: three moves and a take)
  -> level 13 (10 rooms, doors and containers, walkthrough 4-5).
* cooking (tw-cooking): one ingredient to open/take/cook in a single room, training foods (walkthrough 6-7)
  -> 6 rooms and held-out test foods (walkthrough 8-10).
* coin (tw-coin_collector, optional): level 104 (8 rooms with distractors, walkthrough 4) -> level 206 (18 rooms,
  walkthrough 6).

`train`, `valid` and `seen` are disjoint seed ranges of the same settings (seeds 10_000+, 40_000+, 20_000+: valid,
added later, took the next free range, so the other splits' games and caches are unchanged); `unseen` is the harder
setting (more rooms, doors, held-out foods), so seen/unseen measure in- and out-of-distribution generalisation and
valid (for choosing settings) is seen's twin. Task counts per split are totals spread evenly over the kinds. Task ids
read `<kind>-<split>-<index>` (e.g. `cooking-train-0007`); the index fixes the seed, so an id always names the same
game whatever the counts. Each task's `max_steps` is
`max(10, len(walkthrough) + 6)`: room for a few detours, tight enough that failing rollouts stay short (a
failing trial costs max_steps generations, and zero-shot trials mostly fail).

Games are built on first use (every split at once) into `<cache_dir>/textworld/<kind>-<settings hash>/seed-<n>/`
(tw-game.z8, tw-game.json, meta.json), each in a temp folder moved into place, under a lock so concurrent workers
build once. Constructor: kinds, n_train=12, n_seen=4, n_unseen=4, n_valid (None: n_seen), cache_dir ($RETRORL_CACHE
or ~/.cache/retrorl),
workers (builder subprocesses), max_loaded (started games kept for quick task switches).

Observations: the first one is the room description (the ASCII banner and the objective, which is `instruction`,
are stripped). Infos also carry `admissible`, the sorted admissible commands; `valid` says whether the action was one
of them. Actions the game does not know get the game's reply ("That's not a verb I recognise."); interpreter meta
commands (quit, restart, save, script, ...) and empty actions are not forwarded and read "Nothing happens.".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ._twbuild import GAME_FILE, META_FILE, game_ready
from .cache import file_lock, read_json, resolve_cache_dir
from .core import EnvError, INVALID_ACTION_OBS, SPLITS, StepInfo, Task, TextEnv, check_split

_GEN_VERSION = 2  # bump when generation changes, so caches rebuild
# disjoint while counts stay < 10_000; valid came last, so it has the next range (the others' seeds never moved)
_SPLIT_SEED_BASE = {"train": 10_000, "seen": 20_000, "unseen": 30_000, "valid": 40_000}
_COOKING = dict(recipe=1, take=1, open=True, cook=True, cut=False, drop=False, recipe_seed=0)


@dataclass(frozen=True)
class GameKind:
    challenge: str
    seen_settings: dict[str, Any]  # train, valid and seen
    unseen_settings: dict[str, Any]


KINDS: dict[str, GameKind] = {
    "treasure": GameKind("tw-treasure_hunter", {"level": 7}, {"level": 13}),
    "cooking": GameKind("tw-cooking", {**_COOKING, "go": 1, "split": "train"}, {**_COOKING, "go": 6, "split": "test"}),
    "coin": GameKind("tw-coin_collector", {"level": 104}, {"level": 206}),
}
DEFAULT_KINDS = ("treasure", "cooking")

# Interpreter commands that are not game actions: some wait for a yes/no answer or write files, which would
# desynchronise TextWorld's state tracking, so they are answered here and never reach the game.
_META_VERBS = frozenset(
    "quit q restart save restore undo script unscript transcript noscript again g oops verbose brief superbrief "
    "short long notify version pronouns nouns".split()
)
_END_PROMPT = re.compile(r"\s*Would you like to RESTART.*$", re.S)
_BLANK_RUN = re.compile(r"\n{3,}")
_HAS_WORD = re.compile(r"[A-Za-z0-9]")


def max_steps_for(walkthrough: Sequence[str]) -> int:
    return max(10, len(walkthrough) + 6)


def normalize_command(action: str) -> str:
    """First line, lower case, single spaces: the form admissible commands take (cut below the interpreter's
    198-byte input limit). Control characters never get here: a NUL in a command killed the whole process
    (SIGSEGV in the interpreter; found by tests/test_fuzz.py), and TextEnv.step drops them for every family."""
    line = next((ln for ln in action.splitlines() if ln.strip()), "")
    return " ".join(line.lower().split()).encode()[:190].decode(errors="ignore").strip()


def _clean_intro(text: str, objective: str) -> str:
    lines = text.splitlines()
    while lines and not _HAS_WORD.search(lines[0]):  # the banner is drawn without letters or digits
        lines.pop(0)
    body = "\n".join(lines).strip()
    if objective and body.startswith(objective.strip()):
        body = body[len(objective.strip()):]
    return _tidy(body)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # TextWorld asks jericho for valid actions before computing its own admissible commands, and jericho warns on
    # every step that it cannot (TextWorld's list is the one used).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unable to find valid actions in an unsupported game")
        yield


def _tidy(text: str) -> str:
    """Drop trailing spaces and runs of blank lines (TextWorld pads with them; they only cost prompt tokens)."""
    return _BLANK_RUN.sub("\n\n", "\n".join(line.rstrip() for line in text.splitlines())).strip()


def _clean(text: str) -> str:
    return _tidy(_END_PROMPT.sub("", text or ""))


class TextWorldEnv(TextEnv):
    family = "textworld"
    needs = "a C compiler (jericho builds on install)"
    data = "games generated offline by the textworld package, fixed seeds, cached"

    def __init__(
        self,
        kinds: Sequence[str] | str = DEFAULT_KINDS,
        # Sized for the main job (`make train`: RetroAct on these defaults) to take about 15 minutes on a 2-core
        # CPU (README); configs/textworld-full.yaml has the earlier 24 / 8 / 8.
        n_train: int = 12,
        n_seen: int = 4,
        n_unseen: int = 4,
        n_valid: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        max_loaded: int = 8,
    ) -> None:
        super().__init__()
        if isinstance(kinds, str):  # "treasure,cooking" from a config file or the CLI
            kinds = [k.strip() for k in kinds.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise EnvError(f"unknown textworld kinds {unknown}; choose from: {', '.join(KINDS)}")
        counts = {"train": n_train, "valid": n_seen if n_valid is None else n_valid, "seen": n_seen,
                  "unseen": n_unseen}
        if any(not 0 <= n < 10_000 for n in counts.values()):
            raise EnvError(f"task counts must be in [0, 10000): {counts}")
        self.kinds = tuple(kinds)
        self.counts = counts
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.root = self.cache_dir / "textworld"
        # Inform 7's compiler gains nothing from SMT siblings (2 vCPUs: 2 builders are slower than 1), so default
        # to one builder per two logical CPUs.
        self.workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._max_loaded = max(1, max_loaded)
        self._metas: dict[str, dict[str, dict[str, Any]]] = {}  # split -> task id -> meta
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # LRU of started games: task switches skip a restart
        self._game: Any = None
        self._admissible: list[str] = []
        self._max_score = 1
        self._over = False
        self._last = StepInfo(0.0, False, False)

    # -- task lists -----------------------------------------------------------------------------------
    def _per_kind(self, split: str) -> dict[str, int]:
        n, k = self.counts[split], len(self.kinds)
        return {kind: n // k + (1 if i < n % k else 0) for i, kind in enumerate(self.kinds)}

    def _kind_dir(self, kind: str, split: str) -> Path:
        spec = KINDS[kind]
        settings = spec.unseen_settings if split == "unseen" else spec.seen_settings
        key = json.dumps({"challenge": spec.challenge, "settings": settings, "gen": _GEN_VERSION,
                          "textworld": _textworld_version()}, sort_keys=True)
        return self.root / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def _specs(self, split: str) -> list[dict[str, Any]]:
        specs = []
        for kind, n in self._per_kind(split).items():
            spec = KINDS[kind]
            settings = spec.unseen_settings if split == "unseen" else spec.seen_settings
            for idx in range(n):
                seed = _SPLIT_SEED_BASE[split] + idx
                specs.append({"task_id": f"{kind}-{split}-{idx:04d}", "challenge": spec.challenge,
                              "settings": settings, "seed": seed,
                              "dest": str(self._kind_dir(kind, split) / f"seed-{seed}")})
        return specs

    def _load_split(self, split: str) -> dict[str, dict[str, Any]]:
        check_split(split)
        if split in self._metas:
            return self._metas[split]
        specs = self._specs(split)
        if not all(game_ready(Path(s["dest"])) for s in specs):
            # First use builds every split's missing games in one go (one round of worker start-ups, not four).
            self._build([s for sp in SPLITS for s in self._specs(sp)])
        metas = {}
        for s in specs:
            meta = read_json(Path(s["dest"]) / META_FILE)
            if meta is None or not game_ready(Path(s["dest"])):
                raise EnvError(f"textworld game {s['task_id']} missing or unreadable in {s['dest']} after building; "
                               f"delete {self.root} to rebuild every game")
            meta["dir"] = s["dest"]
            metas[s["task_id"]] = meta
        self._metas[split] = metas
        return metas

    def _build(self, specs: list[dict[str, Any]]) -> None:
        from ._twbuild import build_games

        with file_lock(self.root / ".lock"):
            # Holding the lock, no one else is building: leftover temp folders are from crashed builders.
            for stale in self.root.glob("*/.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            todo = [s for s in specs if not game_ready(Path(s["dest"]))]
            for s in todo:  # a cached game whose files were lost or damaged is built again from its spec
                shutil.rmtree(s["dest"], ignore_errors=True)
            if todo:
                try:
                    build_games(todo, self.workers)
                except Exception as e:  # noqa: BLE001 - report any generator failure as an env error
                    raise EnvError(f"could not build TextWorld games: {e}") from e

    def split_sizes(self) -> dict[str, int]:
        return dict(self.counts)  # without building the games

    def prepare(self) -> None:
        """Build every split now (e.g. once on the driver before starting many env workers)."""
        for split in SPLITS:
            self._load_split(split)

    def tasks(self, split: str) -> list[Task]:
        """Interleaved over the kinds (treasure-0, cooking-0, treasure-1, ...), so the first N tasks of a split are
        the games a smaller count builds: env.train_tasks and demos.tasks take balanced, stable prefixes."""
        metas = self._load_split(split)
        order = {kind: i for i, kind in enumerate(self.kinds)}
        ids = sorted(metas, key=lambda tid: (int(tid.rsplit("-", 1)[1]), order[tid.split("-", 1)[0]]))
        return [Task(task_id=tid, split=split, max_steps=max_steps_for(metas[tid]["walkthrough"]),
                     kind=tid.split("-", 1)[0]) for tid in ids]

    def _meta(self, task_id: str) -> dict[str, Any]:
        parts = task_id.split("-")
        if len(parts) == 3 and parts[1] in SPLITS:
            meta = self._load_split(parts[1]).get(task_id)
            if meta is not None:
                return meta
        raise EnvError(f"unknown task {task_id!r} for env 'textworld' (ids look like cooking-train-0003)")

    def task(self, task_id: str) -> Task:
        meta = self._meta(task_id)
        return Task(task_id, task_id.split("-")[1], max_steps_for(meta["walkthrough"]), task_id.split("-")[0])

    def expert_actions(self, task_id: str) -> list[str]:
        return list(self._meta(task_id)["walkthrough"])

    # -- playing ----------------------------------------------------------------------------------------
    def _start(self, task_id: str) -> Any:
        game = self._loaded.pop(task_id, None)
        if game is None:
            import textworld

            infos = textworld.EnvInfos(admissible_commands=True, won=True, lost=True, score=True, max_score=True)
            with _quiet():
                game = textworld.start(str(Path(self._meta(task_id)["dir"]) / GAME_FILE), request_infos=infos)
            while len(self._loaded) >= self._max_loaded:
                self._loaded.popitem(last=False)[1].close()
        self._loaded[task_id] = game
        return game

    def _reset(self, task: Task, seed: int | None) -> tuple[str, str]:
        meta = self._meta(task.task_id)
        self._game = self._start(task.task_id)
        with _quiet():
            state = self._game.reset()
        self._max_score = max(1, state.max_score or meta.get("max_score") or 1)
        self._admissible = sorted(state.admissible_commands or [])
        self._over = False
        self._last = StepInfo(0.0, False, True)
        return meta["objective"], _clean_intro(state.feedback, meta["objective"])

    def _step(self, action: str) -> tuple[str, StepInfo, bool]:
        command = normalize_command(action)
        if self._over:  # the interpreter would now ask RESTART/QUIT; keep the final outcome instead
            return INVALID_ACTION_OBS, StepInfo(self._last.score, self._last.won, False), True
        # A leading backslash is a frotz escape (\help, \cm, ...), not a game command; frotz answers it itself.
        if not command or command.split()[0] in _META_VERBS or command.startswith("\\"):
            return INVALID_ACTION_OBS, StepInfo(self._last.score, False, False), False
        valid = command in self._admissible
        with _quiet():
            state, _, done = self._game.step(command)
        won, lost = bool(state.won), bool(state.lost)
        self._over = bool(done or won or lost)
        self._admissible = sorted(state.admissible_commands or []) if not self._over else []
        score = min(1.0, max(0.0, (state.score or 0) / self._max_score))
        self._last = StepInfo(1.0 if won else score, won, valid)
        return _clean(state.feedback) or INVALID_ACTION_OBS, self._last, self._over

    def _extra_info(self) -> dict[str, Any]:
        return {"admissible": list(self._admissible)}

    def close(self) -> None:
        while self._loaded:
            self._loaded.popitem()[1].close()
        self._game = None
        super().close()


def _textworld_version() -> str:
    try:
        from importlib.metadata import version

        return version("textworld")
    except Exception:  # noqa: BLE001
        return "unknown"
