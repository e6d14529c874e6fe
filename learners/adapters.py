"""LoRA adapter tensors per role: naming, atomic PEFT-folder publishing, loading back.

Keys are those of `peft.get_peft_model_state_dict(model, adapter_name=...)`: the parameter name with the adapter
name removed (`...q_proj.lora_A.weight`), which is what `PeftModel.from_pretrained` / vLLM's LoRA loader read from
`adapter_model.safetensors`. Only adapter tensors are ever written; the base model never moves.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file



WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
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
    """Write `<root>/<role>/v<version>/` (safetensors + adapter_config.json) atomically; returns the folder.

    Files go to a temp folder beside the target and are fsynced, then the folder is renamed into place, so a
    reader (an engine hot-loading the adapter) sees either nothing or the complete adapter.
    """
    final = adapter_dir(root, role, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=final.parent))
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "role": role, "version": str(version)})
        config = copy.deepcopy(lora_config)
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        if base_model_path is not None:
            config.base_model_name_or_path = str(base_model_path)
        config.save_pretrained(str(tmp))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / name)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config dict) of a PEFT adapter folder."""
    path = Path(path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    config = json.loads((path / CONFIG_NAME).read_text())
    return tensors, config


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing dst is swapped out first (rename is atomic, rmtree isn't)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems refuse directory fsync; the rename is still atomic
        pass
