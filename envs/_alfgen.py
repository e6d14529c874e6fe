"""Offline ALFWorld games: PDDL problems generated from what the `alfworld` wheel ships, solved by ALFWorld's expert.

The wheel has no games (`alfworld-download` fetches them), but it ships the pieces the official games were made
from: the scene inventories (`gen/layouts/FloorPlan<n>-objects.json`: object types in the scene;
`-openable.json`: the static receptacle instances with their ALFRED ids), the object/receptacle tables
(`gen/constants.py`: which receptacle types can hold which objects, which objects can be cleaned/heated/cooled,
which task types fit which room), the goal templates and PDDL goals of the 6 task types (`gen/goal_library.py`),
the PDDL domain and the text grammar (`data/`). A game here is exactly what `alfworld-generate` writes per trial: a
`game.tw-pddl` (domain, grammar with the task text, problem, `solvable`, `walkthrough`) beside a `traj_data.json`
(`task_type`, `pddl_params`) that ALFWorld's hand-coded expert reads (handcoded_expert.py:549-556).

Problems follow the shape ALFRED's writer gives them (gen/game_states/planned_game_state.py:60-355: typed objects,
`canContain` table, receptacle/object facts, one location per receptacle, the agent at its own start location, the
goal from goal_library.py), but object placement is sampled, not taken from the 3D scene. Each candidate game is
played by ALFWorld's hand-coded expert through the wrappers ALFWorld uses (`AlfredDemangler`, `AlfredInfos`,
`AlfredExpert`, as in `alfworld-generate`'s `is_solvable`). If it fails or needs more than EXPERT_MAX_STEPS
actions, `oracle_plan` (the task type's recipe read off the game's facts, replayed to check it wins) is the demo;
ALFWorld's planner expert would give the same kind of plan but took 15-30 s a kitchen game here. A game neither
solves within the cap is resampled. pick_two always takes the oracle: in alfworld 0.4.2 the hand-coded expert
tracks its inventory on `put` actions (handcoded_expert.py:178) but the grammar's command is `move ... to ...`
(alfred.twl2:211), so after the first object it walks back to where that object came from and never finishes.

Everything random is drawn from `random.Random(seed)`, except two places inside alfworld that use the module-level
`random` (the task-text template choice, misc.py:86, and the hand-coded expert's tie-breaks,
handcoded_expert.py:270,309,318,565): those run under `_seeded_global_random`, which restores the caller's
state. Builders are plain subprocesses (as in `_twbuild`): generation is GIL-bound, and fast_downward's translator
rewrites `sys.argv` (fast_downward/interface.py:173), which must not happen in a host process.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

from .atomic import publish_dir
from .cache import build_in_subprocesses

GAME_FILE = "game.tw-pddl"  # the names ALFWorld's loader looks for (alfred_tw_env.py:155-160)
TRAJ_FILE = "traj_data.json"
META_FILE = "meta.json"

# alfred_tw_env.py:16-21, in ALFWorld's task-type order (config `task_types: [1..6]`)
TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
EXPERT_MAX_STEPS = 40  # demos must fit ETO's 40-step limit (and RetroAct's 50)
MAX_ATTEMPTS = 60  # draws per game before giving up (measured: 113 of the 120 default games took the first, max 3)
# The appliance a task needs, which the target must not start in and must not be the goal receptacle
# (task_game_state.py:164-175).
STATION = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}
LAMPS = ("DeskLamp", "FloorLamp")  # constants.VAL_ACTION_OBJECTS["Toggleable"]
# The scene files do not say where a lamp stands; ALFWorld's goal needs it `inReceptacle` of the receptacle the
# agent stands at (goal_library.py look_at_obj_in_light), so lamps go on furniture of these types.
LAMP_HOSTS = ("SideTable", "Desk", "Dresser", "CoffeeTable", "TVStand", "DiningTable", "Shelf", "CounterTop")
_SYNTH_POSITION = "+00.00|+00.00|+00.00"  # receptacles in a scene's objects.json but without an ALFRED id
# planned_game_state.py:14-22: how ALFRED turns object ids into PDDL names (and '#' into the type dash)
_PDDL_CHARS = {"-": "_minus_", "#": "-", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
_START = "loc|0|0|0|0"  # the agent's start: no receptacle there ("You are in the middle of a room")


@dataclass(frozen=True)
class Scene:
    number: int
    room: str  # Kitchen / LivingRoom / Bedroom / Bathroom
    receptacles: tuple[tuple[str, str], ...]  # (ALFRED id, type), static receptacles
    objects: tuple[str, ...]  # object types that can be carried (some receptacle type may hold them)
    lamps: tuple[str, ...]


def _constants() -> Any:
    import alfworld.gen.constants as constants

    return constants


def _layouts() -> Path:
    return Path(_constants().__file__).parent / "layouts"


@lru_cache(maxsize=None)
def scene(number: int) -> Scene:
    c = _constants()
    folder = _layouts()
    types = json.loads((folder / f"FloorPlan{number}-objects.json").read_text())
    openable = json.loads((folder / f"FloorPlan{number}-openable.json").read_text())
    static = set(c.RECEPTACLES) - set(c.MOVABLE_RECEPTACLES)
    receptacles = []
    for rid in sorted(openable):
        parts = rid.split("|")
        rtype = parts[-1] if len(parts) > 4 else parts[0]  # "Sink|x|y|z|SinkBasin" is a SinkBasin
        if rtype in static:
            receptacles.append((rid, rtype))
    present = {t for _, t in receptacles}
    for t in sorted(set(types) & (static - present)):
        # ALFRED names basins "<Sink|Bathtub>|x|y|z|<Type>", and ALFWorld's demangler relies on it
        # (misc.py:36-37: "basin" in the id -> name + "basin").
        rid = f"{t[:-5]}|{_SYNTH_POSITION}|{t}" if t.endswith("Basin") else f"{t}|{_SYNTH_POSITION}"
        receptacles.append((rid, t))
    holders = {t for _, t in receptacles}
    carried = sorted(t for t in set(types) if t not in static and t in c.OBJECTS_SET
                     and any(t in c.VAL_RECEPTACLE_OBJECTS[h] for h in holders))
    lamps = tuple(t for t in LAMPS if t in types and holders & set(LAMP_HOSTS))
    room = next(r for r, nums in c.SCENE_TYPE.items() if number in nums)
    return Scene(number, room, tuple(receptacles), tuple(carried), lamps)


def scene_pool(split: str) -> list[int]:
    """train and seen: ALFRED's training scenes; unseen: the scenes its generator holds out (constants.py:118-126)."""
    c = _constants()
    return sorted(c.TEST_SCENE_NUMBERS if split == "unseen" else c.TRAIN_SCENE_NUMBERS)


