"""Build TextWorld games into the cache, in this process or in parallel worker subprocesses.

Generation is pure Python (GIL-bound), so parallelism needs processes. Plain subprocesses running `worker_main`
are used rather than multiprocessing: spawn would re-import the caller's `__main__` (scripts without a main guard,
Ray workers, pytest), and fork is unsafe in threaded hosts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from .atomic import publish_dir
from .cache import build_in_subprocesses, read_json

GAME_FILE = "tw-game.z8"  # jericho strips the status line only for story files named tw-*
META_FILE = "meta.json"
_SEED_RETRY_STRIDE = 100_003  # a seed whose quest cannot be generated is retried deterministically at seed + k*stride


def game_ready(dest: Path) -> bool:
    """A cached game is playable: its meta.json parses and its story file is a whole Z-machine file (version byte
    1-8; the length its header declares, at 0x1A in units of 2 / 4 / 8 bytes by version, fits in the file). A game
    file deleted or cut short in the cache is then rebuilt instead of failing in every env worker."""
    if read_json(dest / META_FILE) is None:
        return False
    try:
        story = (dest / GAME_FILE).read_bytes()
    except OSError:
        return False
    if len(story) < 64 or not 1 <= story[0] <= 8:
        return False
    scale = 2 if story[0] <= 3 else 4 if story[0] <= 5 else 8
    return 0 < int.from_bytes(story[0x1A:0x1C], "big") * scale <= len(story)


def build_game(spec: dict[str, Any]) -> dict[str, Any]:
    """Generate and compile one game into spec["dest"] (atomically); return its metadata."""
    import textworld
    import textworld.challenges
    from textworld.generator import QuestGenerationError, compile_game

    dest = Path(spec["dest"])
    meta_path = dest / META_FILE
    if meta_path.exists():  # built meanwhile by another process
        return json.loads(meta_path.read_text())
    _, make, _ = textworld.challenges.CHALLENGES[spec["challenge"]]
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        game = None
        for attempt in range(5):
            seed = spec["seed"] + attempt * _SEED_RETRY_STRIDE
            options = textworld.GameOptions()
            options.seeds = seed
            options.path = str(tmp / GAME_FILE)
            options.file_ext = ".z8"
            options.force_recompile = True
            try:
                game = make(settings=dict(spec["settings"]), options=options)
                break
            except QuestGenerationError:
                continue
        if game is None:
            raise RuntimeError(f"no quest could be generated for {spec}")
        compile_game(game, options)
        (tmp / GAME_FILE).with_suffix(".ni").unlink(missing_ok=True)  # Inform 7 source: not needed to play
        meta = {
            "task_id": spec["task_id"],
            "challenge": spec["challenge"],
            "settings": spec["settings"],
            "seed": seed,
            "objective": game.objective,
            "walkthrough": list(game.metadata.get("walkthrough") or []),
            "max_score": game.max_score,
            "textworld": textworld.__version__,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        publish_dir(tmp, dest)  # the folder appears complete or not at all
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_games(specs: list[dict[str, Any]], workers: int) -> None:
    """Build `specs` in up to `workers` subprocesses (always out of process: the env process stays lean)."""
    build_in_subprocesses("envs._twbuild", specs, workers, "TextWorld game")


def _cache_knowledge_bases() -> None:
    """Parse each challenge's knowledge base once per process, not once per game (~0.4 s a game).

    Generation only reads the KB, so games come out identical (checked: same walkthroughs, objectives and
    serialised games for every kind and setting). Done only in worker processes, never in a caller's process.
    """
    import functools

    from textworld.generator.data import KnowledgeBase

    load = functools.lru_cache(maxsize=16)(KnowledgeBase.load.__func__)
    def cached_load(cls, target_dir=None, logic_path=None, grammar_path=None):  # type: ignore[no-untyped-def]
        return load(cls, target_dir, logic_path, grammar_path)

    KnowledgeBase.load = classmethod(cached_load)  # type: ignore[method-assign]


def worker_main() -> None:
    """Subprocess entry: build the JSON list of specs read from stdin."""
    _cache_knowledge_bases()
    for spec in json.loads(sys.stdin.read()):
        build_game(spec)
