"""Text environments behind one API (see `envs.core`); `make_env(name)` or `gymnasium.make("retrorl/<name>-v0")`.

Families (one module each; third-party packages are imported only when a family is built): `textworld` (default;
offline-generated TextWorld games), `sciworld` (ScienceWorld), `alfworld` (ALFWorld's TextWorld engine: the user's
official games or games generated offline), `twx` (TextWorld-Express), `textcraft` (TextCraft), `hotpotqa` (ReAct's
tools over the user's HotpotQA file) and `webshop` (a client of the user's WebShop server). `retrorl envs` lists
them with what each needs. Nothing here imports Ray.
"""

from .core import INVALID_ACTION_OBS, SPLITS, EnvError, EnvLost, StepInfo, Task, TextEnv, families, make_env, register_family
from .alfworld_env import AlfWorldEnv
from .hotpotqa_env import HotpotQAEnv
from .sciworld_env import SciWorldEnv
from .textcraft_env import TextCraftEnv
from .textworld_env import TextWorldEnv
from .twx_env import TwxEnv
from .webshop_env import WebShopEnv

register_family("textworld", TextWorldEnv)
register_family("sciworld", SciWorldEnv)
register_family("alfworld", AlfWorldEnv)
register_family("twx", TwxEnv)
register_family("textcraft", TextCraftEnv)
register_family("hotpotqa", HotpotQAEnv)
register_family("webshop", WebShopEnv)

DEFAULT_ENV = "textworld"

__all__ = [
    "AlfWorldEnv", "DEFAULT_ENV", "INVALID_ACTION_OBS", "SPLITS", "EnvError", "EnvLost", "HotpotQAEnv", "SciWorldEnv",
    "StepInfo", "Task", "TextCraftEnv", "TextEnv", "TextWorldEnv", "TwxEnv", "WebShopEnv", "families", "make_env",
    "register_family",
]
