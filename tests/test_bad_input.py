"""Bad input (issue 23 §1): each is one `retrorl: error:` line naming the setting and the fix, exit status 2, and
no run folder when it can be found before the run starts."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.trajectory import Episode, Generation, Step, Trial, new_episode_id
from cluster.cli import main
from cluster.config import ConfigError, load_config
from envs import make_env
from cluster.replay import replayed_round
from cluster.run_dir import RunDir
from envs.core import EnvError
from rollout.store import SCHEMA, StoreError, TrajectoryStore


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
    env = make_env("textworld", kinds=["treasure"], n_train=2, n_seen=3, n_unseen=1, n_valid=None)
    assert env.split_sizes() == {"train": 2, "valid": 3, "seen": 3, "unseen": 1}  # None: valid as large as seen


def test_cli_env_kwargs_type_error(capsys, tmp_path):
    err = _fails_cleanly(capsys, tmp_path, "model.path=tiny-llama", "env.kwargs={n_train: a}")
    assert "env.kwargs.n_train" in err and "int" in err


# -- the model and the starting checkpoint ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_copy(tmp_path_factory, tiny_model_path) -> Path:
    """A copy of the tiny model's folder that a test may break."""
    return Path(shutil.copytree(tiny_model_path, tmp_path_factory.mktemp("model") / "tiny-llama"))


def _fresh_copy(model_copy: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_copy, tmp_path / "model"))


def test_chat_template_the_formatter_cannot_use_fails_before_the_run(model_copy, tmp_path, capsys):
    """A template that ends assistant turns without the eos token: preflight builds the formatter, so the error
    comes before any run folder, not from the first rollout."""
    model = _fresh_copy(model_copy, tmp_path)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    err = _fails_cleanly(capsys, tmp_path / "runs", f"model.path={model}", command="eval")
    assert "chat template" in err and "model.path" in err


def test_truncated_weights_fail_before_the_run(model_copy, tmp_path, capsys):
    model = _fresh_copy(model_copy, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _fails_cleanly(capsys, tmp_path / "runs", f"model.path={model}", command="eval")
    assert "model.safetensors" in err and "truncated" in err


@pytest.mark.parametrize("overrides, message", [
    (["learner.lora.target_modules=[q_proj, qkv_proj]"], "no module 'qkv_proj'"),
    (["agent.max_context_tokens=8192"], "agent.max_context_tokens to at most 8096"),
    (["rollout.backend=vllm", "rollout.dtype=float32", "learner.lora.r=1024"], "learner.lora.r=1024"),
])
def test_model_settings_that_do_not_fit_the_model_fail_before_the_run(overrides, message, tmp_path, capsys):
    err = _fails_cleanly(capsys, tmp_path, "model.path=tiny-llama", *overrides)
    assert message in err


def _fake_checkpoint(folder: Path, tiny_model_path: str, shared: bool = False, r: int = 8, alpha: int = 16,
                     targets=("q_proj", "v_proj"), model_name: str = "tiny-llama", in_scale: int = 1,
                     fingerprint: str | None = None) -> Path:
    """A checkpoint folder laid out as learners.learner.Learner.save_checkpoint writes it (learner.json's keys
    and PEFT state-dict names), with zero tensors: what the start-up check reads without a learner."""
    import torch
    from safetensors.torch import save_file

    from cluster.checks import meta_model

    folder.mkdir(parents=True)
    model = meta_model(load_config(None, ["model.path=tiny-llama"]), tiny_model_path)
    adapters = ["shared"] if shared else ["actor", "reflector"]
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            out_f, in_f = module.weight.shape
            for a in adapters:
                tensors[f"{a}/base_model.model.{name}.lora_A.weight"] = torch.zeros(r, in_f * in_scale)
                tensors[f"{a}/base_model.model.{name}.lora_B.weight"] = torch.zeros(out_f, r)
    save_file(tensors, str(folder / "adapters.safetensors"))
    torch.save({}, folder / "optimizer.pt")
    torch.save({}, folder / "rng.pt")
    meta = {"adapters": adapters, "model_path": f"/somewhere/models/{model_name}", "dtype": "torch.float32",
            "lora": {"r": r, "lora_alpha": alpha, "target_modules": sorted(targets)}}
    if fingerprint is not None:
        meta["model_fingerprint"] = fingerprint
    (folder / "learner.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("made, message", [
    ({"shared": True}, "learner.shared_adapter=True there, False here"),
    ({"r": 16}, "learner.lora.r=16 there, 8 here"),
    ({"alpha": 32}, "learner.lora.alpha=32 there, 16 here"),
    ({"targets": ("q_proj", "k_proj", "v_proj")}, "learner.lora.target_modules"),
    ({"model_name": "smollm2-135m"}, "model.path='smollm2-135m' there, 'tiny-llama' here"),
    ({"in_scale": 2}, "another model.path or LoRA shape"),
])
def test_init_checkpoint_that_does_not_fit_is_refused_at_start(made, message, tiny_model_path, tmp_path):
    from cluster.checks import check_checkpoint, meta_model

    ckpt = _fake_checkpoint(tmp_path / "ckpt", tiny_model_path)  # the fitting one passes
    cfg = load_config(None, ["model.path=tiny-llama", f"init.checkpoint={ckpt}"])
    model = meta_model(cfg, tiny_model_path)
    check_checkpoint(cfg, tiny_model_path, model)
    bad = _fake_checkpoint(tmp_path / "bad", tiny_model_path, **made)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_checkpoint(cfg, tiny_model_path, model, str(bad))
    with pytest.raises(ConfigError, match=f"--reflector-checkpoint {re.escape(str(bad))}.*{re.escape(message)}"):
        check_checkpoint(cfg, tiny_model_path, model, str(bad), "--reflector-checkpoint")


