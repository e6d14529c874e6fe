"""A role's LoRA adapter at a version, as it travels from the learner to every engine.

It lives here, below both rollout/ and learners/, because it is the contract between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdapterUpdate:
    role: str
    version: int  # 0 is the bare base model; the learner publishes 1, 2, ...
    tensors: dict[str, torch.Tensor]  # PEFT state-dict keys without the adapter name (get_peft_model_state_dict)
