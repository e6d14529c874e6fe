"""Bad input (issue 23 §1): each is one `retrorl: error:` line naming the setting and the fix, exit status 2, and
no run folder when it can be found before the run starts."""

from __future__ import annotations

import pytest

from cluster.cli import main
from cluster.config import ConfigError, load_config
from envs import make_env
from envs.core import EnvError


def _fails_cleanly(capsys, tmp_path, *overrides: str, command: str = "train") -> str:
    """main() exits 2 with one error line and leaves run_root empty; the line is returned."""
    code = main([command, "--set", f"run_root={tmp_path}", *(x for o in overrides for x in ("--set", o))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("retrorl: error: ") and err.count("\n") == 1, err
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
    return err


@pytest.mark.parametrize("key", ["env.train_tasks", "env.eval_tasks"])
@pytest.mark.parametrize("value", [-1, 0])
def test_task_caps_below_one_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("family, kwargs, key, wanted", [
    ("textworld", {"n_train": "a"}, "n_train", "int"),
    ("textworld", {"kinds": 3}, "kinds", "Sequence[str] | str"),
    ("textworld", {"n_seen": 2.5}, "n_seen", "int"),
    ("sciworld", {"per_task": 5}, "per_task", "dict[str, int | None] | None"),
    ("twx", {"games": {"coin": 1}}, "games", "Sequence[str] | str"),
    ("webshop", {"timeout_s": "fast"}, "timeout_s", "float"),
])
def test_env_kwargs_of_the_wrong_type_name_key_and_type(family, kwargs, key, wanted):
    """One check for every family, from its constructor's annotations, before the family runs."""
    with pytest.raises(EnvError) as err:
        make_env(family, **kwargs)
    assert f"env.kwargs.{key}=" in str(err.value) and f"{key}: {wanted};" in str(err.value)


def test_env_kwargs_of_the_right_type_still_build():
    assert make_env("textworld", kinds="treasure", n_train=1, n_seen=1, n_unseen=1).kinds == ("treasure",)
    assert make_env("textworld", kinds=["treasure"], n_train=1, n_seen=1, n_unseen=1, n_valid=None)


def test_cli_env_kwargs_type_error(capsys, tmp_path):
    err = _fails_cleanly(capsys, tmp_path, "model.path=tiny-llama", "env.kwargs={n_train: a}")
    assert "env.kwargs.n_train" in err and "int" in err