class _Infeasible(Exception):
    """This scene/target draw cannot make the task; draw again."""


def sample_task(
    task_type: str, scenes: Sequence[int], rng: random.Random
) -> tuple[Scene, dict[str, Any], list[tuple[str, str, str]]]:
    """Draw a scene, the task's targets and the object placement: (scene, pddl_params, [(object id, type, host id)])."""
    c = _constants()
    valid_rooms = c.GOALS_VALID[task_type]
    sc = scene(rng.choice([n for n in scenes if scene(n).room in valid_rooms]))
    kinds = {rid: t for rid, t in sc.receptacles}
    params = {"object_target": "", "parent_target": "", "toggle_target": "", "mrecep_target": "",
              "object_sliced": False}  # sliced tasks are skipped by ALFWorld (alfred_tw_env.py:162)
    forbidden: set[str] = set()  # receptacle types the target must not start in
    candidates = list(sc.objects)
    if task_type in STATION:
        station, prop = STATION[task_type]
        if station not in kinds.values():
            raise _Infeasible
        candidates = [o for o in candidates if o in c.VAL_ACTION_OBJECTS[prop]]
        forbidden.add(station)
    if task_type == "look_at_obj_in_light":
        if not sc.lamps:
            raise _Infeasible
        params["toggle_target"] = rng.choice(sc.lamps)
    if not candidates:
        raise _Infeasible
    target = rng.choice(candidates)
    params["object_target"] = target
    if task_type != "look_at_obj_in_light":
        parents = sorted({t for t in kinds.values() if target in c.VAL_RECEPTACLE_OBJECTS[t]} - forbidden)
        if not parents:
            raise _Infeasible
        params["parent_target"] = rng.choice(parents)
        forbidden.add(params["parent_target"])  # the goal must not hold at the start

    placed: list[tuple[str, str, str]] = []
    for otype in sc.objects:
        hosts = [rid for rid, t in sc.receptacles if otype in c.VAL_RECEPTACLE_OBJECTS[t]]
        if otype == target:
            hosts = [rid for rid in hosts if kinds[rid] not in forbidden]
            if not hosts:
                raise _Infeasible
            low = 2 if task_type == "pick_two_obj_and_place" else 1
            count = rng.randint(low, max(low, c.PICKUP_REPEAT_MAX))
        else:
            count = rng.randint(1, c.MAX_NUM_OF_OBJ_INSTANCES)
        for i in range(count):
            placed.append((f"{otype}|{i + 1:+06.2f}|{sc.number:+06.2f}|+00.00", otype, rng.choice(hosts)))
    for lamp in sc.lamps:
        hosts = [rid for rid, t in sc.receptacles if t in LAMP_HOSTS]
        placed.append((f"{lamp}|+01.00|{sc.number:+06.2f}|+00.00", lamp, rng.choice(hosts)))
    return sc, params, placed


