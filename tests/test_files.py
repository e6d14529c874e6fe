"""File helpers every layer shares (envs/cache.py): one resolver of the retrorl cache folder."""

from __future__ import annotations

from agents.model import TINY_MODEL, resolve_model
from envs import TextWorldEnv
from envs.cache import resolve_cache_dir


def test_one_cache_resolver_expands_home_for_models_and_envs(tmp_path, monkeypatch):
    """RETRORL_CACHE=~/... names the same folder for the model cache and the env families' caches (the envs'
    resolver used to keep a literal `~` folder under the working directory)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RETRORL_CACHE", "~/retrorl-cache")
    monkeypatch.chdir(tmp_path)
    expected = tmp_path / "home" / "retrorl-cache"
    assert resolve_cache_dir() == expected
    assert TextWorldEnv().cache_dir == expected
    assert TextWorldEnv(cache_dir="~/other").cache_dir == tmp_path / "home" / "other"
    assert resolve_model(TINY_MODEL).parent.parent == expected  # <cache>/models/tiny-llama
    assert not (tmp_path / "~").exists()
