"""LoRA adapters per role in the learner: parameter naming and publishing `<root>/<role>/v<N>/` folders.

The folder format itself (atomic write, read back) is in agents/adapters.py, shared with the engines. Only adapter
tensors are ever written; the base model never moves.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from agents.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter_dir, write_adapter_dir

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_dir", "adapter_parameters", "list_versions", "load_adapter",
           "peft_key", "save_adapter"]

_VERSION_DIR = re.compile(r"^v(\d+)$")


def peft_key(param_name: str, adapter: str) -> str:
    """`...q_proj.lora_A.actor.weight` -> `...q_proj.lora_A.weight` (get_peft_model_state_dict's renaming)."""
    return param_name.replace(f".{adapter}", "")


def adapter_parameters(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's own LoRA parameters keyed by PEFT key (all other params are the frozen base)."""
    tag = f".{adapter}."
    return {peft_key(n, adapter): p for n, p in model.named_parameters() if "lora_" in n and tag in n}


def adapter_dir(root: str | os.PathLike, role: str, version: int) -> Path:
    return Path(root) / role / f"v{version}"


def list_versions(root: str | os.PathLike, role: str) -> list[int]:
    base = Path(root) / role
    if not base.is_dir():
        return []
    found = [_VERSION_DIR.match(p.name) for p in base.iterdir() if (p / WEIGHTS_NAME).is_file()]
    return sorted(int(m.group(1)) for m in found if m)


def save_adapter(
    root: str | os.PathLike,
    role: str,
    version: int,
    tensors: dict[str, torch.Tensor],
    lora_config,
    base_model_path: str | None = None,
) -> Path:
    """Write `<root>/<role>/v<version>/` (safetensors + adapter_config.json) atomically; returns the folder."""
    return write_adapter_dir(adapter_dir(root, role, version), tensors, lora_config, base_model_path,
                             metadata={"role": role, "version": str(version)})


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config dict) of a PEFT adapter folder."""
    return read_adapter_dir(path), json.loads((Path(path) / CONFIG_NAME).read_text())
