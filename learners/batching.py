"""From trajectory records to padded token batches.

A `TokenSample` is one training sequence: the exact ids the engine saw and sampled (never re-tokenised), a mask
that is 1 exactly on generated tokens, the role whose adapter produced them, and optional per-token behaviour
log-probs and a scalar reward / weight for the RL losses. Batches are built per role (one adapter per forward),
sorted by length and right-padded under a token budget so padding waste stays small.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from agents.trajectory import ACTOR, REFLECTOR, Episode, Generation, Trial
from learners.losses import retroact_reflection_reward


@dataclass
class TokenSample:
    ids: list[int]
    mask: list[int]  # 1 = a generated (agent) token that is trained on; prompts and observations are 0
    role: str
    logprobs: list[float] | None = None  # behaviour log-prob per position of `ids` (0.0 where mask == 0)
    ref_logprobs: list[float] | None = None  # reference-policy log-prob per position (DPO, KL penalties)
    reward: float = 0.0  # scalar return / rating for policy-gradient losses
    weight: float = 1.0  # per-sample loss weight (e.g. IL oversampling)
    meta: dict[str, Any] = field(default_factory=dict)  # episode_id, trial, task_id ... for pairing and logs

    def __post_init__(self) -> None:
        if len(self.mask) != len(self.ids):
            raise ValueError(f"mask has {len(self.mask)} entries for {len(self.ids)} ids")
        for name in ("logprobs", "ref_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.ids):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.ids)} ids")
        if self.mask and self.mask[0]:
            raise ValueError("the first token has no context and cannot be a trained token")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_trained(self) -> int:
        return sum(self.mask)


def trial_sample(episode: Episode, trial: Trial, turns: int | None = None,
                 trained: Sequence[bool] | None = None) -> TokenSample:
    """The trial's actor ids up to the end of turn `turns` (all turns by default), mask 1 exactly on each step's
    completion span, behaviour log-probs there. Cutting after a completion keeps the sample ending on an agent turn.
    `trained`: per step, whether its completion is trained on (all by default); the others stay context."""
    steps = trial.steps[:turns] if turns is not None else trial.steps
    if not steps:
        raise ValueError(f"episode {episode.episode_id} trial {trial.index} has no steps")
    last = steps[-1].generation
    ids = last.prompt_ids + last.completion_ids
    mask = [0] * len(ids)
    logprobs = [0.0] * len(ids)
    for k, step in enumerate(steps):
        gen = step.generation
        start, end = len(gen.prompt_ids), len(gen.prompt_ids) + len(gen.completion_ids)
        # The append-only invariant: a step's completion sits verbatim in the trial's final sequence.
        if ids[start:end] != gen.completion_ids:
            raise ValueError(
                f"episode {episode.episode_id} trial {trial.index} step {k}: completion ids are not at "
                f"[{start}, {end}) of the trial's actor ids; the prompt was not built by appending ids"
            )
        if trained is None or trained[k]:
            mask[start:end] = [1] * (end - start)
            logprobs[start:end] = gen.logprobs
    return TokenSample(
        ids=list(ids),
        mask=mask,
        role=ACTOR,
        logprobs=logprobs,
        reward=trial.ret,  # R_k for every actor step of trial k (RetroAct)
        meta={**_meta(episode, trial.index, version=last.version), "turns": len(steps),
              "min_version": min(step.generation.version for step in steps), "success": trial.success},
    )


def new_valid_steps(trial: Trial) -> list[bool]:
    """Per step: the env understood its action and the trial had not taken that action before."""
    taken: set[str] = set()
    keep = []
    for step in trial.steps:
        keep.append(step.valid and step.action not in taken)
        taken.add(step.action)
    return keep


def actor_samples(episode: Episode, steps: Callable[[Trial], Sequence[bool]] | None = None) -> list[TokenSample]:
    """One sample per trial with steps (see `trial_sample`); `steps(trial)` picks the steps trained on (all by
    default)."""
    return [trial_sample(episode, t, trained=steps(t) if steps else None) for t in episode.trials if t.steps]


def generation_sample(gen: Generation, reward: float = 0.0, meta: dict[str, Any] | None = None) -> TokenSample:
    """One model call as a sample: prompt + completion, mask and behaviour log-probs on the completion."""
    n_prompt = len(gen.prompt_ids)
    return TokenSample(
        ids=list(gen.prompt_ids) + list(gen.completion_ids),
        mask=[0] * n_prompt + [1] * len(gen.completion_ids),
        role=gen.role,
        logprobs=[0.0] * n_prompt + list(gen.logprobs),
        reward=reward,
        meta=dict(meta or {}),
    )


def reflector_samples(episode: Episode) -> list[TokenSample]:
    """One sample per trial with a reflection: prompt + completion, mask on the completion.

    reward = R_{k+1} - R_k (the raw rating; methods rescale it), 0.0 when no later trial was run.
    """
    out: list[TokenSample] = []
    trials = episode.trials
    for i, trial in enumerate(trials):
        gen = trial.reflection
        if gen is None:
            continue
        has_next = i + 1 < len(trials)
        rating = trials[i + 1].ret - trial.ret if has_next else 0.0
        meta = {**_meta(episode, trial.index, version=gen.version), "has_next": has_next, "ret": trial.ret}
        out.append(generation_sample(gen, rating, meta))
    return out


def _meta(episode: Episode, trial: int, version: int) -> dict[str, Any]:
    return {"episode_id": episode.episode_id, "task_id": episode.task_id, "trial": trial, "version": version}


def cap_length(samples: Sequence[TokenSample], max_len: int | None) -> tuple[list[TokenSample], int]:
    """Drop (never truncate: a cut trajectory trains on a different context) samples over max_len; count them."""
    if max_len is None:
        return list(samples), 0
    kept = [s for s in samples if len(s) <= max_len]
    return kept, len(samples) - len(kept)


@dataclass
class Batch:
    """Right-padded tensors for one role. `index` maps rows back to positions in the caller's sample list."""

    role: str
    input_ids: torch.Tensor  # [B, T] long, padded with pad_id
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] long, 1 on trained tokens (subset of attention_mask)
    behaviour_logprobs: torch.Tensor | None  # [B, T] float32 or None when any sample lacks them
    ref_logprobs: torch.Tensor | None  # [B, T] float32 or None when any sample lacks them
    rewards: torch.Tensor  # [B] float32
    weights: torch.Tensor  # [B] float32
    index: list[int]

    def to(self, device: torch.device | str) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            self.role, mv(self.input_ids), mv(self.attention_mask), mv(self.loss_mask),
            mv(self.behaviour_logprobs), mv(self.ref_logprobs), mv(self.rewards), mv(self.weights), self.index,
        )  # fmt: skip

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_trained(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def n_padded(self) -> int:
        return self.input_ids.numel()


def collate(samples: Sequence[TokenSample], index: Sequence[int], pad_id: int = 0) -> Batch:
    roles = {s.role for s in samples}
    if len(roles) != 1:
        raise ValueError(f"a batch holds one role (one adapter per forward), got {sorted(roles)}")
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    floats = {}
    for name in ("logprobs", "ref_logprobs"):
        if all(getattr(s, name) is not None for s in samples):
            floats[name] = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, s in enumerate(samples):
        n = len(s)
        ids[row, :n] = torch.tensor(s.ids, dtype=torch.long)
        attn[row, :n] = 1
        mask[row, :n] = torch.tensor(s.mask, dtype=torch.long)
        for name, t in floats.items():
            t[row, :n] = torch.tensor(getattr(s, name), dtype=torch.float32)
    return Batch(
        role=roles.pop(),
        input_ids=ids,
        attention_mask=attn,
        loss_mask=mask,
        behaviour_logprobs=floats.get("logprobs"),
        ref_logprobs=floats.get("ref_logprobs"),
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        weights=torch.tensor([s.weight for s in samples], dtype=torch.float32),
        index=list(index),
    )


def make_batches(
    samples: Sequence[TokenSample],
    max_tokens: int,
    pad_id: int = 0,
    rng: random.Random | None = None,
    max_batch_size: int | None = None,
) -> dict[str, list[Batch]]:
    """Group samples per role into batches whose padded size (rows x longest row) stays <= max_tokens.

    Sorting by length makes neighbours similar so right padding wastes little; with `rng`, equal-length samples
    and the batch order are shuffled (a different mix each epoch). A single sample longer than max_tokens gets
    a batch of its own (cap lengths first with `cap_length` to bound memory).
    """
    by_role: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_role.setdefault(s.role, []).append(i)
    out: dict[str, list[Batch]] = {}
    for role, idx in by_role.items():
        if rng is not None:
            rng.shuffle(idx)
        groups = _group_by_width(idx, lambda i: len(samples[i]), 1, max_tokens, rng, max_batch_size)
        out[role] = [collate([samples[i] for i in g], g, pad_id) for g in groups]
    return out


def _group_by_width(
    order: list[int],
    width: Callable[[int], int],
    rows_per_item: int,
    max_tokens: int,
    rng: random.Random | None,
    max_items: int | None = None,
) -> list[list[int]]:
    """Items sorted by width (stable: a prior shuffle of `order` decides ties), cut into groups whose padded size
    (rows x widest row) stays <= max_tokens; an item over the budget gets a group of its own. With `rng`, the
    group order is shuffled too."""
    order = sorted(order, key=width)
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        full = max_items is not None and len(cur) >= max_items
        # ascending, so width(i) is the width of cur + [i]
        if cur and (full or rows_per_item * (len(cur) + 1) * width(i) > max_tokens):
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    if rng is not None:
        rng.shuffle(groups)
    return groups


def il_samples(episodes: Iterable[Episode], memory_only: float = 0.0, seed: int = 0) -> list[TokenSample]:
    """IL data (ALGORITHMS.md section 1): actor trials that won, and reflections followed by a winning trial.

    `memory_only`: on that fraction of the tasks that have a reflection followed by a win (picked with `seed`),
    the actor's memory-free winning trials are left out, so its only copy of the play is the one after the
    reflection, whose plan names the actions."""
    episodes = list(episodes)
    conditioned = sorted({e.task_id for e in episodes for t in e.trials if t.success and t.memory})
    random.Random(seed).shuffle(conditioned)
    memory_tasks = set(conditioned[: round(memory_only * len(conditioned))])
    out: list[TokenSample] = []
    for episode in episodes:
        memory_needed = episode.task_id in memory_tasks
        wins = {t.index for t in episode.trials if t.success and (t.memory or not memory_needed)}
        out += [s for s in actor_samples(episode) if s.meta["trial"] in wins]
        out += [s for s in reflector_samples(episode) if s.meta["trial"] + 1 in wins]
    return out


# ---------------------------------------------------------------------------------------------------- methods' data
def expert_wins(demos: Iterable[Episode]) -> dict[str, Episode]:
    """Each task's winning one-trial expert demo, by task id: the trajectories ETO pairs its explorations with."""
    return {d.task_id: d for d in demos if d.source == "expert" and len(d.trials) == 1 and d.success}


def dpo_pairs(
    explored: Iterable[Episode], experts: dict[str, Episode], extra_turns: int = 5
) -> tuple[list[tuple[TokenSample, TokenSample]], dict[str, int]]:
    """ETO's (win, lose) pairs: each explored first trial against the expert trajectory of its task.

    r(explored) < r(expert): (expert, explored); r(explored) > r(expert): swapped; ties are dropped. The loser
    is cut to at most len(expert) + `extra_turns` turns, at the end of a completion so it ends on an agent
    turn. Both start from the same reset, so they share the instruction + task prefix. Returns pairs and counts.
    """
    pairs: list[tuple[TokenSample, TokenSample]] = []
    counts = {"explored": 0, "no_expert": 0, "ties": 0, "pairs": 0, "truncated": 0}
    for episode in explored:
        counts["explored"] += 1
        expert = experts.get(episode.task_id)
        if expert is None or not expert.trials or not expert.trials[0].steps or not episode.trials[0].steps:
            counts["no_expert"] += 1
            continue
        e_trial, x_trial = expert.trials[0], episode.trials[0]
        if x_trial.ret == e_trial.ret:
            counts["ties"] += 1
            continue
        limit = len(e_trial.steps) + extra_turns
        counts["truncated"] += len(x_trial.steps) > limit
        expert_s = trial_sample(expert, e_trial)
        explored_s = trial_sample(episode, x_trial, turns=min(limit, len(x_trial.steps)))
        pairs.append((expert_s, explored_s) if x_trial.ret < e_trial.ret else (explored_s, expert_s))
    counts["pairs"] = len(pairs)
    return pairs, counts


def make_pair_batches(
    pairs: Sequence[tuple[TokenSample, TokenSample]],
    max_tokens: int,
    pad_id: int = 0,
    rng: random.Random | None = None,
) -> list[Batch]:
    """Batches of whole pairs: rows [chosen_0..chosen_k, rejected_0..rejected_k], padded size <= max_tokens
    (a pair larger than the budget gets a batch of its own). `index` holds pair numbers, chosen rows first."""
    order = list(range(len(pairs)))
    if rng is not None:
        rng.shuffle(order)
    groups = _group_by_width(order, lambda i: max(len(pairs[i][0]), len(pairs[i][1])), 2, max_tokens, rng)
    return [collate([pairs[i][0] for i in g] + [pairs[i][1] for i in g], g + g, pad_id) for g in groups]


def reflection_replay(episodes: Iterable[Episode]) -> list[TokenSample]:
    """Retroformer's replay set: (reflection prompt, reflection, rating R_{k+1} - R_k) for every reflection
    whose next trial was run; each is a one-step bandit episode."""
    return [s for e in episodes for s in reflector_samples(e) if s.meta["has_next"]]


def bound_policy_lag(
    samples: Iterable[TokenSample], current: Mapping[str, int], max_lag: int, stale: str = "drop"
) -> tuple[list[TokenSample], dict[str, Any]]:
    """Async mode's staleness bound. A sample's lag is its role's current learner version minus the oldest
    version that generated it (a trial played across an update mixes versions). A sample more than `max_lag`
    versions behind is dropped ("drop"), or its reward is scaled by 1 / (1 + lag - max_lag) ("downweight").
    Returns the kept samples and what happened: the largest lag, stale samples dropped / down-weighted."""
    if stale not in ("drop", "downweight"):
        raise ValueError(f"stale must be 'drop' or 'downweight', not {stale!r}")
    kept: list[TokenSample] = []
    counts: dict[str, Any] = {"lag_max": 0, "stale_dropped": 0, "stale_downweighted": 0}
    for s in samples:
        lag = current[s.role] - s.meta.get("min_version", s.meta["version"])
        counts["lag_max"] = max(counts["lag_max"], lag)
        if lag <= max_lag:
            kept.append(s)
        elif stale == "drop":
            counts["stale_dropped"] += 1
        else:
            kept.append(dataclasses.replace(s, reward=s.reward / (1 + lag - max_lag)))
            counts["stale_downweighted"] += 1
    return kept, counts


def retroact_samples(
    episodes: Iterable[Episode], alpha: float = 1.0, scaled: bool = True,
    actor_reward: Literal["return", "success"] = "return", actor_steps: Literal["all", "new_valid"] = "all",
) -> tuple[list[TokenSample], dict[str, int]]:
    """RetroAct's RL samples with ALGORITHMS.md's filters: actor trials with R_k = 0 are dropped (they carry no
    gradient); reflections are kept only when R_{k+1} != R_k, rewarded (R_{k+1} - R_k)(R_k + alpha)/alpha
    (`scaled`, the code form) or R_{k+1} - R_k. The length cap is the learner's (`cap_length`).
    `actor_reward="success"`: an actor trial's R is 1 if it won, else 0 (ALFWorld's binary return), so a trial
    with only a partial score, which may be mostly invalid actions, is not reinforced.
    `actor_steps="new_valid"`: a kept trial trains only on the steps `new_valid_steps` picks (the others are context),
    so a partial score does not also reinforce the invalid actions and repeats around it; a trial with none such
    is dropped (`actor_no_step`)."""
    kept: list[TokenSample] = []
    counts = {"actor_zero": 0, "reflector_unchanged": 0}
    steps = new_valid_steps if actor_steps == "new_valid" else None
    if steps is not None:
        counts["actor_no_step"] = 0
    for episode in episodes:
        for s in actor_samples(episode, steps):
            if actor_reward == "success":
                s.reward = 1.0 if s.meta["success"] else 0.0
            if s.reward == 0.0:
                counts["actor_zero"] += 1
            elif steps is not None and s.n_trained == 0:
                counts["actor_no_step"] += 1
            else:
                kept.append(s)
        for s in reflector_samples(episode):
            if not s.meta["has_next"] or s.reward == 0.0:
                counts["reflector_unchanged"] += 1
                continue
            if scaled:
                s.reward = retroact_reflection_reward(s.reward, s.meta["ret"], alpha)
            kept.append(s)
    return kept, counts
