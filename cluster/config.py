"""Typed run configuration: pydantic models that mirror the YAML, plus `--set key=value` overrides.

Unknown keys and ill-typed values are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Strict):
    path: str = "smollm2-135m"  # a known name (smollm2-135m, tiny-llama) or a local HF folder
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    cache_dir: str | None = None  # default: $RETRORL_CACHE or ~/.cache/retrorl
    trust_remote_code: bool = False


class EnvCfg(_Strict):
    name: str = "textworld"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the env family's constructor
    train_tasks: int | None = None  # cap on tasks used per split (None: all the family lists)
    eval_tasks: int | None = None


class SamplingCfg(_Strict):
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(48, ge=1)


class AgentCfg(_Strict):
    memory_size: int = Field(3, ge=0)
    show_actions: bool = True
    max_context_tokens: int = Field(4096, ge=256)
    actor: SamplingCfg = Field(default_factory=SamplingCfg)
    reflector: SamplingCfg = Field(default_factory=lambda: SamplingCfg(max_new_tokens=96))


class RolloutCfg(_Strict):
    engines: int = Field(1, ge=1)
    engine_cpus: float = Field(1, ge=0)  # Ray CPU reservation per engine replica
    threads: int | None = None  # torch threads per engine; default: all cores of the node
    max_batch_size: int = Field(32, ge=1)
    env_workers: int = Field(2, ge=1)
    envs_per_worker: int = Field(8, ge=1)


class LoraCfg(_Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class LearnerCfg(_Strict):
    lora: LoraCfg = Field(default_factory=LoraCfg)
    shared_adapter: bool = False  # one adapter serves both roles
    lr: float = Field(1e-4, gt=0)
    epochs: int = Field(5, ge=1)
    max_tokens_per_batch: int = Field(4096, ge=64)
    max_sample_tokens: int = Field(4096, ge=64)  # longer samples are dropped (and counted)
    zero_stage: int = Field(0, ge=0, le=3)
    grad_clip: float = Field(1.0, gt=0)
    cpus: float = Field(1, ge=0)
    threads: int | None = None


class DemoCfg(_Strict):
    failed_per_task: int = Field(1, ge=0)  # failed attempts (with templated reflections) per training task
    wrong_steps: int = Field(3, ge=1)


class EvalCfg(_Strict):
    splits: list[Literal["train", "seen", "unseen"]] = Field(default_factory=lambda: ["seen", "unseen"])
    trials: int = Field(3, ge=1)


class RayCfg(_Strict):
    address: str | None = None  # None: start a local Ray on 127.0.0.1
    num_cpus: int | None = None
    dashboard: bool = False


class Config(_Strict):
    seed: int = 0
    method: Literal["il"] = "il"
    run_root: str = "runs"
    name: str = "textworld-il"
    model: ModelCfg = Field(default_factory=ModelCfg)
    env: EnvCfg = Field(default_factory=EnvCfg)
    agent: AgentCfg = Field(default_factory=AgentCfg)
    rollout: RolloutCfg = Field(default_factory=RolloutCfg)
    learner: LearnerCfg = Field(default_factory=LearnerCfg)
    demos: DemoCfg = Field(default_factory=DemoCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    ray: RayCfg = Field(default_factory=RayCfg)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.agent.actor.max_new_tokens >= self.agent.max_context_tokens:
            raise ValueError("agent.actor.max_new_tokens must be below agent.max_context_tokens")
        return self


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists: 3, 0.5, true, null, [a, b], text."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {raw!r}: {exc}") from exc


def apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    model: type[BaseModel] | None = Config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        fields = model.model_fields if model is not None else None
        if fields is not None and part not in fields:
            raise ConfigError(f"unknown config key {'.'.join(parts[: depth + 1])!r}; known: {', '.join(fields)}")
        if last:
            node[part] = _parse_value(raw)
            break
        annotation = fields[part].annotation if fields is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {'.'.join(parts[: depth + 1])!r} is not a section")
        node = child


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config ({path}): {problems}") from exc
