"""Config: YAML + --set overrides; unknown keys and bad values name the key; CLI exits non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import ConfigError, load_config
from envs import families


def test_defaults_and_overrides():
    cfg = load_config(None, ["eval.trials=5", "learner.lora.target_modules=[q_proj, k_proj]", "env.kwargs.n=3"])
    assert cfg.eval.trials == 5
    assert cfg.learner.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.env.kwargs == {"n": 3}
    assert cfg.model.path == "smollm2-135m" and cfg.env.name == "textworld"


@pytest.mark.parametrize(
    "override, names",
    [
        ("eval.trails=5", "eval.trails"),
        ("learner.lr=fast", "learner.lr"),
        ("bogus=1", "bogus"),
        ("eval.trials=0", "eval.trials"),
        ("agent.max_steps=0", "agent.max_steps"),
        ("model.dtype=fp16", "model.dtype"),
        ("eval=3", "eval"),
        ("noequals", "noequals"),
    ],
)
def test_bad_overrides_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: 1e-4\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_and_exits_2(capsys, tmp_path):
    assert main(["train", "--set", "eval.trails=5", "--set", f"run_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "eval.trails" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_cli_unknown_model_and_env(capsys, tmp_path):
    assert main(["eval", "--set", f"run_root={tmp_path}", "--set", "model.path=/nope/model"]) == 2
    assert "model.path" in capsys.readouterr().err


def test_cli_bad_env_options_exit_2_before_any_run_dir(capsys, tmp_path):
    assert main(["train", "--set", f"run_root={tmp_path}", "--set", "env.name=nethack"]) == 2
    assert "nethack" in capsys.readouterr().err
    assert main(["train", "--set", f"run_root={tmp_path}", "--set", "env.kwargs={n_trian: 3}"]) == 2
    err = capsys.readouterr().err
    assert "n_trian" in err and "n_train" in err
    assert not any(tmp_path.iterdir())


SHIPPED = sorted(str(p) for p in Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED)
@pytest.mark.parametrize("method", ["sft", "eto", "retroformer", "retroact"])
def test_shipped_configs_load_for_every_method(path, method):
    cfg = load_config(path, [f"method={method}"])
    assert cfg.method == method and cfg.run_name == f"{cfg.env.name}-{method}"
    assert cfg.env.name in families()  # and the env each names exists


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_fit_their_model(path):
    """The start-up model checks (context length against the model's positions, LoRA targets) pass for every
    shipped config: configs/sciworld.yaml once asked for 8192 context tokens plus the reflector's 128 of a model
    with 8192 positions and so failed before its first step."""
    from agents.model import resolve_model
    from cluster.checks import check_model, meta_model

    cfg = load_config(path)
    model_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    check_model(cfg, meta_model(cfg, model_path))  # raises ConfigError naming the setting


def test_extends_merges_sections_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\nagent: {memory_size: 2, max_context_tokens: 1024}\n"
                                        "eval: {splits: [seen, unseen]}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nagent: {memory_size: 1}\neval: {splits: [seen]}\n")
    cfg = load_config(tmp_path / "child.yaml", ["agent.max_steps=7"])
    assert (cfg.seed, cfg.agent.memory_size, cfg.agent.max_context_tokens) == (3, 1, 1024)
    assert cfg.eval.splits == ["seen"] and cfg.agent.max_steps == 7
    assert load_config(None).eval.splits == ["seen", "unseen"]  # the test splits by default
    assert load_config(None, ["eval.splits=[valid]"]).eval.splits == ["valid"]  # choosing settings: valid only
    with pytest.raises(ConfigError, match="eval.splits"):
        load_config(None, ["eval.splits=[test]"])
    (tmp_path / "base.yaml").write_text("extends: child.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml not found.*extended by"):
        load_config(tmp_path / "child.yaml")


def test_method_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="reward_model"):
        load_config(None, ["retroformer.best_of_n=4"])
    with pytest.raises(ConfigError, match="init.checkpoint"):
        load_config(None, [f"init.checkpoint={tmp_path}"])
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["method=ppo"])
    assert main(["train", "--method", "eto", "--set", f"init.checkpoint={tmp_path}"]) == 2


def test_role_epochs_of_zero_keep_a_role_but_never_every_role_or_a_shared_adapter():
    assert load_config(None, ["learner.role_epochs={actor: 0, reflector: 5}"]).learner.role_epochs == {
        "actor": 0, "reflector": 5}
    with pytest.raises(ConfigError, match="IL would train nothing"):
        load_config(None, ["learner.epochs=2", "learner.role_epochs={actor: 0, reflector: 0}"])
    with pytest.raises(ConfigError, match="learner.shared_adapter=false"):
        load_config(None, ["learner.shared_adapter=true", "learner.role_epochs={actor: 0}"])
    with pytest.raises(ConfigError, match="role_epochs"):
        load_config(None, ["learner.role_epochs={actor: -1}"])


def test_demos_tasks_that_leave_nothing_to_explore_fail_at_start(tmp_path, capsys):
    """demos.tasks splits the training tasks into IL's and exploration's: ETO, which pairs each explored task with
    its expert, refuses it at load; a split that leaves RetroAct no task to explore fails before any run folder."""
    with pytest.raises(ConfigError, match="demos.tasks=null for method=eto"):
        load_config(None, ["method=eto", "demos.tasks=2"])
    code = main(["train", "--set", f"run_root={tmp_path}", "--set", "model.path=tiny-llama", "--set",
                 "env.kwargs={n_train: 2, n_seen: 1, n_unseen: 1}", "--set", "demos.tasks=2"])
    err = capsys.readouterr().err
    assert code == 2 and "demos.tasks=2" in err and "n_train" in err
    assert not list(tmp_path.iterdir())


def test_actors_that_do_not_fit_a_local_ray_fail_before_anything_is_written(tmp_path, capsys):
    """Four 1-CPU engines and a 1-CPU learner on a 2-CPU local Ray: one error naming the knobs, exit 2, no run
    folder; the Ray it started is shut down again."""
    import ray

    code = main(["train", "--set", f"run_root={tmp_path}", "--set", "model.path=tiny-llama", "--set",
                 "env.kwargs={n_train: 1, n_seen: 1, n_unseen: 1}", "--set", "ray.num_cpus=2",
                 "--set", "rollout.engines=4"])
    err = capsys.readouterr().err
    assert code == 2 and "5 CPU (this machine's Ray has 2)" in err and "rollout.engines" in err
    assert not list(tmp_path.iterdir()) and not ray.is_initialized()


@pytest.mark.parametrize("override, message", [
    (["rollout.engine_gpus=1"], "rollout.backend=vllm, or rollout.engine_gpus=0"),
    (["rollout.backend=vllm", "rollout.engine_gpus=2"], "at most 1 GPU"),
    (["rollout.backend=vllm", "rollout.dtype=bfloat16"], "rollout.dtype=float32"),
    (["learner.gpus=2"], "learner.gpus to at most 1"),
    (["rollout.backend=vllm", "rollout.engine_gpus=0.5"], "gpu_memory_utilization to at most 0.5"),
    (["method=eto", "rollout.mode=async"], "rollout.mode=sync"),
])
def test_unsupported_placements_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_vllm_on_gpu_and_cpu_configs_load():
    shared = ["rollout.backend=vllm", "rollout.engine_gpus=0.5", "rollout.vllm.gpu_memory_utilization=0.4"]
    assert load_config(None, shared).rollout.engine_gpus == 0.5
    assert load_config(None, ["rollout.backend=vllm", "rollout.dtype=float32"]).rollout.backend == "vllm"


GPU_JOB = ["rollout.backend=vllm", "rollout.engine_gpus=1", "learner.gpus=1"]
COLOCATED = ["rollout.backend=vllm", "rollout.engine_gpus=0.5", "learner.gpus=0.5",
             "rollout.vllm.gpu_memory_utilization=0.45"]


def test_gpu_defaults_follow_the_device():
    """On GPUs: the learner checkpoints activations and vLLM plans its KV cache for the agent's context, not the
    model's full one; on CPU neither."""
    from cluster.runtime import engine_actor, learner_kwargs

    gpu, cpu = load_config(None, GPU_JOB), load_config(None, [])
    assert learner_kwargs(gpu)["gradient_checkpointing"] and not learner_kwargs(cpu)["gradient_checkpointing"]
    assert not learner_kwargs(load_config(None, [*GPU_JOB, "learner.gradient_checkpointing=false"]))[
        "gradient_checkpointing"]
    cls, kwargs = engine_actor(gpu)
    assert cls.__name__ == "VLLMEngine" and kwargs["enforce_eager"] is None  # the engine decides: eager on CPU
    assert kwargs["max_model_len"] == gpu.agent.max_context_tokens + gpu.agent.reflector.max_new_tokens
    assert kwargs["lora"]["target_modules"] == gpu.learner.lora.target_modules and not kwargs["sleep_mode"]
    assert kwargs["model_path"] == "smollm2-135m" and kwargs["threads"] is None  # each node resolves both


def test_one_gpu_for_engine_and_learner_sleeps_the_engine_while_training():
    from cluster.runtime import bundles, engine_actor

    cfg = load_config(None, COLOCATED)
    assert cfg.engines_sleep and engine_actor(cfg)[1]["sleep_mode"]
    assert bundles(cfg, with_learner=True) == [{"CPU": 1, "GPU": 0.5}, {"CPU": 1, "GPU": 0.5}]
    assert not load_config(None, [*COLOCATED, "rollout.vllm.sleep_while_training=false"]).engines_sleep
    assert not load_config(None, GPU_JOB).engines_sleep  # the learner has its own GPU
    with pytest.raises(ConfigError, match="rollout.mode=sync"):
        load_config(None, [*COLOCATED, "rollout.mode=async"])
    with pytest.raises(ConfigError, match="GPU-only"):
        load_config(None, ["rollout.vllm.sleep_while_training=true"])
    with pytest.raises(ConfigError, match="learner.gpus to at most 1"):
        load_config(None, ["learner.gpus=1.5"])


def test_envs_lists_every_family_and_what_is_missing(capsys):
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(families()) <= set(rows)
    header = next(line for line in out.splitlines() if line.startswith("| env |"))
    assert [c.strip() for c in header.split("|")[2:6]] == ["train", "valid", "seen", "unseen"]
    assert [c.strip() for c in rows["textworld"].split("|")[2:6]] == ["12", "4", "4", "4"]  # default counts, no build
    # The configured family is described with the config's kwargs; one that cannot be built says why.
    assert main(["envs", "--set", "env.kwargs={n_train: 5, kinds: [treasure]}"]) == 0
    assert [c.strip() for c in capsys.readouterr().out.split("| textworld |")[1].split("|")[:4]] == ["5", "4", "4", "4"]
    assert main(["envs", "--set", "env.kwargs={kinds: [nethack]}"]) == 0
    out = capsys.readouterr().out
    assert "Not usable here:" in out and "- textworld: unknown textworld kinds ['nethack']" in out


def test_a_turn_budget_that_cuts_expert_actions_fails_at_start(tmp_path, capsys):
    """TextCraft's crafting turns run past 16 tokens: a trained actor could never finish them, so train refuses
    before any run directory, naming the setting and the length it needs."""
    argv = ["train", "--method", "sft", "--config", "configs/textcraft.yaml", "--set", f"run_root={tmp_path}",
            "--set", "model.path=tiny-llama", "--set", "env.kwargs={n_train: 3, n_seen: 1, n_unseen: 1}",
            "--set", "agent.actor.max_new_tokens=16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "agent.actor.max_new_tokens=16 cuts" in err and "set --set agent.actor.max_new_tokens=" in err
    assert not any(tmp_path.iterdir())


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of a config mapping's leaves (env.kwargs is one value: a family's own options)."""
    out: dict[str, object] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted != "env.kwargs":
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _own_keys(path: Path) -> dict[str, object]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    data.pop("extends", None)
    return _leaves(data)


@pytest.mark.parametrize("path", SHIPPED)
def test_every_default_is_defined_once(path, tmp_path):
    """Defaults live in cluster/config.py only: default.yaml sets nothing beyond them, and a family config sets
    only values that differ from what it would get anyway (a copied default would drift when the default moves)."""
    path = Path(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    if path.name == "default.yaml":
        assert _own_keys(path) == {}
        assert load_config(path) == load_config(empty)
        return
    own = _own_keys(path)
    parent = _leaves(load_config(path.parent / "default.yaml").model_dump())
    copied = {k: v for k, v in own.items() if k in parent and parent[k] == v}
    assert not copied, f"{path} repeats values it inherits: {copied}"


def test_a_config_omitting_a_section_gets_the_default_jobs_values(tmp_path):
    """A --config that does not extend default.yaml and omits sections, or keys of a section, gets the same values
    as the default job (before, the dataclasses' own defaults: another lr, epochs, rewards and token budgets)."""
    own = tmp_path / "own.yaml"
    own.write_text("env: {name: textworld}\nagent: {reflector: {temperature: 1.0}}\nlearner: {lora: {r: 4}}\n")
    mine, default = load_config(own).model_dump(), load_config(None).model_dump()
    for section in ("learner", "eto", "retroformer", "retroact", "demos", "eval", "rollout"):
        if section != "learner":
            assert mine[section] == default[section], section
    assert mine["learner"] == {**default["learner"], "lora": {**default["learner"]["lora"], "r": 4}}
    assert mine["agent"]["actor"] == default["agent"]["actor"]
    assert mine["agent"]["reflector"] == {**default["agent"]["reflector"], "temperature": 1.0}  # max_new_tokens kept
    # The same through --set on a section the file omits.
    assert load_config(own, ["eto.epochs=2"]).eto.lr == load_config(None).eto.lr


def test_lora_and_sampling_defaults_reach_learner_and_engines_from_one_place():
    """learner.lora's defaults are agents.adapters.LORA, which the learner and both engines use when given none;
    the runner's agent settings (sampling included) have no defaults of their own."""
    import dataclasses
    import inspect

    from agents.adapters import LORA
    from learners.learner import Learner
    from rollout.runner import RolloutSettings

    lora = load_config(None).learner.lora
    assert (lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules)) == dataclasses.astuple(LORA)
    params = inspect.signature(Learner).parameters
    assert [params[f"lora_{k}"].default for k in ("r", "alpha", "dropout", "target_modules")] == list(
        dataclasses.astuple(LORA))
    no_default = {f.name for f in dataclasses.fields(RolloutSettings) if f.default is dataclasses.MISSING}
    assert {"memory_size", "actor", "reflector", "max_context_tokens", "show_actions"} <= no_default


def test_training_settings_the_config_holds_have_no_second_default_in_the_learner():
    """Every learner setting a config section sets (cluster/runtime.py's learner_kwargs, the methods' calls in
    cluster/) is a required argument of the learner: a caller that forgets one fails, never trains on another
    value than the config's."""
    import inspect

    from learners.methods import MethodLearner

    required = {
        "__init__": {"lr", "gradient_clipping", "max_len", "kl_coef", "target_kl", "kl_horizon"},
        "train_il": {"epochs", "max_tokens_per_batch"},
        "train_dpo": {"beta", "epochs", "max_tokens_per_batch"},
        "train_reflector_pg": {"epochs", "baseline", "max_tokens_per_batch"},
        "train_retroact": {"epochs", "eps", "il_coef", "max_tokens_per_batch"},
    }
    for method, names in required.items():
        fn = getattr(MethodLearner, method)
        params = dict(inspect.signature(fn).parameters)
        if method == "__init__":  # MethodLearner's own keywords, then the base Learner's
            params.update(inspect.signature(MethodLearner.__mro__[1].__init__).parameters)
        assert {n for n in names if params[n].default is not inspect.Parameter.empty} == set(), method
