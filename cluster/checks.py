"""What preflight checks against the model and the starting checkpoint, before a run directory or an actor exists:
the chat template, the weights' files, the context length, the LoRA target modules and rank, and whether
init.checkpoint was trained with this model and LoRA layout. Each failure is a ConfigError or ModelError naming the
setting and the fix; nothing here loads weights (the model is built on the meta device, files are read by header).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from agents.chat import ChatFormatter
from agents.model import ModelError, load_tokenizer, weights_fingerprint
from agents.trajectory import ROLES
from cluster.config import Config, ConfigError
from learners.batching import TokenSample


def chat_formatter(model_path: str) -> ChatFormatter:
    """The formatter every prompt is built with; a chat template it cannot use is a ModelError here, not a crash
    in the first engine request."""
    try:
        return ChatFormatter(load_tokenizer(model_path))
    except (ValueError, TypeError, KeyError) as exc:  # ChatFormatter's probes, or the template failing to render
        raise ModelError(f"model.path {model_path}: its chat template cannot be used ({exc}); retrorl needs a "
                         "template that closes assistant turns with the eos token and extends a conversation by "
                         "appending: choose another model.path") from exc


def meta_model(cfg: Config, model_path: str) -> Any:
    """The model's module tree without weights (torch's meta device: no memory, no file reads beyond config.json)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix named
        raise ModelError(f"model.path {model_path}: cannot build the model from its config.json ({exc}); point "
                         "model.path at a causal LM folder") from exc


def check_weights(model_path: str) -> None:
    """Every safetensors file's header parses and covers the file: a truncated or foreign file fails here
    (safetensors' safe_open checks the header against the file size) instead of in every actor's load."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(model_path).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"model.path: weights file {path} is corrupt or truncated ({exc}); restore it (a "
                             "cached conversion: delete its folder and rerun to rebuild it)") from exc


def check_model(cfg: Config, model: Any) -> None:
    """The context length and the LoRA settings against the model's own config and module names."""
    positions = getattr(model.config, "max_position_embeddings", None)
    longest = cfg.agent.max_context_tokens + cfg.agent.reflector.max_new_tokens
    if positions is not None and longest > positions:
        raise ConfigError(f"agent.max_context_tokens={cfg.agent.max_context_tokens} plus "
                          f"agent.reflector.max_new_tokens={cfg.agent.reflector.max_new_tokens} exceeds the model's "
                          f"{positions} positions: set agent.max_context_tokens to at most "
                          f"{positions - cfg.agent.reflector.max_new_tokens}")
    names = [name for name, _ in model.named_modules()]
    # PEFT's own rule for a list of target modules: the module's full name, or its name ending in ".<entry>"
    # (peft/tuners/tuners_utils.py:2371-2376, check_target_module_exists).
    missing = [t for t in cfg.learner.lora.target_modules
               if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(f"learner.lora.target_modules: the model has no module {', '.join(map(repr, missing))}; "
                          f"its module names: {', '.join(leaves)}")
    if cfg.rollout.backend == "vllm":
        from rollout.vllm_engine import lora_rank_slot

        try:
            lora_rank_slot(cfg.learner.lora.r)
        except ValueError as exc:
            raise ConfigError(f"learner.lora.r={cfg.learner.lora.r}: {exc}; lower learner.lora.r or use "
                              "rollout.backend=hf") from exc


def check_checkpoint(cfg: Config, model_path: str, model: Any, checkpoint: str | None = None,
                     option: str = "init.checkpoint") -> None:
    """The learner checkpoint `checkpoint` (init.checkpoint by default; named `option` in errors) fits this run: its
    files are all there, and it was trained on this base model with this adapter layout (shared or per role) and
    LoRA shape, checked from learner.json and the adapters' tensor shapes (safetensors headers only) before the
    learner tries to load it mid-run."""
    from safetensors import SafetensorError, safe_open

    from learners.learner import CHECKPOINT_FILES, REFERENCE_PREFIX, SHARED_ADAPTER

    folder = Path(checkpoint or cfg.init.checkpoint or "")
    fix = f"point {option} at a checkpoint trained with the same settings, or change them to the checkpoint's"
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{option} {folder}: missing {', '.join(missing)} (an incomplete copy?); point it "
                          "at a whole RUN/checkpoints/<name> folder")
    try:
        meta = json.loads((folder / "learner.json").read_text())
        lora = meta["lora"]
        theirs = {
            "learner.shared_adapter": meta["adapters"] == [SHARED_ADAPTER],
            "learner.lora.r": lora["r"],
            "learner.lora.alpha": lora["lora_alpha"],
            "learner.lora.target_modules": sorted(lora["target_modules"]),
            # The base model by its weights' fingerprint: the same model under any folder name, on any node. A
            # checkpoint from before fingerprints were written names only its model folder.
            "model.path": (f"weights {meta['model_fingerprint']}" if "model_fingerprint" in meta
                           else Path(meta["model_path"]).name),
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{option} {folder}: learner.json is unreadable or from another version ({exc}); "
                          "point it at a RUN/checkpoints/<name> folder written by this retrorl") from exc
    ours = {
        "learner.shared_adapter": cfg.learner.shared_adapter,
        "learner.lora.r": cfg.learner.lora.r,
        "learner.lora.alpha": cfg.learner.lora.alpha,
        "learner.lora.target_modules": sorted(cfg.learner.lora.target_modules),
        "model.path": (f"weights {weights_fingerprint(model_path)}" if "model_fingerprint" in meta
                       else Path(model_path).name),
    }
    differ = [f"{key}={theirs[key]!r} there, {ours[key]!r} here" for key in ours if theirs[key] != ours[key]]
    if differ:
        raise ConfigError(f"{option} {folder} does not fit this config: {'; '.join(differ)}; {fix}")
    adapters = [SHARED_ADAPTER] if cfg.learner.shared_adapter else list(ROLES)
    modules = dict(model.named_modules())
    try:
        with safe_open(str(folder / "adapters.safetensors"), "pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()
                      if not k.startswith(REFERENCE_PREFIX)}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{option} {folder}: adapters.safetensors is corrupt or truncated ({exc}); "
                          "restore the folder or train it again") from exc
    if sorted({k.split("/", 1)[0] for k in shapes}) != sorted(adapters):
        raise ConfigError(f"{option} {folder}: its adapters.safetensors holds adapters "
                          f"{sorted({k.split('/', 1)[0] for k in shapes})}, this config needs {adapters}; {fix}")
    for key, shape in shapes.items():
        wrong = _lora_shape_problem(key.split("/", 1)[1], shape, cfg.learner.lora.r, modules)
        if wrong:
            raise ConfigError(f"{option} {folder}: {wrong}, so it was trained on another model.path or "
                              f"LoRA shape; {fix}")


