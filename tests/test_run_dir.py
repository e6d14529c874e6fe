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