def test_init_checkpoint_base_model_is_recognised_by_its_weights_not_its_folder_name(model_copy, tiny_model_path,
                                                                                   tmp_path):
    """The same weights under another folder name (a copy on another node, a renamed folder) fit; other weights
    of the same architecture in a folder of the same name do not."""
    from safetensors.torch import load_file, save_file

    from agents.model import weights_fingerprint
    from cluster.checks import check_checkpoint, meta_model

    ckpt = _fake_checkpoint(tmp_path / "ckpt", tiny_model_path, fingerprint=weights_fingerprint(tiny_model_path))
    renamed = Path(shutil.copytree(model_copy, tmp_path / "models" / "my-copy"))
    cfg = load_config(None, [f"model.path={renamed}", f"init.checkpoint={ckpt}"])
    model = meta_model(cfg, str(renamed))
    check_checkpoint(cfg, str(renamed), model)  # another name, the same weights: fits

    other = Path(shutil.copytree(model_copy, tmp_path / "other" / "tiny-llama"))  # same name, other weights
    for file in other.glob("*.safetensors"):
        save_file({k: v * 1.5 for k, v in load_file(file).items()}, str(file), metadata={"format": "pt"})
    assert weights_fingerprint(other) != weights_fingerprint(tiny_model_path)
    with pytest.raises(ConfigError, match=r"model\.path='weights [0-9a-f]{16}' there, 'weights [0-9a-f]{16}' here"):
        check_checkpoint(cfg, str(other), model)


