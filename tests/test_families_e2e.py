"""Each benchmark family through the whole system: `retrorl train --method sft` (expert demos, IL of actor and
reflector by the DeepSpeed learner, the adapters served, ReAct and Reflexion rows on seen and unseen tasks), and
`retrorl eval` on WebShop, which has no expert demos (against tests/webshop_server.py, the stand-in for a server
whose data no registry ships). Tiny random model, two tasks per split: these check the plumbing, not the scores.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from cluster.cli import main
from hotpotqa_data import write_questions
from webshop_server import ShopServer, catalogue, goals

TINY = [
    "model.path=tiny-llama", "eval.trials=2", "agent.actor.max_new_tokens=80", "agent.reflector.max_new_tokens=12",
    "agent.max_steps=3", "rollout.env_workers=1", "rollout.envs_per_worker=2", "ray.num_cpus=2",
    "learner.epochs=1", "agent.max_context_tokens=2048",
]
HAVE_JAVA = shutil.which("java") is not None


def _rows(run_root: Path) -> tuple[Path, list[dict]]:
    (run,) = list(run_root.iterdir())
    return run, json.loads((run / "eval" / "results.json").read_text())


def _families(tmp_path_factory) -> dict[str, list[str]]:
    hotpot = write_questions(tmp_path_factory.mktemp("hotpot") / "hotpot.json")
    families = {
        "textcraft": ["env.name=textcraft", "env.kwargs={n_train: 2, n_seen: 2, n_unseen: 2}"],
        "hotpotqa": ["env.name=hotpotqa", f"env.kwargs={{data_file: {hotpot}, n_train: 2, n_seen: 2, n_unseen: 2}}"],
    }
    if importlib.util.find_spec("alfworld") is not None:
        families["alfworld"] = ["env.name=alfworld", "env.kwargs={task_types: [pick_and_place_simple, "
                                "look_at_obj_in_light], n_train: 2, n_seen: 2, n_unseen: 2}"]
    if HAVE_JAVA:
        families["twx"] = ["env.name=twx", "env.kwargs={games: [sorting, arithmetic], n_train: 1, n_seen: 1, "
                           "n_unseen: 1}"]
    return families


@pytest.mark.slow
@pytest.mark.parametrize("family", ["alfworld", "textcraft", "hotpotqa", "twx"])
def test_sft_on_each_family(family, tmp_path, tmp_path_factory):
    families = _families(tmp_path_factory)
    if family not in families:
        pytest.skip(f"{family} needs its extra (and Java 17 for twx)")
    argv = ["train", "--method", "sft", "--set", f"run_root={tmp_path}"]
    for override in TINY + families[family]:
        argv += ["--set", override]
    assert main(argv) == 0
    run, rows = _rows(tmp_path)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (demos,) = [m for m in metrics if m["event"] == "demos"]
    assert demos["tasks"] == demos["expert_wins"] == 2  # every training task's expert demo won
    assert {(r["method"], r["split"]) for r in rows} == {
        (label, split) for label in ("SFT ReAct", "SFT + reflection") for split in ("seen", "unseen")}
    assert all(r["episodes"] == 2 for r in rows)
    # Failed demos (expert steps out of order where no action list exists) teach the reflector; on HotpotQA an
    # early Finish[gold answer] still wins, so it may have none.
    roles = ["actor"] + (["reflector"] if demos["episodes"] > demos["tasks"] else [])
    assert len(roles) == 2 or family == "hotpotqa"
    for role in roles:
        assert (run / "adapters" / role / "v1" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_webshop_is_evaluated_not_trained(tmp_path, capsys):
    with ShopServer(catalogue(), goals()) as shop:
        sets = [f"run_root={tmp_path}", "env.name=webshop",
                f"env.kwargs={{server_url: '{shop.url}', n_train: 1, n_valid: 0, n_seen: 1, n_unseen: 2}}"]
        argv = [a for s in TINY + sets for a in ("--set", s)]
        assert main(["train", "--method", "sft", *argv]) == 2  # no expert demos: refused before any run dir
        assert "no expert demos" in capsys.readouterr().err and not any(tmp_path.iterdir())
        assert main(["eval", *argv]) == 0
    run, rows = _rows(tmp_path)
    assert {(r["method"], r["split"], r["episodes"]) for r in rows} == {
        (label, split, n) for label in ("base ReAct", "base + reflection") for split, n in (("seen", 1), ("unseen", 2))}