def _lora_shape_problem(key: str, shape: tuple[int, ...], r: int, modules: dict[str, Any]) -> str | None:
    """Why a PEFT LoRA tensor (`base_model.model.<module>.lora_A.weight`: [r, in]; lora_B: [out, r]) does not fit
    this model's `<module>` at rank r, or None."""
    body = key.removeprefix("base_model.model.")
    module_name, _, part = body.rpartition(".lora_")
    module = modules.get(module_name)
    weight = getattr(module, "weight", None)
    if weight is None:
        return f"{key} adapts {module_name!r}, which this model lacks"
    out_features, in_features = weight.shape[0], weight.shape[-1]
    expected = (r, in_features) if part.startswith("A") else (out_features, r)
    return None if shape == expected else f"{key} has shape {list(shape)}, this model and rank need {list(expected)}"


def check_samples_fit(samples: Sequence[TokenSample | tuple[TokenSample, ...]], max_sample_tokens: int,
                      update: str) -> None:
    """An update has something to train on: a learner.max_sample_tokens below every sample's length would drop
    them all (the learner drops, never truncates), the update would take 0 steps, and the run would go on as if it
    had trained. `samples`: an update's samples, or its DPO pairs (a pair is dropped if either side is too long).
    Checked on the driver before the learner is called: for IL before anything trains, for the RL and DPO updates
    once their rounds' samples exist."""
    lengths = [max(len(s) for s in item) if isinstance(item, tuple) else len(item) for item in samples]
    shortest = min(lengths, default=0)
    if shortest > max_sample_tokens:  # learners.batching.cap_length keeps len <= the cap
        raise ConfigError(f"learner.max_sample_tokens={max_sample_tokens} drops all {len(lengths)} samples of "
                          f"{update} (the shortest has {shortest} tokens), so it would take 0 steps: set "
                          f"learner.max_sample_tokens to at least {shortest} (or shorten the episodes: "
                          "agent.memory_size, agent.max_steps)")