def test_init_checkpoint_with_missing_or_corrupt_files_fails_before_the_run(tiny_model_path, tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path / "ckpt", tiny_model_path)
    (ckpt / "optimizer.pt").unlink()
    err = _fails_cleanly(capsys, tmp_path / "runs", "model.path=tiny-llama", f"init.checkpoint={ckpt}",
                         command="eval")
    assert "missing optimizer.pt" in err and "init.checkpoint" in err
    torch_save_empty = (ckpt / "rng.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(torch_save_empty)
    weights = ckpt / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = _fails_cleanly(capsys, tmp_path / "runs", "model.path=tiny-llama", f"init.checkpoint={ckpt}",
                         command="eval")
    assert "adapters.safetensors is corrupt or truncated" in err


def test_reflector_checkpoint_needs_an_actor_checkpoint_and_per_role_adapters(tiny_model_path, tmp_path, capsys):
    """`retrorl eval --reflector-checkpoint` is refused before the run without init.checkpoint (the actor's),
    with one adapter shared by both roles, beside --untrained-reflector, or with a checkpoint that does not fit."""
    split, shared = (_fake_checkpoint(tmp_path / "split", tiny_model_path),
                     _fake_checkpoint(tmp_path / "shared", tiny_model_path, shared=True))
    runs = tmp_path / "runs"

    def fails(*argv: str) -> str:
        code = main(["eval", *argv, "--set", f"run_root={runs}", "--set", "model.path=tiny-llama"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("retrorl: error: ") and err.count("\n") == 1, err
        assert not runs.exists()
        return err

    assert "add --set init.checkpoint=" in fails("--reflector-checkpoint", str(split))
    assert "learner.shared_adapter=true" in fails("--reflector-checkpoint", str(shared), "--set",
                                                  f"init.checkpoint={shared}", "--set", "learner.shared_adapter=true")
    assert f"--reflector-checkpoint {shared} does not fit" in fails("--reflector-checkpoint", str(shared), "--set",
                                                                    f"init.checkpoint={split}")
    with pytest.raises(SystemExit) as exit_:  # argparse: one reflector or the other
        main(["eval", "--untrained-reflector", "--reflector-checkpoint", str(split)])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# -- Ray ------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, message", [
    (lambda: f"127.0.0.1:{_free_port()}", "nothing answers at 127.0.0.1:"),
    (lambda: f"ray://127.0.0.1:{_free_port()}", "nothing answers at 127.0.0.1:"),
    (lambda: "headnode", "is not host:port"),
])
def test_unreachable_ray_address_fails_fast_before_the_run(address, message, tmp_path, capsys):
    """Ray itself would retry the GCS for minutes and then raise a traceback."""
    start = time.monotonic()
    err = _fails_cleanly(capsys, tmp_path, "model.path=tiny-llama", f"ray.address={address()}", command="eval")
    assert message in err and "ray.address" in err and time.monotonic() - start < 60


def test_a_local_ray_that_does_not_start_in_time_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """Ray gives its new raylet a fixed 30 s to register, then raises a bare Exception (ray/_private/node.py:440):
    on a machine whose CPUs were all busy, two evaluations died of it with a traceback. The fault is injected."""
    import ray

    def overloaded(**_: object) -> None:
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", overloaded)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    err = _fails_cleanly(capsys, tmp_path, "model.path=tiny-llama", command="eval")
    assert "the local Ray did not start" in err and "run again when the load is lower" in err


# -- stored trajectories ------------------------------------------------------------------------------------------
def _episode(task: str = "treasure-train-0000") -> Episode:
    gen = Generation("actor", [1, 2], [3], [-0.7], 1, "Action: go east")
    trial = Trial(0, [], [Step("obs", "go east", "", 0.0, 1.0, True, True, gen)], ret=1.0, success=True)
    return Episode(new_episode_id(), "textworld", task, "train", "rollout", [trial])


def _break(kind: str, folder: Path) -> Path:
    """A part under `folder` spoiled as `kind`; returns its path."""
    store = TrajectoryStore(folder)
    good = store.append([_episode()], phase="demos")
    bad = folder / "part-000001.parquet"
    if kind == "corrupt":
        bad.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    elif kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "foreign":
        pq.write_table(pa.table({"x": [1, 2]}), bad)
    elif kind == "old-record":  # the current columns, a record from an older Episode layout
        record = _episode().to_dict()
        del record["trials"]
        row = {"episode_id": "old", "env": "textworld", "task_id": "t", "split": "train", "source": "rollout",
               "phase": "demos", "num_trials": 1, "first_return": 0.0, "final_return": 0.0, "success": False,
               "record": json.dumps(record)}
        pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), bad)
    return bad


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "foreign", "old-record"])
def test_unreadable_trajectory_part_is_one_error_naming_the_file(kind, tmp_path):
    bad = _break(kind, tmp_path / "trajectories")
    with pytest.raises(StoreError, match=re.escape(str(bad)) + ".*move it out of"):
        list(TrajectoryStore(tmp_path / "trajectories").phased_episodes())


