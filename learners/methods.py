"""The methods' updates on top of the learner's mechanics (ALGORITHMS.md sections 2-4).

`MethodLearner` is the learner actor the pipelines start: `train_il` (IL / SFT) comes from `Learner`; this adds
ETO's DPO, Retroformer's reflector policy gradient and RetroAct's off-policy joint policy gradient. Each is one
short loop of `fit` steps over (batch, objective) parts; the losses themselves are the pure functions in losses.py.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from agents.adapters import AdapterUpdate, read_folder, write_folder
from agents.trajectory import REFLECTOR
from learners.adapters import adapter_dir
from learners.batching import Batch, TokenSample, make_batches, make_pair_batches
from learners.learner import Learner, Objective, merge_epochs
from learners.progress import tracked
from learners.losses import (
    AdaptiveKLController,
    advantages,
    clipped_importance_weights,
    dpo_loss,
    il_loss,
    masked_sum,
    offpolicy_pg_loss,
    reflection_pg_loss,
)


def _named(name: str, fn: Objective) -> Objective:
    fn.__name__ = name  # `fit` tags its loss and stats with the objective's name
    return fn


class MethodLearner(Learner):
    def __init__(self, *args: Any, kl_coef: float, target_kl: float | None, kl_horizon: int,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kl = AdaptiveKLController(kl_coef, target_kl, kl_horizon)
        self._reward_model: dict[str, torch.Tensor] | None = None  # Retroformer's optional rating classifier

    def _extra_state(self) -> dict[str, Any]:
        rm = self._reward_model
        return {"kl": self.kl.state_dict(),
                "reward_model": None if rm is None else {k: v.tolist() for k, v in rm.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "kl" in state:
            self.kl.load_state_dict(state["kl"])
        rm = state.get("reward_model")
        self._reward_model = None if rm is None else {k: torch.tensor(v) for k, v in rm.items()}

    # ------------------------------------------------------------------ files for the driver
    # On a cluster the learner runs on a node the driver's run directory is not on (and which the autoscaler may
    # terminate), so what it writes travels back as bytes and the driver stores it in the run directory.
    def publish_files(self, roles: Sequence[str] | None = None, force: bool = False
                      ) -> tuple[list[AdapterUpdate], dict[str, dict[str, bytes]]]:
        """`publish`, plus each published adapter folder's files keyed by `<role>/v<N>`."""
        updates = self.publish(roles=roles, force=force)
        folders = {f"{u.role}/v{u.version}": read_folder(adapter_dir(self.adapter_root, u.role, u.version))
                   for u in updates}
        return updates, folders

    def untrained_adapters(self) -> list[AdapterUpdate]:
        """Each role's adapter as it is now, unpublished (version 0), for engines to check they can serve it."""
        return [AdapterUpdate(role=r, version=0, tensors=self.adapter_tensors(self.adapter_of[r])) for r in self.roles]

    def checkpoint_files(self) -> dict[str, bytes]:
        """A checkpoint (`save_checkpoint`) as its files."""
        with tempfile.TemporaryDirectory(prefix="retrorl-checkpoint-") as tmp:
            return read_folder(self.save_checkpoint(Path(tmp) / "checkpoint"))

    def load_checkpoint_files(self, files: dict[str, bytes]) -> None:
        """`load_checkpoint` of a checkpoint sent as its files (`checkpoint_files`)."""
        with tempfile.TemporaryDirectory(prefix="retrorl-checkpoint-") as tmp:
            self.load_checkpoint(write_folder(files, Path(tmp) / "checkpoint"))

    def load_role_files(self, role: str, files: dict[str, bytes]) -> None:
        """Serve `role` with that role's adapter from another checkpoint (its adapters and learner.json), under that
        checkpoint's version of it: `retrorl eval --reflector-checkpoint`. Evaluation only: the optimizer's master
        copies and Adam state stay the loaded checkpoint's, so this learner is not trained afterwards."""
        from safetensors.torch import load

        adapter = self.adapter_of[role]
        if adapter != role:
            raise ValueError(f"role {role!r} shares adapter {adapter!r} with the other role; it cannot be swapped "
                             "alone")
        self._load_adapter(adapter, load(files["adapters.safetensors"]))
        meta = json.loads(files["learner.json"])  # its version and whether it was trained since: as load_checkpoint
        self._versions[role] = int(meta["versions"].get(role, 0))
        (self._dirty.add if role in meta["dirty"] else self._dirty.discard)(role)

    # ------------------------------------------------------------------ ETO
    @tracked("dpo")
    def train_dpo(
        self,
        pairs: Sequence[tuple[TokenSample, TokenSample]],
        *,
        beta: float,
        epochs: int,
        lr: float | None = None,
        max_tokens_per_batch: int,
        nll_coef: float = 0.0,
    ) -> dict[str, float]:
        """DPO over whole trajectories; the reference is this policy as the call starts (ETO: pi_ref := pi_theta
        at the start of each iteration), scored once up front. Pairs with a sample over the length cap are dropped.
        `nll_coef` > 0 adds that times the mean token NLL of the chosen trajectories (RPO; TRL's loss_type
        ["sigmoid", "sft"], trl/trainer/dpo_trainer.py:1495 in 1.16): an anchor on what the winners do."""
        flat = [s for pair in pairs for s in pair]
        kept, counts = self.prepare(flat)
        keep = {id(s) for s in kept}
        pairs = [p for p in pairs if id(p[0]) in keep and id(p[1]) in keep]
        scored = self.with_logprobs([s for p in pairs for s in p])  # current policy = the reference
        pairs = [(scored[2 * i], scored[2 * i + 1]) for i in range(len(pairs))]
        self.set_lr(lr)

        def dpo(batch: Batch, lp: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
            mask = batch.loss_mask[:, 1:]
            policy = masked_sum(lp, mask)
            ref = masked_sum(batch.ref_logprobs[:, 1:], mask)
            k = policy.shape[0] // 2  # rows: chosen first, then rejected (make_pair_batches)
            loss, chosen, rejected = dpo_loss(policy[:k], policy[k:], ref[:k], ref[k:], beta)
            # The implicit rewards per side, as TRL logs them: a margin won by lowering the winner too (both
            # negative) is likelihood displacement, which broke ScienceWorld's actor (results/sws-eto/README.md).
            stats = {"reward_accuracy": float((chosen > rejected).float().mean()),
                     "reward_margin": float((chosen - rejected).mean()),
                     "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean())}
            if nll_coef:
                nll = -policy[:k].sum() / mask[:k].sum().clamp(min=1)
                loss = loss + nll_coef * nll
                stats["nll_chosen"] = float(nll.detach())
            return loss, k, stats

        objective = _named("dpo", dpo)
        plan = [[[(b, objective)] for b in make_pair_batches(pairs, max_tokens_per_batch, self.pad_id, self._rng)]
                for _ in range(epochs)]
        return {**merge_epochs(self.fit_epochs(plan)), **counts, "pairs": len(pairs), "beta": beta,
                "nll_coef": nll_coef}

    # ------------------------------------------------------------------ Retroformer
    @tracked("reflector-pg")
    def train_reflector_pg(
        self,
        samples: Sequence[TokenSample],
        *,
        epochs: int,
        lr: float | None = None,
        baseline: str,
        max_tokens_per_batch: int,
    ) -> dict[str, float]:
        """Policy gradient on the replay set (x, y, rating): advantage = rating - baseline (the replay set's mean,
        or per task), plus the KL penalty to the reference (`set_reference`) with the adaptive coefficient."""
        if any(s.role != REFLECTOR for s in samples):
            raise ValueError("Retroformer trains the reflector only; got samples of other roles")
        kept, counts = self.prepare(samples)
        if not kept:
            return {"steps": 0, **counts}
        groups = [s.meta["task_id"] for s in kept] if baseline == "task" else None
        adv = advantages(torch.tensor([s.reward for s in kept], dtype=torch.float32), groups)
        kept = self.with_logprobs(kept, reference=True)
        for s, a in zip(kept, adv.tolist()):
            s.reward = a
        self.set_lr(lr)

        def pg(batch: Batch, lp: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
            coef = self.kl.value
            loss, n, kl = reflection_pg_loss(lp, batch.ref_logprobs[:, 1:], batch.loss_mask[:, 1:],
                                             batch.rewards, coef)
            self.kl.update(float(kl), batch.input_ids.shape[0])
            return loss, n, {"kl": float(kl), "kl_coef": coef}

        objective = _named("pg", pg)
        plan = [[[(b, objective)] for b in make_batches(kept, max_tokens_per_batch, self.pad_id, self._rng)[REFLECTOR]]
                for _ in range(epochs)]
        return {**merge_epochs(self.fit_epochs(plan)), **counts, "mean_rating": float(torch.tensor(
            [s.reward for s in samples]).mean()), "kl_coef_end": self.kl.value}

    # ------------------------------------------------------------------ Retroformer's reward model
    @torch.no_grad()
    def _features(self, samples: Sequence[TokenSample]) -> torch.Tensor:
        """[N, hidden]: the base model's last hidden state (adapters off: a fixed encoder) averaged over each
        sample's trained tokens. Under causal attention those positions have read the whole prompt as well."""
        was_training = self.engine.training
        self.engine.eval()
        out = []
        try:
            with self.peft.disable_adapter():
                decoder = self.peft.get_base_model().get_decoder()
                for s in samples:  # one sequence per forward: replay sets are small, and no padding to mask
                    ids = torch.tensor([s.ids], device=self.device)
                    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
                    mask = torch.tensor(s.mask, device=self.device, dtype=torch.bool)
                    out.append(hidden[mask].float().mean(0).cpu())
        finally:
            self.engine.train(was_training)
        return torch.stack(out)

    def train_reward_model(self, samples: Sequence[TokenSample], steps: int = 300, lr: float = 0.05,
                           weight_decay: float = 1e-2) -> dict[str, float]:
        """Retroformer's reward model: a classifier of rating > 0 on (reflection prompt, reflection). Here a
        class-balanced logistic regression on frozen base-model features; it ranks best-of-n reflections."""
        kept, counts = self.prepare(samples)
        labels = torch.tensor([1.0 if s.reward > 0 else 0.0 for s in kept])
        n_pos = int(labels.sum())
        if n_pos == 0 or n_pos == len(kept):
            return {"trained": 0, "positives": n_pos, "samples": len(kept), **counts}
        x = self._features(kept)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        w = torch.zeros(z.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
        pos_weight = torch.tensor((len(kept) - n_pos) / n_pos)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, labels, pos_weight=pos_weight)
            loss.backward()
            opt.step()
        self._reward_model = {"mean": mean, "std": std, "w": w.detach(), "b": b.detach()}
        accuracy = float(((z @ w + b > 0).float() == labels).float().mean())
        return {"trained": 1, "positives": n_pos, "samples": len(kept), "loss": float(loss.detach()),
                "train_accuracy": accuracy, **counts}

    def score_reflections(self, samples: Sequence[TokenSample]) -> list[float]:
        """P(rating > 0) per sample under the reward model."""
        rm = self._reward_model
        if rm is None:
            raise RuntimeError("no reward model: train_reward_model first (it needs both helpful and unhelpful "
                               "reflections in the replay set)")
        z = (self._features(samples) - rm["mean"]) / rm["std"]
        return torch.sigmoid(z @ rm["w"] + rm["b"]).tolist()

    # ------------------------------------------------------------------ RetroAct
    @tracked("retroact")
    def train_retroact(
        self,
        rl_samples: Sequence[TokenSample],
        il_samples: Sequence[TokenSample],
        *,
        epochs: int,
        lr: float | None = None,
        eps: float,
        il_coef: float,
        max_tokens_per_batch: int,
    ) -> dict[str, float]:
        """Off-policy joint policy gradient for every role with RL samples: each step pairs a role's RL batch
        (clipped, detached importance weight against the behaviour log-probs) with one of its IL batches,
        cycled (oversampled) so every RL batch has one: L = L_RL + il_coef * L_IL."""
        rl, counts = self.prepare(rl_samples)
        il, il_counts = self.prepare(il_samples)
        if any(s.logprobs is None for s in rl):
            raise ValueError("RetroAct needs the behaviour log-probs recorded at sampling time")
        self.set_lr(lr)

        def offpolicy(batch: Batch, lp: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, float]]:
            mask = batch.loss_mask[:, 1:]
            behaviour = batch.behaviour_logprobs[:, 1:]
            loss, n = offpolicy_pg_loss(lp, behaviour, mask, batch.rewards, eps)
            w = clipped_importance_weights(lp, behaviour, mask, eps)  # at a bound where the ratio was clipped
            clipped = ((w <= 1 - eps) | (w >= 1 + eps)) & mask.bool()
            return loss, n, {"clip_frac": float(clipped.sum()) / max(n, 1)}

        def imitation(batch: Batch, lp: torch.Tensor) -> tuple[torch.Tensor, int]:
            loss, n = il_loss(lp, batch.loss_mask[:, 1:])
            return il_coef * loss, n

        rl_obj, il_obj = _named("rl", offpolicy), _named("il", imitation)
        plan = []
        for _ in range(epochs):
            rl_batches = make_batches(rl, max_tokens_per_batch, self.pad_id, self._rng)
            il_streams = {role: self._cycle(il, role, max_tokens_per_batch) for role in rl_batches}
            steps = []
            for step in self._steps(rl_batches):
                parts: list[tuple[Batch, Objective]] = []
                for role, batch in step.items():
                    parts.append((batch, rl_obj))
                    il_batch = next(il_streams[role], None)
                    if il_batch is not None:
                        parts.append((il_batch, il_obj))
                steps.append(parts)
            plan.append(steps)
        per_epoch = self.fit_epochs(plan, tag=lambda b, obj: f"{obj.__name__}/{b.role}")
        return {**merge_epochs(per_epoch), **counts, **{f"il_{k}": v for k, v in il_counts.items()},
                "rl_samples": len(rl)}

    def _cycle(self, samples: Sequence[TokenSample], role: str, max_tokens: int) -> Iterator[Batch]:
        """Endless IL batches of one role, reshuffled on every pass (empty when the role has no IL data)."""
        mine = [s for s in samples if s.role == role]
        if not mine:
            return iter(())
        return itertools.chain.from_iterable(
            make_batches(mine, max_tokens, self.pad_id, self._rng)[role] for _ in itertools.count())
