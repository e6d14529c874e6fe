"""ALFWorld family: the `alfworld` package's TextWorld engine (textworld's PddlEnv behind ALFWorld's wrappers).

Games are played as ALFWorld plays them (alfred_tw_env.py:250-254): textworld's `PddlEnv` with `won` and
`admissible_commands`, wrapped by `AlfredDemangler` (object names like "apple 2") and `AlfredInfos`. The first
observation is the room overview ("You are in the middle of a room. Looking quickly around you, you see ...");
`instruction` is the goal text after "Your task is to: " (the welcome banner and that line are stripped). An action
that is not one of the admissible commands reads "Nothing happens." with `valid=False`, as in PddlEnv (pddl.py:
145,160-162; it is answered here without a round trip through the engine, which would only rebuild the same state).
`move X to Y` is the grammar's put command; the older `put X in/on Y` form of ALFWorld/ReAct transcripts is
accepted as an alias. Score: 1.0 when the PDDL goal holds (`won`), else 0 (the TextWorld side of ALFWorld has no
goal-condition progress; the THOR side computes it from the simulator). Task kind = the task type (6 types).

Two sources of games:

* Offline (default, `data_dir=None`): games generated from what the wheel ships (scene inventories, receptacle
  tables, the 6 task types' goal templates; see `envs._alfgen`), each checked by ALFWorld's expert (hand-coded;
  else the task's recipe read off the game's facts) whose actions are the demo (<= 40 actions). `train`, `valid` and
  `seen` draw from ALFRED's training scenes with disjoint seeds; `unseen` uses the scenes ALFRED's generator holds out
  (constants.TEST_SCENE_NUMBERS: 6 kitchens, living rooms, bedrooms, bathrooms), so seen/unseen measure in- and
  out-of-distribution generalisation in the way the papers' valid_seen / valid_unseen do. Scores on these games
  are NOT comparable with the papers': object placement is sampled, not ALFRED's. Counts (n_train=60,
  n_seen=30, n_unseen=30, n_valid=None: as many as n_seen) are spread evenly over `task_types` (default all 6). Ids
  read `alfworld:gen-<split>:<task_type>-<index>`; the id fixes the seed (a hash of `<split>:<task_type>-<index>`,
  so each split has its own seeds: valid's are new, the other splits' games did not change when it was added), so
  it names the same game whatever the counts.
  Built on first use into `<cache_dir>/alfworld/gen-<settings hash>/<split>/<task_type>-<index>/`
  (game.tw-pddl, traj_data.json, meta.json: the files an official game folder has), each in a temp folder moved
  into place, under a lock so concurrent workers build once, by `workers` builder subprocesses (~1-4 s a game).
* Official (`data_dir=<folder>` or `data_dir=$ALFWORLD_DATA`, expanded like ALFWorld's base_config.yaml): the
  folder `alfworld-download` fills. Splits as ALFWorld's configs name them: train = `json_2.1.1/train`,
  seen = `json_2.1.1/valid_seen` (140 games), unseen = `json_2.1.1/valid_unseen` (134), with the games ALFWorld
  itself would load (alfred_tw_env.py:155-190: a traj_data.json with game.tw-pddl beside it, no movable/sliced
  trials, a selected task type, `solvable` true). `valid` = a fixed subset of the train folder's games, taken out
  of train: per task type (n_valid spread evenly; None: as many as seen has, 140 with all types), the games first in
  SHA-1 order of their trial folder (at most half of a type's games), so the choice does not depend on the listing
  order and a larger n_valid only adds games. Ids read `alfworld:<valid_seen|valid_unseen|train>:<trial folder
  relative to the split>` (a valid game keeps its `alfworld:train:...` id: the id names the game's folder).
  Expert actions are the game file's `walkthrough` (what `alfworld-generate` stores), else the hand-coded expert's
  run (or the oracle plan), computed once and cached. The listing is cached per folder and rebuilt when game files
  change.

Step limit: `max_steps` (default 50, RetroAct/ReAct's ALFWorld budget; ETO uses 40) for every task.

One PddlEnv per env, made on the first reset: it maps a private copy of fast-downward's library (~34 MB file; the
process grew by ~35 MB RSS over 6 games) which `close()` frees the task of but leaves mapped (see
`_alfgen.close_stack`). Measured here (2 busy cores): a reset ~1.5 s on a new game (load + translation), a valid
step ~50 ms (~19/s: the engine rebuilds the admissible commands, 27 a step on average, up to 58), an invalid action
is answered without the engine. fast_downward's translator overwrites `sys.argv` on every load/reset
(fast_downward/interface.py:173); the env restores it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from . import _alfgen
from ._alfgen import GAME_FILE, META_FILE, TASK_TYPES, TRAJ_FILE
from .atomic import write_json_atomic
from .cache import file_lock, read_json, resolve_cache_dir
from .core import EnvError, INVALID_ACTION_OBS, SPLITS, StepInfo, Task, TextEnv, check_split

_GEN_VERSION = 1  # bump when generation changes, so caches rebuild
_INSTALL = "pip install 'retrorl[alfworld]'  (alfworld, whose textworld[pddl] extra compiles fast-downward: g++, cmake)"
_DATA_ROOT = "json_2.1.1"  # ALFWorld's base_config.yaml: $ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen}
_OFFICIAL_SPLITS = {"train": "train", "valid": "train", "seen": "valid_seen", "unseen": "valid_unseen"}
_MAX_COUNT = 10_000
_BANNER = re.compile(r"^\s*-= Welcome to TextWorld, ALFRED! =-\s*")
_TASK_LINE = re.compile(r"\n*\s*Your task is to:\s*(.*?)\s*$", re.S)
_PUT_ALIAS = re.compile(r"^put (.+?) (?:in|on|in/on|into|onto) (.+)$")
_TRAILING_PUNCT = ".!"


def _normalize(action: str) -> str:
    """First non-empty line, lower case, single spaces, no trailing full stop: the form of admissible commands."""
    line = next((ln for ln in action.splitlines() if ln.strip()), "")
    return " ".join(line.lower().split()).rstrip(_TRAILING_PUNCT).strip()


def _parse_task_types(task_types: Sequence[str | int] | str | None) -> tuple[str, ...]:
    if task_types is None:
        return TASK_TYPES
    if isinstance(task_types, str):  # "pick_and_place_simple,look_at_obj_in_light" from a config or the CLI
        task_types = [t.strip() for t in task_types.split(",") if t.strip()]
    names = []
    for t in task_types:
        if isinstance(t, int) or (isinstance(t, str) and t.isdigit()):  # ALFWorld's config ids 1..6
            if not 1 <= int(t) <= len(TASK_TYPES):
                raise EnvError(f"unknown alfworld task type id {t}; ids are 1..{len(TASK_TYPES)}")
            names.append(TASK_TYPES[int(t) - 1])
        elif t in TASK_TYPES:
            names.append(t)
        else:
            raise EnvError(f"unknown alfworld task type {t!r}; choose from: {', '.join(TASK_TYPES)} (or ids 1-6)")
    if not names:
        raise EnvError("alfworld task_types is empty")
    return tuple(dict.fromkeys(names))


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("alfworld", "textworld")}


class AlfWorldEnv(TextEnv):
    family = "alfworld"
    needs = "pip install 'retrorl[alfworld]' (builds fast-downward: g++ and cmake)"
    data = ("games generated offline from the alfworld wheel's scenes and task templates, fixed seeds, cached; "
            "or the official games (data_dir, from alfworld-download)")

    def __init__(
        self,
        task_types: Sequence[str | int] | str | None = None,
        n_train: int = 60,
        n_seen: int = 30,
        n_unseen: int = 30,
        n_valid: int | None = None,
        max_steps: int = 50,
        data_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        workers: int | None = None,
    ) -> None:
        super().__init__()
        try:
            # lazy: only this family needs them. Importing alfworld sets $ALFWORLD_DATA if unset (info.py:10-11).
            import alfworld  # noqa: F401
            import fast_downward  # noqa: F401
            import textworld.envs  # noqa: F401
        except ImportError as e:
            raise EnvError(f"the alfworld env needs the alfworld package with textworld[pddl]: {_INSTALL}") from e
        self.task_types = _parse_task_types(task_types)
        # n_valid None: as many as seen (official data: as many games as valid_seen has, see _official_train_valid)
        self.n_valid = n_valid
        self.counts = {"train": n_train, "valid": n_seen if n_valid is None else n_valid, "seen": n_seen,
                       "unseen": n_unseen}
        if any(not 0 <= n < _MAX_COUNT for n in self.counts.values()):
            raise EnvError(f"task counts must be in [0, {_MAX_COUNT}): {self.counts}")
        if max_steps < 1:
            raise EnvError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = int(max_steps)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        self.data_root = self._official_root(data_dir) if data_dir is not None else None
        self._metas: dict[str, dict[str, dict[str, Any]]] = {}  # split -> task id -> meta (with "game", "kind")
        self._stack: Any = None  # the PddlEnv stack, made on first reset
        self._loaded: str | None = None  # game file loaded in the stack
        self._solvers: Any = None  # expert stacks for official games without a stored walkthrough
        self._admissible: list[str] = []
        self._over = False
        self._last = StepInfo(0.0, False, False)

    # -- official data ------------------------------------------------------------------------------------
    @staticmethod
    def _official_root(data_dir: str | os.PathLike[str]) -> Path:
        raw = str(data_dir)
        path = Path(os.path.expanduser(os.path.expandvars(raw)))
        root = path / _DATA_ROOT if (path / _DATA_ROOT).is_dir() else path
        missing = [name for name in dict.fromkeys(_OFFICIAL_SPLITS.values()) if not (root / name).is_dir()]
        if missing:
            raise EnvError(
                f"ALFWorld data not found: {path} (from data_dir={raw!r}) has no {_DATA_ROOT}/{{{','.join(missing)}}}. "
                f"Download the official games with `alfworld-download --data-dir {path}` (needs the internet; "
                f"{_INSTALL}) and point env.kwargs.data_dir (or $ALFWORLD_DATA with data_dir: $ALFWORLD_DATA) at that "
                "folder, or leave data_dir unset to use the offline-generated games")
        return root

    def _official_listing(self, split: str) -> dict[str, dict[str, Any]]:
        assert self.data_root is not None
        folder = _OFFICIAL_SPLITS[split]
        base = self.data_root / folder
        trials = []
        for root, _, files in os.walk(base):
            if "traj_data.json" not in files:
                continue
            rel = Path(root).relative_to(base).as_posix()
            # alfred_tw_env.py:162: ALFWorld skips movable-receptacle and sliced trials (on the full path)
            if "movable" in root or "Sliced" in root:
                continue
            game = Path(root) / GAME_FILE
            stat = game.stat() if game.is_file() else None
            trials.append((rel, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0))
        trials.sort()
        signature = hashlib.sha1(json.dumps(trials).encode()).hexdigest()
        cache = self._official_cache() / f"{folder}.json"
        listing = read_json(cache)
        if listing is None or listing.get("signature") != signature:
            present = [rel for rel, _, size in trials if size]
            listing = {"signature": signature, "trials": self._read_trials(base, present)}
            write_json_atomic(cache, listing)
        metas = {}
        for trial in listing["trials"]:
            if trial["task_type"] not in self.task_types:
                continue
            task_id = f"alfworld:{folder}:{trial['rel']}"
            metas[task_id] = {"kind": trial["task_type"], "game": str(base / trial["rel"] / GAME_FILE),
                              "walkthrough": trial["walkthrough"]}
        return metas

    @staticmethod
    def _read_trials(base: Path, rels: list[str]) -> list[dict[str, Any]]:
        """ALFWorld's own filter (alfred_tw_env.py:155-190): a game file marked solvable; task type kept for later."""
        trials = []
        for rel in rels:
            traj = read_json(base / rel / TRAJ_FILE)
            game = read_json(base / rel / GAME_FILE)
            if not traj or not game or not game.get("solvable") or traj.get("task_type") not in TASK_TYPES:
                continue
            walkthrough = game.get("walkthrough")
            trials.append({"rel": rel, "task_type": traj["task_type"],
                           "walkthrough": list(walkthrough) if isinstance(walkthrough, list) else None})
        return trials

    def _official_cache(self) -> Path:
        key = hashlib.sha1(str(self.data_root.resolve()).encode()).hexdigest()[:12]  # type: ignore[union-attr]
        return self.cache_dir / "alfworld" / f"official-{key}"

    # -- generated games --------------------------------------------------------------------------------------
    def _gen_root(self) -> Path:
        key = json.dumps({"gen": _GEN_VERSION, "expert_cap": _alfgen.EXPERT_MAX_STEPS, **_versions()}, sort_keys=True)
        return self.cache_dir / "alfworld" / f"gen-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def _per_type(self, n: int) -> dict[str, int]:
        k = len(self.task_types)
        return {t: n // k + (1 if i < n % k else 0) for i, t in enumerate(self.task_types)}

    def _specs(self, split: str) -> list[dict[str, Any]]:
        specs = []
        root = self._gen_root()
        scenes = _alfgen.scene_pool(split)
        for task_type, n in self._per_type(self.counts[split]).items():
            for idx in range(n):
                name = f"{task_type}-{idx:04d}"
                # the id alone fixes the seed; train, valid and seen draw disjoint seeds (distinct hash inputs)
                seed = int(hashlib.sha1(f"{split}:{name}".encode()).hexdigest()[:8], 16)
                specs.append({"task_id": f"alfworld:gen-{split}:{name}", "task_type": task_type, "split": split,
                              "index": idx, "seed": seed, "scenes": scenes, "dest": str(root / split / name)})
        return specs

    def _build(self, specs: list[dict[str, Any]]) -> None:
        root = self._gen_root()
        with file_lock(root / ".lock"):
            # Holding the lock, no one else is building: leftover temp folders are from crashed builders.
            for stale in root.glob("*/.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            todo = [s for s in specs if read_json(Path(s["dest"]) / META_FILE) is None]
            if todo:
                try:
                    _alfgen.build_games(todo, self.workers)
                except Exception as e:  # noqa: BLE001 - report any generator failure as an env error
                    raise EnvError(f"could not build ALFWorld games: {e}") from e

    def _generated(self, split: str) -> dict[str, dict[str, Any]]:
        specs = self._specs(split)
        if any(read_json(Path(s["dest"]) / META_FILE) is None for s in specs):
            # First use builds every split's missing games in one go (one round of worker start-ups, not four).
            self._build([s for sp in SPLITS for s in self._specs(sp)])
        # Interleaved over the task types (type-0 of each, then index 1, ...): a smaller count's tasks are a prefix.
        order = {t: i for i, t in enumerate(self.task_types)}
        metas = {}
        for s in sorted(specs, key=lambda s: (s["index"], order[s["task_type"]])):
            meta = read_json(Path(s["dest"]) / META_FILE)
            if meta is None:
                raise EnvError(f"alfworld game {s['task_id']} missing from {s['dest']} after building")
            metas[s["task_id"]] = {"kind": s["task_type"], "game": str(Path(s["dest"]) / GAME_FILE),
                                   "walkthrough": meta["walkthrough"]}
        return metas

    # -- task lists -------------------------------------------------------------------------------------------
    def _load_split(self, split: str) -> dict[str, dict[str, Any]]:
        check_split(split)
        if split not in self._metas:
            if self.data_root is None:
                self._metas[split] = self._generated(split)
            elif split in ("train", "valid"):
                self._metas["train"], self._metas["valid"] = self._official_train_valid()
            else:
                self._metas[split] = self._official_listing(split)
        return self._metas[split]

    def _official_train_valid(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """The train folder's games split into train and valid (module docstring): per task type, valid takes the
        games first in SHA-1 order of their trial folder, at most half the type's games; train keeps the rest in
        listing order. Valid is interleaved over the types, so a smaller n_valid's games are a prefix."""
        listing = self._official_listing("train")
        n_valid = self.n_valid if self.n_valid is not None else len(self._load_split("seen"))
        picked: list[tuple[int, int, str]] = []  # (rank within its type, type order, task id)
        for order, (task_type, n) in enumerate(self._per_type(n_valid).items()):
            ids = sorted((tid for tid, meta in listing.items() if meta["kind"] == task_type),
                         key=lambda tid: (hashlib.sha1(tid.split(":", 2)[2].encode()).hexdigest(), tid))
            picked += [(rank, order, tid) for rank, tid in enumerate(ids[:min(n, len(ids) // 2)])]
        valid = {tid: listing[tid] for _, _, tid in sorted(picked)}
        return {tid: meta for tid, meta in listing.items() if tid not in valid}, valid

    def split_sizes(self) -> dict[str, int]:
        if self.data_root is None:
            return dict(self.counts)  # without building the games
        return {split: len(self._load_split(split)) for split in SPLITS}  # official data: list the folders

    def prepare(self) -> None:
        """Build (or list) every split now, e.g. once on the driver before starting many env workers."""
        for split in SPLITS:
            self._load_split(split)

    def tasks(self, split: str) -> list[Task]:
        return [Task(tid, split, self.max_steps, meta["kind"]) for tid, meta in self._load_split(split).items()]

    def _splits_of(self, task_id: str) -> tuple[str, ...]:
        """The splits the id can belong to: its own (generated games), or those its folder feeds (official data:
        the train folder's games are train or valid)."""
        parts = task_id.split(":", 2)
        if len(parts) != 3 or parts[0] != self.family:
            return ()
        if self.data_root is not None:
            return tuple(s for s, folder in _OFFICIAL_SPLITS.items() if folder == parts[1])
        return (parts[1][4:],) if parts[1].startswith("gen-") and parts[1][4:] in SPLITS else ()

    def _find(self, task_id: str) -> tuple[str, dict[str, Any]]:
        for split in self._splits_of(task_id):
            meta = self._load_split(split).get(task_id)
            if meta is not None:
                return split, meta
        example = ("alfworld:valid_seen:<trial folder>" if self.data_root
                   else "alfworld:gen-seen:pick_and_place_simple-0000")
        raise EnvError(f"unknown task {task_id!r} for env 'alfworld' (ids look like {example})")

    def _meta(self, task_id: str) -> dict[str, Any]:
        return self._find(task_id)[1]

    def task(self, task_id: str) -> Task:
        split, meta = self._find(task_id)
        return Task(task_id, split, self.max_steps, meta["kind"])

    def expert_actions(self, task_id: str) -> list[str]:
        meta = self._meta(task_id)
        if meta["walkthrough"] is None:  # an official game without a stored walkthrough: run the expert once
            meta["walkthrough"] = self._official_expert(task_id, meta)
        return list(meta["walkthrough"])

    def _official_expert(self, task_id: str, meta: dict[str, Any]) -> list[str]:
        path = self._official_cache() / "experts" / (hashlib.sha1(task_id.encode()).hexdigest() + ".json")
        data = read_json(path)
        if data is None:
            if self._solvers is None:
                self._solvers = _alfgen._Solvers()
            seed = int(hashlib.sha1(task_id.encode()).hexdigest()[:8], 16)
            solved = self._solvers.solve(meta["game"], seed, limit=self.max_steps)
            data = {"task_id": task_id, "actions": solved[0] if solved else [], "expert": solved[1] if solved else None}
            write_json_atomic(path, data)
        return list(data["actions"])

    # -- playing ----------------------------------------------------------------------------------------------
    def _reset(self, task: Task, seed: int | None) -> tuple[str, str]:
        game = self._meta(task.task_id)["game"]
        if self._stack is None:
            self._stack = _alfgen.play_stack()
        with _alfgen.keep_argv():
            if self._loaded != game:
                self._loaded = None
                try:
                    self._stack.load(game)
                except (OSError, ValueError, KeyError) as e:  # a missing, truncated or foreign game file
                    raise EnvError(f"cannot load ALFWorld game {game}: {type(e).__name__}: {e}") from e
                self._loaded = game
            state = self._stack.reset()
        self._admissible = sorted(state["admissible_commands"] or [])
        self._over = False
        self._last = StepInfo(0.0, False, True)
        body = _BANNER.sub("", state["feedback"] or "")
        match = _TASK_LINE.search(body)
        instruction = match.group(1) if match else ""
        obs = body[: match.start()] if match else body
        return instruction, obs.strip()

    def _command(self, action: str) -> str:
        command = _normalize(action)
        if command not in self._admissible:
            put = _PUT_ALIAS.match(command)
            if put and f"move {put.group(1)} to {put.group(2)}" in self._admissible:
                return f"move {put.group(1)} to {put.group(2)}"
        return command

    def _step(self, action: str) -> tuple[str, StepInfo, bool]:
        if self._over:
            return INVALID_ACTION_OBS, StepInfo(self._last.score, self._last.won, False), True
        command = self._command(action)
        if command not in self._admissible:
            # What PddlEnv answers for a command it cannot match (pddl.py:145,160-162), without rebuilding its state.
            return INVALID_ACTION_OBS, StepInfo(self._last.score, False, False), False
        with _alfgen.keep_argv():
            state, _, done = self._stack.step(command)
        won = bool(state["won"])
        self._over = bool(done or won)
        self._admissible = [] if self._over else sorted(state["admissible_commands"] or [])
        self._last = StepInfo(1.0 if won else 0.0, won, True)
        return (state["feedback"] or "").strip() or INVALID_ACTION_OBS, self._last, self._over

    def _extra_info(self) -> dict[str, Any]:
        return {"admissible": list(self._admissible)}

    def close(self) -> None:
        stack, self._stack, self._loaded = self._stack, None, None
        if stack is not None:
            _alfgen.close_stack(stack)
        if self._solvers is not None:
            self._solvers.close()
            self._solvers = None
        super().close()
