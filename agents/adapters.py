"""A role's LoRA adapter at a version, as it travels from the learner to every engine, and as a PEFT folder on disk.

It lives here, below both rollout/ and learners/, because it is the contract between them: the learner publishes
adapter folders and tensors, the vLLM engine writes the tensors it receives as a folder vLLM loads, and both
engines read a folder back.

Keys are those of `peft.get_peft_model_state_dict(model, adapter_name=...)`: the parameter name with the adapter
name removed (`...q_proj.lora_A.weight`), which is what `PeftModel.from_pretrained` / vLLM's LoRA loader read from
`adapter_model.safetensors`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envs.atomic import staged_dir

if TYPE_CHECKING:  # torch is imported where tensors are read: cluster/config.py imports LORA from here
    import torch

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA shape the learner trains and every engine must load. Its defaults are the one definition of
    learner.lora's (cluster/config.py reads them from here, since the learner and the engines cannot import it)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def merged(self, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """These settings with `overrides` (learner.lora as a dict, as engines receive it) on top."""
        return {**asdict(self), **(overrides or {})}


LORA = LoraSpec()


@dataclass(frozen=True)
class AdapterUpdate:
    role: str
    version: int  # 0 is the bare base model; the learner publishes 1, 2, ...
    tensors: dict[str, torch.Tensor]  # PEFT state-dict keys without the adapter name (get_peft_model_state_dict)


def write_adapter_dir(
    final: Path,
    tensors: dict[str, torch.Tensor],
    lora_config,
    base_model_path: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a PEFT adapter folder (safetensors + adapter_config.json) at `final`, atomically.

    A reader (an engine hot-loading the adapter) sees either nothing or the complete adapter (envs.atomic).
    """
    from safetensors.torch import save_file

    with staged_dir(final) as tmp:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
        config = copy.deepcopy(lora_config)
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        if base_model_path is not None:
            config.base_model_name_or_path = str(base_model_path)
        config.save_pretrained(str(tmp))
    return final


def read_adapter_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a PEFT adapter folder (adapter_model.safetensors, or a .bin loaded weights_only)."""
    folder = Path(path)
    if (folder / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / WEIGHTS_NAME))
    if (folder / "adapter_model.bin").is_file():
        import torch

        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}")


def read_folder(path: str | os.PathLike) -> dict[str, bytes]:
    """The files of a flat folder (an adapter or a learner checkpoint) by name, to send to another node."""
    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir()) if f.is_file()}


def write_folder(files: dict[str, bytes], final: str | os.PathLike) -> Path:
    """Write `files` (name -> bytes) as the folder `final`, atomically (`staged_dir`)."""
    final = Path(final)
    with staged_dir(final) as tmp:
        for name, data in files.items():
            if Path(name).name != name:
                raise ValueError(f"{name!r} is not a plain file name")
            (tmp / name).write_bytes(data)
    return final
