"""Token-level losses: small pure functions over tensors, shared by every training method.

Alignment convention: `logprobs[..., t]` scores `labels[..., t]`. For a causal LM over ids x_0..x_{T-1} the caller
passes logits[:, :-1] and labels = ids[:, 1:] (`shift_for_next_token`), so position t scores token t+1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, in fp32 (bf16 log-softmax over a 49k vocab loses ~2 digits).

    logits [..., V], labels [...] -> [...]. cross_entropy fuses log-softmax + gather (one [N, V] buffer saved).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return -F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)


def shift_for_next_token(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, label_mask) aligned with logits[:, :-1]: token t+1 is predicted at position t."""
    return ids[..., 1:], mask[..., 1:]


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim where mask == 1; `where` (not multiply) so -inf/nan at masked positions can't leak."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)


def il_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood over agent tokens (mask == 1) and their count.

    L_IL = -sum_t m_t log pi(x_t) / sum_t m_t. An all-masked batch gives a zero loss that still has a graph.
    """
    m = mask.bool()
    n = int(m.sum())
    total = torch.where(m, logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)).sum()
    return -total / max(n, 1), n


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of agent-token log-probs per sequence (DPO's log pi(y|x) over a multi-turn trajectory): [B, T] -> [B]."""
    return masked_sum(logprobs, mask)
