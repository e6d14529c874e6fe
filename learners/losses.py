"""Token-level losses: small pure functions over tensors, shared by every training method.

Alignment convention: `logprobs[..., t]` scores `labels[..., t]`. For a causal LM over ids x_0..x_{T-1} the caller
passes logits[:, :-1] and labels = ids[:, 1:] (`shift_for_next_token`), so position t scores token t+1.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (ETO's trajectory optimisation): mean of -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)).

    Inputs are [P] sequence log-probs (`sequence_logprob`) of the winner / loser under the policy and the frozen
    reference. Returns (loss, chosen_rewards, rejected_rewards); the implicit rewards beta * log-ratio are detached
    (logging only). logsigmoid, not log(sigmoid), so a large margin neither underflows nor gives -inf.
    """
    chosen_ratio = chosen.float() - ref_chosen.float().detach()
    rejected_ratio = rejected.float() - ref_rejected.float().detach()
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def clipped_importance_weights(
    logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, eps: float
) -> torch.Tensor:
    """RetroAct's per-token weight clip(pi / pi_beh, 1 - eps, 1 + eps), a constant (no gradient), 0 off the mask.

    Computed from the log-ratio in fp32; `where` so inf/nan ratios at prompt / padding positions can't leak.
    """
    ratio = torch.exp(logprobs.detach().float() - behaviour_logprobs.detach().float())
    w = ratio.clamp(1.0 - eps, 1.0 + eps)
    return torch.where(mask.bool(), w, torch.zeros((), dtype=w.dtype, device=w.device))


def offpolicy_pg_loss(
    logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, eps: float
) -> tuple[torch.Tensor, int]:
    """RetroAct's off-policy token loss: mean over generated tokens of -w_t * R_b * log pi(t), and the token count.

    logprobs / behaviour_logprobs / mask [B, T], rewards [B] (the sequence's return or rating). w_t is the clipped,
    detached importance weight, so the gradient is w_t * R_b * grad log pi: REINFORCE corrected for the replay
    buffer's stale sampler without PPO's ratio gradient. An all-masked batch gives a zero loss that still has a graph.
    """
    m = mask.bool()
    n = int(m.sum())
    w = clipped_importance_weights(logprobs, behaviour_logprobs, mask, eps)
    lp = torch.where(m, logprobs.float(), torch.zeros((), dtype=torch.float32, device=logprobs.device))
    total = (w * rewards.float().unsqueeze(-1) * lp).sum()
    return -total / max(n, 1), n


def reflection_pg_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Retroformer's reflector objective: policy gradient on rated reflections plus a KL penalty to the reference.

    loss = -sum_{b,t} A_b log pi_bt m_bt / n + kl_coef * mean_t k3, with k3 = exp(r) - r - 1, r = log ref - log pi:
    an unbiased, non-negative per-token KL(pi || ref) estimate whose gradient pulls pi back toward the reference and
    vanishes at pi == ref. Returns (loss, n_tokens, kl): kl is the detached mean over sequences of sum_t k3 m_t,
    the per-sequence KL an `AdaptiveKLController` tracks. k3 rather than log pi - log ref: the replay set was
    sampled by an older reflector, and on such samples the plain log-ratio can go negative.
    """
    m = mask.bool()
    n = int(m.sum())
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    lp = torch.where(m, logprobs.float(), zero)
    ref = torch.where(m, ref_logprobs.detach().float(), zero)
    pg = -(advantages.float().unsqueeze(-1) * lp).sum() / max(n, 1)
    r = ref - lp  # 0 off the mask, where k3(0) = 0
    k3 = torch.where(m, torch.exp(r) - r - 1.0, zero)
    loss = pg + kl_coef * k3.sum() / max(n, 1)
    seq_kl = k3.detach().sum(-1)
    kl = seq_kl.mean() if seq_kl.numel() else zero
    return loss, n, kl


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019; TRL's old PPO): nudge the coefficient toward a target KL.

    Each update multiplies `value` by 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon, so the KL penalty
    grows while the policy drifts past the target and relaxes while it stays below. target=None keeps it fixed.
    """

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int) -> None:
        if target is not None and target <= 0:
            raise ValueError(f"target KL must be positive or None, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Fold in the KL measured over the last `n_steps` samples; returns the new coefficient."""
        if self.target is not None:
            proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "target": self.target, "horizon": float(self.horizon)}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        """Restore the coefficient only: target and horizon come from the config, so a resumed run may change them."""
        self.value = float(state["value"])  # type: ignore[arg-type]


def advantages(rewards: torch.Tensor, groups: Sequence[str] | None = None) -> torch.Tensor:
    """rewards [B] minus a baseline, to cut the policy gradient's variance without biasing it.

    The baseline is the batch mean, or with `groups` (e.g. task ids) the mean reward of the sample's group, so a task
    that is easy for every reflection does not look like good reflecting. A group with a single sample in the batch
    has no peers to compare with and falls back to the batch mean (a lone sample in a batch of one gets 0).
    """
    r = rewards.float()
    if r.numel() == 0:
        return r
    baseline = r.mean().expand_as(r).clone()
    if groups is not None:
        if len(groups) != r.numel():
            raise ValueError(f"{len(groups)} groups for {r.numel()} rewards")
        members: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        for idx in members.values():
            if len(idx) > 1:
                sel = torch.tensor(idx, device=r.device)
                baseline[sel] = r[sel].mean()
    return r - baseline


def retroact_reflection_reward(rating: float, ret: float, alpha: float = 1.0) -> float:
    """RetroAct's reflection reward (code form): rating * (R_k + alpha) / alpha with rating = R_{k+1} - R_k.

    Weights the rating by how good the reflected-on trial already was. With 0/1 returns it equals the rating whenever
    R_k = 0, i.e. whenever trials stop at the first success (a failed trial is the only one reflected on); a
    reflection after a success that led to a failure would get -(1 + alpha) / alpha, not -1.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    return rating * (ret + alpha) / alpha