@pytest.mark.parametrize("kind", ["truncated", "old-record"])
def test_resume_with_an_unreadable_part_exits_2_naming_it(kind, tmp_path, capsys):
    """`--resume` reads every stored episode in preflight, before Ray or an actor starts."""
    cfg = load_config(None, [f"run_root={tmp_path}", "model.path=tiny-llama",
                             "env.kwargs={n_train: 1, n_seen: 1, n_unseen: 1}"])
    run = RunDir.create(cfg)
    bad = _break(kind, run.path / "trajectories")
    before = sorted(p.name for p in (run.path / "trajectories").iterdir())
    assert main(["train", "--resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrorl: error: ") and err.count("\n") == 1 and str(bad) in err
    assert sorted(p.name for p in (run.path / "trajectories").iterdir()) == before  # nothing written


def test_replay_source_with_an_unreadable_part_fails_before_the_run(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "learner.json").write_text("{}")
    source = RunDir.create(load_config(None, [f"run_root={tmp_path / 'src'}", f"init.checkpoint={ckpt}"]))
    bad = _break("corrupt", source.path / "trajectories")
    cfg = load_config(None, [f"init.checkpoint={ckpt}", f"retroact.replay={source.path}"])
    with pytest.raises(StoreError, match=re.escape(str(bad))):
        replayed_round(cfg, [("treasure-train-0000", "train")], "explore-1")


# -- cached games ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_cached_textworld_game_missing_or_corrupt_is_rebuilt(damage, tmp_path):
    """A cached game's story file lost or damaged: the next prepare() builds it again, and it plays."""
    from envs import TextWorldEnv

    source = TextWorldEnv(kinds=["treasure"], n_train=1, n_seen=0, n_unseen=0, n_valid=0)  # the shared cache
    source.prepare()
    task = source.tasks("train")[0]
    env = TextWorldEnv(kinds=["treasure"], n_train=1, n_seen=0, n_unseen=0, n_valid=0, cache_dir=tmp_path)
    dest = Path(env._specs("train")[0]["dest"])
    shutil.copytree(Path(source._meta(task.task_id)["dir"]), dest)  # a cached game, without building one here
    game = dest / "tw-game.z8"
    if damage == "missing":
        game.unlink()
    elif damage == "truncated":
        game.write_bytes(game.read_bytes()[:4096])
    else:
        game.write_bytes(b"\x00" * 4096)
    env.prepare()
    obs, info = env.reset(options={"task": task.task_id})
    assert obs and info["instruction"] == source.reset(options={"task": task.task_id})[1]["instruction"]
    env.close()
    source.close()


# -- found mid-run ------------------------------------------------------------------------------------------------
def test_max_sample_tokens_that_drops_every_sample_of_an_update_is_an_error():
    from cluster.checks import check_samples_fit
    from learners.batching import TokenSample

    samples = [TokenSample([1] * n, [0] * (n - 1) + [1], "actor") for n in (300, 500)]
    check_samples_fit(samples, 300, "SFT")  # one fits: IL trains on it
    with pytest.raises(ConfigError, match="max_sample_tokens=299 drops all 2 samples of SFT.*at least 300"):
        check_samples_fit(samples, 299, "SFT")
    # DPO pairs: a pair goes when either side is too long, so the longer side is what must fit.
    pairs = [(samples[0], samples[1])]
    check_samples_fit(pairs, 500, "dpo-1")
    with pytest.raises(ConfigError, match="max_sample_tokens=499 drops all 1 samples of dpo-1.*at least 500"):
        check_samples_fit(pairs, 499, "dpo-1")


def test_bad_input_found_mid_run_marks_the_run_failed(tmp_path, capsys, monkeypatch):
    """An error only the method can find (here: IL's samples all too long) exits 2 with one line naming the run
    folder, which records a `failed` event."""
    import cluster.methods
    import cluster.pipeline
    from cluster.run_dir import read_metrics

    def method(cfg, run, prepared):
        raise ConfigError("learner.max_sample_tokens=64 drops all 3 IL samples")

    monkeypatch.setattr(cluster.pipeline, "preflight", lambda *a, **k: None)
    monkeypatch.setattr(cluster.methods, "run_method", method)
    assert main(["train", "--set", f"run_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    (run,) = tmp_path.iterdir()
    assert err.count("\n") == 1 and "learner.max_sample_tokens" in err and str(run) in err
    assert [r["event"] for r in read_metrics(run / "metrics.jsonl")] == ["command", "failed"]