def problem_pddl(
    task_type: str, sc: Scene, params: dict[str, Any], placed: list[tuple[str, str, str]], name: str
) -> str:
    """The PDDL problem, in the form ALFRED's writer uses (planned_game_state.py:60-100 and 140-355)."""
    c = _constants()
    import alfworld.gen.goal_library as glib
    from alfworld.gen.utils.py_util import multireplace

    static = sorted(set(c.RECEPTACLES) - set(c.MOVABLE_RECEPTACLES))
    otypes = sorted(c.OBJECTS_SET - set(static))
    # The domain names SinkBasinType, MicrowaveType, KnifeType, ... in action preconditions, so every type
    # constant is declared, as ALFRED does (planned_game_state.py:64-70).
    location = {rid: f"loc|{i + 1}|0|0|0" for i, (rid, _) in enumerate(sc.receptacles)}
    kinds = {rid: t for rid, t in sc.receptacles}
    objs = ["agent1 # agent"] + [f"{t}Type # otype" for t in otypes] + [f"{t}Type # rtype" for t in static]
    objs += [f"{rid} # receptacle" for rid, _ in sc.receptacles] + [f"{oid} # object" for oid, _, _ in placed]
    objs += [f"{_START} # location"] + [f"{loc} # location" for loc in location.values()]
    init = ["(= (total-cost) 0)", f"(atLocation agent1 {_START})"]
    present = sorted({t for _, t, _ in placed})
    for rtype in sorted(set(kinds.values())):
        init += [f"(canContain {rtype}Type {o}Type)" for o in present if o in c.VAL_RECEPTACLE_OBJECTS[rtype]]
    for rid, rtype in sc.receptacles:
        init += [f"(receptacleType {rid} {rtype}Type)", f"(receptacleAtLocation {rid} {location[rid]})"]
        if rtype in c.OPENABLE_CLASS_SET:
            init.append(f"(openable {rid})")
    props = {"Cleanable": "cleanable", "Heatable": "heatable", "Coolable": "coolable", "Sliceable": "sliceable",
             "Toggleable": "toggleable"}
    for oid, otype, host in placed:
        init += [f"(objectType {oid} {otype}Type)", f"(inReceptacle {oid} {host})",
                 f"(objectAtLocation {oid} {location[host]})"]
        if otype not in LAMPS:
            init.append(f"(pickupable {oid})")
        if otype in c.MOVABLE_RECEPTACLES_SET:
            init.append(f"(isReceptacleObject {oid})")
        init += [f"({pred} {oid})" for prop, pred in props.items() if otype in c.VAL_ACTION_OBJECTS[prop]]
    goal = glib.gdict[task_type]["pddl"].format(
        obj=params["object_target"], recep=params["parent_target"], toggle=params["toggle_target"], mrecep="")
    text = "\n".join([f"(define (problem {name})", "    (:domain alfred)", "    (:objects",
                      *(f"        {o}" for o in objs), "    )", "    (:init", *(f"        {f}" for f in init), "    )"])
    # the goal text closes the `define` itself (goal_library.py)
    return multireplace(text, _PDDL_CHARS) + "\n" + multireplace(goal, _PDDL_CHARS)


@contextlib.contextmanager
def _seeded_global_random(seed: int) -> Iterator[None]:
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@contextlib.contextmanager
def keep_argv() -> Iterator[None]:
    """fast_downward's translator sets sys.argv on every PDDL load (fast_downward/interface.py:173); undo it."""
    saved = list(sys.argv)
    try:
        yield
    finally:
        sys.argv[:] = saved


