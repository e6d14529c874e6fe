"""The run directory records what its numbers depend on: the resolved config and the installed versions."""

from __future__ import annotations

import importlib.metadata
import json
import platform

import yaml

from cluster.config import load_config
from cluster.run_dir import RunDir


def test_a_new_run_records_its_config_and_package_versions(tmp_path):
    cfg = load_config(None, [f"run_root={tmp_path}", "retroact.lr=1e-5"])
    run = RunDir.create(cfg)
    assert yaml.safe_load((run.path / "config.yaml").read_text())["retroact"]["lr"] == 1e-5
    versions = json.loads((run.path / "versions.json").read_text())
    assert versions["python"] == platform.python_version()
    for name in ("torch", "transformers", "peft", "deepspeed", "ray", "textworld"):  # the base install's
        assert versions[name] == importlib.metadata.version(name)


def test_a_relative_run_root_leaves_rays_working_dir_copy(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the driver in Ray's unpacked copy of the working dir, which Ray evicts:
    a relative run_root must land in the home directory instead, and anywhere else stay relative to the cwd."""
    home, plain = tmp_path / "home", tmp_path / "project"
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    for folder in (home, plain, copy):
        folder.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(copy)
    run = RunDir.create(load_config(None, ["run_root=runs"]))
    assert run.path.parent == home / "runs" and (run.path / "config.yaml").is_file()
    assert not (copy / "runs").exists()
    monkeypatch.chdir(plain)
    assert RunDir.create(load_config(None, ["run_root=runs"])).path.parent == plain / "runs"
