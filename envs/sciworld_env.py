"""ScienceWorld family, following ETO's protocol (Song et al. 2024, "Trial and Error").

* Tasks: ETO's 24 ScienceWorld tasks (no inclined-plane, mendelian-genetics or unknown-substance melting point);
  `task_names=` picks others. Every episode loads with `simplificationStr="easy"` (teleport, open doors and
  containers, self-watering pots, no electrical actions).
* Splits: `train` = ScienceWorld's train variations, `seen` = its dev variations, `unseen` = its test variations,
  the first <= 10 of each per task (`per_task=` changes the caps; None = all). ETO's unseen set is exactly this:
  211 episodes; its seen set is a 194-episode sample of dev variations, ours the first <= 10 (199).
  `valid` = the LAST <= `per_task["valid"]` (default 10) of a task's train variations beyond train's cap
  (`core.split_off_valid`): never a train variation, and train's list is unchanged. Tasks with no more train
  variations than the cap have no valid tasks (identify-life-stages-1/2, power-component,
  power-component-renewable-vs-nonrenewable-energy: 20 of the 24 tasks, 168 episodes with the defaults). With
  `per_task["train"]` None, valid's variations come off the end of train's (at most half a task's; train keeps
  the rest): only then does valid shrink train.
* Step limits: `valid`/`seen`/`unseen` use ETO's per-task limits (comparable with the paper). ScienceWorld's own
  gold paths often run longer than those (boil up to ~200 steps vs ETO's 100), so `train` uses limits raised to
  ~1.25x the longest gold path we measured over train/dev/test variations, so expert demos replay in full.
  `eto_step_limits=False` uses the raised limits everywhere.
* Score: ScienceWorld's 0-100 score / 100, clamped to [0, 1] (a wrong `focus on` scores -100 and ends the episode:
  0). `won` once the score reaches 100. Observation and reward are the current state's, not the episode's best.
* Expert actions: `get_gold_action_sequence()`, cut after the action that wins (they often end with a spare
  `wait1`). The simulator builds gold paths with randomness (lengths differ between runs), so each is generated
  once (on the task's first expert_actions call; a few seconds for boil-like tasks) and cached: demos are stable
  on a machine. `expert_path="teleport"` hands out `teleported(gold)` instead (door walks become one `teleport
  to <room>`, then `look around`), checked once to still win (else the gold path) and cached beside it: the
  gold path's walks are a map the 135M SFT start did not learn (results/expert_agreement.py: under teacher
  forcing it chose the expert's door on 32 of 65 `open door` turns). Measured on valid, not the default: it wins
  tasks the gold start does not but scores lower on average (results/sws-valid/README.md).
* Task ids: `sciworld:<task-name>:<variation>` (a valid-split task's variation is one of ScienceWorld's train
  ones). The step info `valid` is False when the parser rejects the action ("No known action matches that
  input."). `with_admissible=True` adds `admissible` (the valid action-object combinations, often hundreds) to
  infos; off by default because building it costs 15-70 ms a step.

One JVM per env, started on first use, heap capped via JAVA_TOOL_OPTIONS (-Xmx512m -XX:+UseSerialGC, set for its
start only; without a cap each JVM takes ~3.5 GB), stopped by `close()`. Variation lists and gold paths are cached under
`<cache_dir>/sciworld/scienceworld-<version>/`, so listing tasks needs no JVM after the first time.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .atomic import write_json_atomic
from .cache import read_json, resolve_cache_dir
from ._jvm import exited, java_heap
from .core import EnvError, EnvLost, INVALID_ACTION_OBS, SPLITS, StepInfo, Task, TextEnv, check_split, split_off_valid

SIMPLIFICATION = "easy"
_SPLIT_SOURCE = {"train": "train", "valid": "train", "seen": "dev", "unseen": "test"}  # valid: train's end
_NO_MATCH = "No known action matches that input."
_INSTALL_PKG = "pip install 'retrorl[sciworld]'  (the scienceworld package)"
_INSTALL_JAVA = ("install Java 17 and put `java` on PATH, e.g. `apt-get install openjdk-17-jre-headless` "
                 "(Debian/Ubuntu) or `brew install openjdk@17` (macOS)")

# task -> (ETO's limit, limit that fits the longest gold path measured with margin)
STEP_LIMITS: dict[str, tuple[int, int]] = {
    "boil": (100, 240),
    "change-the-state-of-matter-of": (80, 180),
    "freeze": (80, 200),
    "melt": (80, 200),
    "measure-melting-point-known-substance": (120, 120),
    "use-thermometer": (30, 30),
    "power-component": (20, 20),
    "power-component-renewable-vs-nonrenewable-energy": (30, 40),
    "test-conductivity": (30, 55),
    "test-conductivity-of-unknown-substances": (30, 55),
    "find-animal": (15, 20),
    "find-living-thing": (15, 20),
    "find-non-living-thing": (15, 15),
    "find-plant": (15, 20),
    "grow-fruit": (60, 120),
    "grow-plant": (30, 100),
    "chemistry-mix": (60, 75),
    "chemistry-mix-paint-secondary-color": (15, 45),
    "chemistry-mix-paint-tertiary-color": (30, 55),
    "lifespan-longest-lived": (10, 10),
    "lifespan-longest-lived-then-shortest-lived": (12, 12),
    "lifespan-shortest-lived": (10, 10),
    "identify-life-stages-1": (30, 55),
    "identify-life-stages-2": (30, 30),
    # not in ETO's evaluation: only the fitted limit
    "inclined-plane-determine-angle": (220, 220),
    "inclined-plane-friction-named-surfaces": (400, 400),
    "inclined-plane-friction-unnamed-surfaces": (300, 300),
    "measure-melting-point-unknown-substance": (125, 125),
    "mendelian-genetics-known-plant": (180, 180),
    "mendelian-genetics-unknown-plant": (180, 180),
}
ETO_TASKS: tuple[str, ...] = tuple(list(STEP_LIMITS)[:24])
EXPERT_PATHS = ("gold", "teleport")
_NAVIGATION = ("open door to ", "go to ")
_LOOK = "look around"


def teleported(actions: Sequence[str]) -> list[str]:
    """The gold path with each run of door navigation (`open door to X`, `go to X`: every door is open in
    "easy") replaced by `teleport to <the run's last room>`, then `look around` unless the path looks next: the
    gold path acts on what it was never shown; a policy has to see the room first. A run with no `go to` is
    dropped."""
    out: list[str] = []
    room: str | None = None
    for i, action in enumerate(actions):
        if action.startswith(_NAVIGATION):
            if action.startswith("go to "):
                room = action[len("go to "):]
            if i + 1 < len(actions) and actions[i + 1].startswith(_NAVIGATION):
                continue
            if room is not None:
                out.append(f"teleport to {room}")
                if i + 1 < len(actions) and actions[i + 1] != _LOOK:
                    out.append(_LOOK)
            room = None
        else:
            out.append(action)
    return out


def _normalize(action: str) -> str:
    line = next((ln for ln in action.splitlines() if ln.strip()), "")
    return " ".join(line.split())[:256]


class SciWorldEnv(TextEnv):
    family = "sciworld"
    needs = "Java 17; pip install 'retrorl[sciworld]'"
    data = ("the scienceworld package's tasks and variations (ETO's 24 tasks; valid = train variations beyond "
            "train's cap, seen = dev, unseen = test)")

    def __init__(
        self,
        task_names: Sequence[str] | str | None = None,
        per_task: dict[str, int | None] | None = None,
        eto_step_limits: bool = True,
        with_admissible: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        jvm_heap: str = "512m",
        expert_path: str = "gold",
    ) -> None:
        super().__init__()
        try:
            import scienceworld  # noqa: F401  (lazy: only this family needs it)
            from scienceworld.version import __version__ as sw_version
        except ImportError as e:
            raise EnvError(f"the sciworld env needs the scienceworld package: {_INSTALL_PKG}") from e
        if shutil.which("java") is None:
            raise EnvError(f"the sciworld env needs Java (not found on PATH): {_INSTALL_JAVA}")
        if isinstance(task_names, str):  # "boil,melt" from a config file or the CLI
            task_names = [t.strip() for t in task_names.split(",") if t.strip()]
        self.task_names = tuple(task_names or ETO_TASKS)
        unknown = [t for t in self.task_names if t not in STEP_LIMITS]
        if unknown:
            raise EnvError(f"unknown sciworld tasks {unknown}; choose from: {', '.join(STEP_LIMITS)}")
        self.per_task = {"train": 10, "valid": 10, "seen": 10, "unseen": 10, **(per_task or {})}
        unknown_splits = sorted(set(self.per_task) - set(SPLITS))
        if unknown_splits:
            raise EnvError(f"sciworld per_task has unknown splits {unknown_splits}; splits: {', '.join(SPLITS)}")
        if expert_path not in EXPERT_PATHS:
            raise EnvError(f"sciworld expert_path must be one of {', '.join(EXPERT_PATHS)}, not {expert_path!r}")
        self.expert_path = expert_path
        self.eto_step_limits = eto_step_limits
        self.with_admissible = with_admissible
        self.jvm_heap = jvm_heap
        self.cache = resolve_cache_dir(cache_dir) / "sciworld" / (
            f"scienceworld-{sw_version}")
        self._sw: Any = None  # ScienceWorldEnv, started on first need
        self._tasks: dict[str, list[Task]] | None = None
        self._index: dict[str, Task] = {}
        self._history: list[str] = []  # actions of the episode in flight, to restore it after a gold-path load
        self._admissible: list[str] = []
        self._over = False
        self._last = StepInfo(0.0, False, False)

    # -- the JVM ------------------------------------------------------------------------------------------
    def _jvm(self) -> Any:
        if self._sw is None:
            from scienceworld import ScienceWorldEnv

            try:
                with java_heap(self.jvm_heap):
                    self._sw = ScienceWorldEnv("", envStepLimit=10**9)  # step limits are ours, per task
            except Exception as e:  # noqa: BLE001 - py4j/JVM start-up failures
                raise EnvError(f"could not start the ScienceWorld JVM ({e}); {_INSTALL_JAVA}") from e
        return self._sw

    @contextmanager
    def _alive(self) -> Iterator[None]:
        """JVM calls of an episode: if the JVM died under them, drop it and raise EnvLost (the next reset starts
        a new one); any other error passes through."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - py4j raises several types when its JVM is gone
            if self._sw is None or not exited(self._sw._gateway.java_process):
                raise
            sw, self._sw = self._sw, None
            sw.close = lambda: None  # its __del__ would try the dead gateway again
            raise EnvLost(f"the ScienceWorld JVM died ({type(e).__name__}); replay the episode") from e

    def jvm_pid(self) -> int | None:
        """The JVM's process id while one runs (fault-injection tests kill it)."""
        return self._sw._gateway.java_process.pid if self._sw is not None else None

    def close(self) -> None:
        sw, self._sw = self._sw, None
        if sw is not None:
            proc = sw._gateway.java_process
            try:
                sw.close()
            except Exception:  # noqa: BLE001 - the JVM may already be gone
                pass
            sw.close = lambda: None  # its __del__ closes again; once is enough
            try:
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                proc.kill()
        super().close()

    # -- task lists ---------------------------------------------------------------------------------------
    def _variations(self) -> dict[str, dict[str, list[int]]]:
        path = self.cache / "variations.json"
        data = read_json(path)
        if data is None:
            sw = self._jvm()
            data = {}
            for name in sw.get_task_names():
                sw.load(name, 0, "")
                data[name] = {"train": sw.get_variations_train(), "dev": sw.get_variations_dev(),
                              "test": sw.get_variations_test()}
            write_json_atomic(path, data)
        return data

    def _max_steps(self, name: str, split: str) -> int:
        eto, fit = STEP_LIMITS[name]
        return eto if self.eto_step_limits and split != "train" else fit

    def _all_tasks(self) -> dict[str, list[Task]]:
        if self._tasks is None:
            variations = self._variations()
            chosen: dict[str, dict[str, list[int]]] = {split: {} for split in SPLITS}  # split -> task -> variations
            for name in self.task_names:
                for split in ("seen", "unseen"):
                    chosen[split][name] = variations[name][_SPLIT_SOURCE[split]][:self.per_task.get(split)]
                chosen["train"][name], chosen["valid"][name] = split_off_valid(
                    variations[name]["train"], self.per_task.get("train"), self.per_task.get("valid"))
            self._tasks = {
                split: [Task(f"sciworld:{name}:{v}", split, self._max_steps(name, split), name)
                        for name in self.task_names for v in chosen[split][name]]
                for split in SPLITS
            }
            self._index = {t.task_id: t for ts in self._tasks.values() for t in ts}
        return self._tasks

    def tasks(self, split: str) -> list[Task]:
        check_split(split)
        return list(self._all_tasks()[split])

    def task(self, task_id: str) -> Task:
        self._all_tasks()
        if task_id not in self._index:
            raise EnvError(f"unknown task {task_id!r} for env 'sciworld' (ids look like sciworld:boil:21)")
        return self._index[task_id]

    # -- expert actions -------------------------------------------------------------------------------------
    def _gold_file(self, task: Task) -> Path:
        _, name, var = task.task_id.split(":")
        return self.cache / "gold" / f"{name}-{var}.json"

    def _teleport_file(self, task: Task) -> Path:
        return self._gold_file(task).with_suffix(".teleport.json")

    def _expert_file(self, task: Task) -> Path:
        return self._teleport_file(task) if self.expert_path == "teleport" else self._gold_file(task)

    def _load(self, task: Task, gold: bool = False) -> None:
        _, name, var = task.task_id.split(":")
        self._jvm().load(name, int(var), SIMPLIFICATION, generateGoldPath=gold)

    def _winning_prefix(self, actions: list[str]) -> tuple[bool, int]:
        """Replay `actions` from the loaded task's reset: whether they win, and how many it takes."""
        sw = self._jvm()
        sw.reset()
        for i, action in enumerate(actions):
            sw.server.step(action)
            if round(100 * sw.server.getScore()) >= 100:
                return True, i + 1
            if sw.server.getCompleted():
                break
        return False, len(actions)

    def _gold(self, task: Task) -> dict[str, Any]:
        """The task's gold path, generated once and cached; may leave the simulator in another task's state."""
        data = read_json(self._gold_file(task))
        if data is None:
            self._load(task, gold=True)
            actions = list(self._jvm().get_gold_action_sequence())
            # Replay it to cut what follows the win (gold paths often end with a spare `wait1`) and to record
            # whether it wins at all (ScienceWorld's gold paths win ~270 times in 271).
            won, n = self._winning_prefix(actions)
            data = {"actions": actions[:n], "won": won, "generated_length": len(actions)}
            write_json_atomic(self._gold_file(task), data)
        return data

    def _teleport(self, task: Task) -> dict[str, Any]:
        """`teleported(gold path)`, replayed once to check that it still wins, and cached beside the gold path."""
        path = self._teleport_file(task)
        data = read_json(path)
        if data is None:
            actions = teleported(self._gold(task)["actions"])
            self._load(task)
            won, n = self._winning_prefix(actions)
            data = {"actions": actions[:n], "won": won}
            write_json_atomic(path, data)
        return data

    def expert_actions(self, task_id: str) -> list[str]:
        task = self.task(task_id)
        data = read_json(self._expert_file(task))
        if data is None:
            data = self._teleport(task) if self.expert_path == "teleport" else self._gold(task)
            if self._task is not None and not self._over:  # replaying replaced the episode in flight: restore it
                self._load(self._task)
                self._sw.reset()
                for action in self._history:
                    self._sw.server.step(action)
        if self.expert_path == "teleport" and not data["won"]:  # the rare path teleporting breaks: the gold one
            data = self._gold(task)
        return list(data["actions"])

    # -- playing --------------------------------------------------------------------------------------------
    def _reset(self, task: Task, seed: int | None) -> tuple[str, str]:
        with self._alive():
            self._load(task)
            obs, info = self._sw.reset()
            self._history, self._over = [], False
            self._last = StepInfo(0.0, False, True)
            self._refresh_admissible()
        instruction = re.sub(r"^\s*Task Description:\s*", "", info["taskDesc"]).strip()
        return instruction, obs.strip()

    def _step(self, action: str) -> tuple[str, StepInfo, bool]:
        if self._over:
            return INVALID_ACTION_OBS, StepInfo(self._last.score, self._last.won, False), True
        command = _normalize(action)
        if not command:
            return _NO_MATCH, StepInfo(self._last.score, False, False), False
        # The simulator's own calls: ScienceWorldEnv.step would also fetch look/inventory/the valid-action list
        # on every step (4 more JVM round trips) that this API does not use.
        with self._alive():
            server = self._sw.server
            obs = server.step(command)
            raw = int(round(100 * server.getScore()))
            self._history.append(command)
            won = raw >= 100
            self._over = bool(server.getCompleted()) or raw < 0 or won
            self._last = StepInfo(min(1.0, max(0.0, raw / 100)), won, not obs.startswith(_NO_MATCH))
            self._refresh_admissible()
        return obs.strip() or INVALID_ACTION_OBS, self._last, self._over

    def _refresh_admissible(self) -> None:
        if self.with_admissible:
            self._admissible = [] if self._over else sorted(self._sw.get_valid_action_object_combinations())

    def _extra_info(self) -> dict[str, Any]:
        return {"admissible": list(self._admissible)} if self.with_admissible else {}
