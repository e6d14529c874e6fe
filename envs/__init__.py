"""Text environments behind one API (see `envs.core`); `make_env(name)` or `gymnasium.make("retrorl/<name>-v0")`.

Families: `textworld` (default; offline-generated TextWorld games) and `sciworld` (ScienceWorld, needs Java 17 and
the `sciworld` extra, imported only when built). Nothing here imports Ray.
"""

from .core import INVALID_ACTION_OBS, SPLITS, EnvError, EnvLost, StepInfo, Task, TextEnv, families, make_env, register_family
from .sciworld_env import SciWorldEnv
from .textworld_env import TextWorldEnv

register_family("textworld", TextWorldEnv)
register_family("sciworld", SciWorldEnv)

DEFAULT_ENV = "textworld"

__all__ = [
    "DEFAULT_ENV", "INVALID_ACTION_OBS", "SPLITS", "EnvError", "EnvLost", "SciWorldEnv", "StepInfo", "Task", "TextEnv",
    "TextWorldEnv", "families", "make_env", "register_family",
]