def play_stack(expert_type: str | None = None, facts: bool = False) -> Any:
    """textworld's PddlEnv behind ALFWorld's wrappers, as ALFWorld plays a game (alfred_tw_env.py:250-254,
    alfworld-generate:43-47). Each stack loads its own copy of fast-downward's library (interface.py:97-107)."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
    from textworld.envs import PddlEnv

    infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=facts, extras=["gamefile"])
    env = AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False))
    return AlfredExpert(env, expert_type=expert_type) if expert_type else env


def close_stack(env: Any) -> None:
    """End the game and free fast-downward's task in the stack's library copy. The copy itself stays mapped:
    unloading it (fast_downward.close_lib's dlclose) made the interpreter crash at exit (SIGSEGV) once two copies
    had been unloaded in one process (measured here), so only `cleanup()` runs."""
    lib = getattr(env, "downward_lib", None)
    env.close()  # PddlEnv.close itself does nothing (textworld/core.py:264)
    if lib is not None:
        lib.cleanup()


def run_handcoded(env: Any, game_file: str, seed: int, limit: int = EXPERT_MAX_STEPS) -> list[str] | None:
    """ALFWorld's hand-coded expert on a game (alfworld-generate's is_solvable without perturbation); its actions
    if it wins within `limit`, else None. `env` is a play_stack("handcoded")."""
    actions: list[str] = []
    with _seeded_global_random(seed), keep_argv():
        try:
            env.load(game_file)
            state = env.reset()
            while len(actions) < limit:
                action = state["extra.expert_plan"][0]
                state, _, done = env.step(action)
                actions.append(action)
                if done:
                    return actions if state["won"] else None
        except Exception:  # noqa: BLE001 - the expert raises when it gives up (HandCodedAgentFailed/Timeout)
            return None
    return None


def oracle_plan(facts: list[tuple[str, tuple[str, ...]]], task_type: str, params: dict[str, Any]) -> list[str]:
    """The shortest plan of the task's fixed recipe, read off the game's initial facts (demangled names):
    fetch the target (opening its receptacle if needed), use the appliance or lamp, place it. The fallback expert
    where ALFWorld's hand-coded one cannot finish. On 12 games where ALFWorld's planner expert also ran (15-30 s a
    kitchen game here, against milliseconds), both plans won, of equal length in 11 and one step longer in 1."""
    of_type: dict[str, list[str]] = {}
    host: dict[str, str] = {}
    openable = set()
    for name, args in facts:
        if name in ("objecttype", "receptacletype"):
            of_type.setdefault(args[1], []).append(args[0])
        elif name == "inreceptacle":
            host[args[0]] = args[1]
        elif name == "openable":
            openable.add(args[0])

    def instances(ctype: str) -> list[str]:
        return sorted(of_type.get(ctype.lower() + "type", []), key=lambda n: (n.split()[0], int(n.split()[-1])))

    plan: list[str] = []
    opened: set[str] = set()

    def visit(recep: str) -> None:
        plan.append(f"go to {recep}")
        if recep in openable and recep not in opened:
            plan.append(f"open {recep}")
            opened.add(recep)

    goal = instances(params["parent_target"]) if params["parent_target"] else []
    parent_types = set(goal)
    targets = [o for o in instances(params["object_target"]) if host.get(o) not in parent_types]
    wanted = 2 if task_type == "pick_two_obj_and_place" else 1
    if len(targets) < wanted or (params["parent_target"] and not goal):
        return []
    for obj in targets[:wanted]:
        visit(host[obj])
        plan.append(f"take {obj} from {host[obj]}")
        if task_type in STATION:
            station = instances(STATION[task_type][0])[0]
            plan += [f"go to {station}", f"{task_type.split('_')[1]} {obj} with {station}"]
        if task_type == "look_at_obj_in_light":
            lamp = instances(params["toggle_target"])[0]
            plan += [f"go to {host[lamp]}", f"use {lamp}"]
        else:
            visit(goal[0])
            plan.append(f"move {obj} to {goal[0]}")
    return plan


def run_oracle(env: Any, game_file: str, task_type: str, params: dict[str, Any],
               limit: int = EXPERT_MAX_STEPS) -> list[str] | None:
    """oracle_plan on a game, replayed to check that it wins. `env` is a play_stack(facts=True)."""
    with keep_argv():
        try:
            env.load(game_file)
            state = env.reset()
            facts = [(f.name, tuple(a.name.strip() for a in f.arguments)) for f in state["facts"]]
            plan = oracle_plan(facts, task_type, params)
            if not plan or len(plan) > limit:
                return None
            for action in plan:
                state, _, _ = env.step(action)
            return plan if state["won"] else None
        except Exception:  # noqa: BLE001 - a plan that does not apply: the game is unsolved
            return None


# See the module docstring: the hand-coded expert of alfworld 0.4.2 cannot finish these with the `move` grammar.
HANDCODED_CANNOT = frozenset({"pick_two_obj_and_place"})


class _Solvers:
    """The expert stacks of one process, made on first use (each holds a fast-downward copy)."""

    def __init__(self) -> None:
        self._stacks: dict[str, Any] = {}

    def stack(self, kind: str) -> Any:
        if kind not in self._stacks:
            self._stacks[kind] = play_stack("handcoded") if kind == "handcoded" else play_stack(facts=True)
        return self._stacks[kind]

    def solve(self, game_file: str, seed: int, limit: int = EXPERT_MAX_STEPS) -> tuple[list[str], str] | None:
        traj = json.loads((Path(game_file).parent / TRAJ_FILE).read_text())
        task_type, params = traj["task_type"], traj["pddl_params"]
        if task_type not in HANDCODED_CANNOT:
            actions = run_handcoded(self.stack("handcoded"), game_file, seed, limit)
            if actions is not None:
                return actions, "handcoded"
        plan = run_oracle(self.stack("oracle"), game_file, task_type, params, limit)
        return (plan, "oracle") if plan is not None else None

    def close(self) -> None:
        while self._stacks:
            close_stack(self._stacks.popitem()[1])


def _domain_and_grammar() -> tuple[str, str]:
    import alfworld

    data = Path(alfworld.__file__).parent / "data"  # info.py:13-15 (ALFRED_PDDL_PATH / ALFRED_TWL2_PATH)
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


def build_game(spec: dict[str, Any], solvers: _Solvers) -> dict[str, Any]:
    """Generate, solve and publish one game into spec["dest"] (a temp folder renamed into place)."""
    from alfworld.agents.utils.misc import add_task_to_grammar

    dest = Path(spec["dest"])
    if (dest / META_FILE).exists():  # built meanwhile by another process
        return json.loads((dest / META_FILE).read_text())
    domain, grammar = _domain_and_grammar()
    rng = random.Random(spec["seed"])
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for attempt in range(MAX_ATTEMPTS):
            try:
                sc, params, placed = sample_task(spec["task_type"], spec["scenes"], rng)
            except _Infeasible:
                continue
            traj = {"task_type": spec["task_type"], "pddl_params": params,
                    "scene": {"floor_plan": f"FloorPlan{sc.number}", "scene_num": sc.number,
                              "random_seed": spec["seed"]},
                    "task_id": spec["task_id"], "generator": "retrorl"}
            with _seeded_global_random(rng.randrange(2**32)):  # the template choice uses global random
                task_grammar = add_task_to_grammar(grammar, traj)
            name = f"retrorl_{spec['task_type']}_{spec['seed']}_{attempt}"
            game = {"pddl_domain": domain, "grammar": task_grammar, "solvable": None, "walkthrough": None,
                    "pddl_problem": problem_pddl(spec["task_type"], sc, params, placed, name)}
            (tmp / TRAJ_FILE).write_text(json.dumps(traj, indent=1, sort_keys=True))
            (tmp / GAME_FILE).write_text(json.dumps(game))
            solved = solvers.solve(str(tmp / GAME_FILE), rng.randrange(2**32))
            if solved is None:
                continue
            actions, expert = solved
            game.update(solvable=True, walkthrough=actions)  # the keys alfworld-generate writes (:139-141)
            (tmp / GAME_FILE).write_text(json.dumps(game))
            meta = {"task_id": spec["task_id"], "task_type": spec["task_type"], "split": spec["split"],
                    "scene": sc.number, "seed": spec["seed"], "attempt": attempt, "pddl_params": params,
                    "walkthrough": actions, "expert": expert, "n_objects": len(placed),
                    "n_receptacles": len(sc.receptacles)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
            publish_dir(tmp, dest)  # the folder appears complete or not at all
            return meta
        raise RuntimeError(f"no solvable game after {MAX_ATTEMPTS} draws for {spec['task_id']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_games(specs: list[dict[str, Any]], workers: int) -> None:
    """Build `specs` in up to `workers` subprocesses (never in the caller's process, see the module docstring)."""
    build_in_subprocesses("envs._alfgen", specs, workers, "ALFWorld game")


def worker_main() -> None:
    """Subprocess entry: build the JSON list of specs read from stdin."""
    solvers = _Solvers()
    for spec in json.loads(sys.stdin.read()):
        build_game(spec, solvers)
