import random

import pytest
import torch

from agents.trajectory import ACTOR, EXPERT_VERSION, REFLECTOR, Episode, Generation, Step, Trial
from learners.batching import (
    bound_policy_lag,
    dpo_pairs,
    make_pair_batches,
    reflection_replay,
    retroact_samples,
    TokenSample,
    actor_samples,
    cap_length,
    il_samples,
    make_batches,
    reflector_samples,
)


def _trial(index: int, prompt: list[int], turns: list[tuple[list[int], list[int]]], ret: float) -> Trial:
    """Build a trial the way the runner does: each step's prompt = previous prompt + completion + observation."""
    trial = Trial(index=index, memory=[], ret=ret, success=ret == 1.0)
    ctx = list(prompt)
    for k, (completion, obs) in enumerate(turns):
        gen = Generation(ACTOR, list(ctx), list(completion), [-0.1 * (k + 1)] * len(completion), 3, "t")
        trial.steps.append(Step("obs", "act", "th", 0.0, 0.0, True, True, gen))
        ctx = ctx + completion + obs
    return trial


def _episode() -> Episode:
    t0 = _trial(0, [1, 2, 3], [([10, 11], [50, 51, 52]), ([12, 13, 14], [53])], ret=0.0)
    t0.reflection = Generation(REFLECTOR, [7, 8, 9, 9], [20, 21, 22], [-0.5, -0.6, -0.7], 2, "r")
    t1 = _trial(1, [1, 2, 4], [([15], [54, 55]), ([16, 17], [])], ret=1.0)
    return Episode("ep1", "textworld", "task-a", "train", "rollout", [t0, t1])


def test_actor_mask_covers_exactly_generated_tokens():
    samples = actor_samples(_episode())
    assert len(samples) == 2
    s0 = samples[0]
    assert s0.ids == [1, 2, 3, 10, 11, 50, 51, 52, 12, 13, 14]
    generated = [i for i, m in enumerate(s0.mask) if m]
    assert [s0.ids[i] for i in generated] == [10, 11, 12, 13, 14]
    assert generated == [3, 4, 8, 9, 10]
    assert s0.logprobs == [0, 0, 0, -0.1, -0.1, 0, 0, 0, -0.2, -0.2, -0.2]
    assert s0.role == ACTOR and s0.reward == 0.0 and samples[1].reward == 1.0
    assert s0.meta["episode_id"] == "ep1" and s0.meta["trial"] == 0
    s1 = samples[1]
    assert [t for t, m in zip(s1.ids, s1.mask) if m] == [15, 16, 17]


def test_reflector_sample_and_rating():
    (r,) = reflector_samples(_episode())
    assert r.role == REFLECTOR
    assert r.ids == [7, 8, 9, 9, 20, 21, 22] and r.mask == [0, 0, 0, 0, 1, 1, 1]
    assert r.logprobs == [0, 0, 0, 0, -0.5, -0.6, -0.7]
    assert r.reward == 1.0  # R_1 - R_0
    assert len(actor_samples(_episode()) + reflector_samples(_episode())) == 3


def test_il_samples_keep_successes_and_reflections_before_success():
    ep = _episode()  # trial 0 failed (reflection written), trial 1 succeeded
    got = il_samples([ep])
    assert [(s.role, s.meta["trial"]) for s in got] == [(ACTOR, 1), (REFLECTOR, 0)]
    ep.trials[1].success = False  # nothing succeeded: no IL data at all
    assert il_samples([ep]) == []


def test_non_appending_trial_is_rejected():
    ep = _episode()
    ep.trials[0].steps[0].generation.completion_ids = [99, 98]  # not what the final sequence holds
    with pytest.raises(ValueError, match="appending"):
        actor_samples(ep)


def test_expert_episode():
    gen = Generation(ACTOR, [1, 2], [3, 4], [0.0, 0.0], EXPERT_VERSION, "x", "expert")
    trial = Trial(0, [], [Step("o", "a", "t", 1.0, 1.0, True, True, gen)], ret=1.0, success=True)
    (s,) = actor_samples(Episode("e", "tw", "t", "train", "expert", [trial]))
    assert s.mask == [0, 0, 1, 1] and s.meta["version"] == EXPERT_VERSION


def test_sample_validation():
    with pytest.raises(ValueError):
        TokenSample([1, 2], [0], ACTOR)
    with pytest.raises(ValueError):
        TokenSample([1, 2], [1, 1], ACTOR)  # first token has no context
    with pytest.raises(ValueError):
        TokenSample([1, 2], [0, 1], ACTOR, logprobs=[0.0])


def test_cap_length_drops_and_counts():
    samples = [TokenSample(list(range(n)), [0] * (n - 1) + [1], ACTOR) for n in (3, 10, 5, 11)]
    kept, dropped = cap_length(samples, 10)
    assert dropped == 1 and [len(s) for s in kept] == [3, 10, 5]
    assert cap_length(samples, None) == (samples, 0)


def _random_samples(n: int, seed: int = 0) -> list[TokenSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(4, 60)
        mask = [0] * length
        for j in range(rng.randint(1, length - 1), length):
            mask[j] = 1
        role = ACTOR if i % 3 else REFLECTOR
        out.append(TokenSample([rng.randint(5, 99) for _ in range(length)], mask, role, logprobs=[-1.0] * length))
    return out


def test_make_batches_budget_padding_and_masks():
    samples = _random_samples(40)
    batches = make_batches(samples, max_tokens=128, pad_id=0, rng=random.Random(1))
    seen = []
    for role, bs in batches.items():
        for b in bs:
            assert b.role == role
            assert b.n_padded <= 128 or len(b.index) == 1
            for row, i in enumerate(b.index):
                s = samples[i]
                assert s.role == role
                n = len(s)
                assert b.input_ids[row, :n].tolist() == s.ids
                assert b.attention_mask[row].tolist() == [1] * n + [0] * (b.input_ids.shape[1] - n)
                assert b.loss_mask[row, :n].tolist() == s.mask
                assert b.loss_mask[row, n:].sum() == 0 and (b.input_ids[row, n:] == 0).all()
                assert torch.equal(b.behaviour_logprobs[row, :n], torch.tensor(s.logprobs))
            seen += b.index
    assert sorted(seen) == list(range(len(samples)))
    # sorted-by-length grouping keeps padding small
    packed = [b for bs in batches.values() for b in bs]
    assert 1 - sum(b.n_tokens for b in packed) / sum(b.n_padded for b in packed) < 0.15  # padding


def test_make_batches_oversize_and_batch_size():
    samples = [TokenSample(list(range(50)), [0] * 49 + [1], ACTOR), TokenSample([1, 2, 3], [0, 0, 1], ACTOR)]
    (bs,) = make_batches(samples, max_tokens=20).values()
    assert sorted(len(b.index) for b in bs) == [1, 1]  # the long one gets its own batch
    many = [TokenSample([1, 2, 3], [0, 1, 1], ACTOR)] * 10
    (bs,) = make_batches(many, max_tokens=1000, max_batch_size=4).values()
    assert [len(b.index) for b in bs] == [4, 4, 2]


def test_make_batches_deterministic_with_seed():
    samples = _random_samples(30, seed=3)
    a = make_batches(samples, 200, rng=random.Random(5))
    b = make_batches(samples, 200, rng=random.Random(5))
    assert {r: [x.index for x in v] for r, v in a.items()} == {r: [x.index for x in v] for r, v in b.items()}


# ---------------------------------------------------------------------------------------------- methods' data
def _single(task: str, ret: float, turns: int, episode_id: str, source: str = "rollout") -> Episode:
    steps = [([10 + k, 11 + k], [50 + k]) for k in range(turns)]
    return Episode(episode_id, "textworld", task, "train", source, [_trial(0, [1, 2, 3], steps, ret)])


def test_dpo_pairs_order_ties_and_truncation():
    experts = {t: _single(t, 1.0, 2, f"x-{t}", "expert") for t in ("a", "b", "c")}
    explored = [
        _single("a", 0.0, 12, "e-a"),  # loses: (expert, explored), cut to 2 + 5 = 7 turns
        _single("b", 1.0, 3, "e-b"),  # ties its expert: dropped
        _single("c", 0.0, 4, "e-c"),  # loses, short enough to keep whole
        _single("d", 0.0, 4, "e-d"),  # no expert for d
    ]
    pairs, counts = dpo_pairs(explored, experts, extra_turns=5)
    assert counts == {"explored": 4, "no_expert": 1, "ties": 1, "pairs": 2, "truncated": 1}
    (win_a, lose_a), (win_c, lose_c) = pairs
    assert win_a.meta["episode_id"] == "x-a" and lose_a.meta["episode_id"] == "e-a"
    assert lose_a.meta["turns"] == 7 and lose_c.meta["turns"] == 4
    # The cut loser ends on an agent turn: its last token is trained, and it is a prefix of the full trial.
    full = actor_samples(explored[0])[0]
    assert lose_a.mask[-1] == 1 and full.ids[: len(lose_a)] == lose_a.ids and len(lose_a) < len(full)
    # Both share the reset's prompt prefix.
    assert win_a.ids[:3] == lose_a.ids[:3] == [1, 2, 3]
    # An explored trajectory that beats a failed expert is the winner.
    experts["a"].trials[0].ret = 0.0
    explored[0].trials[0].ret = 1.0
    (win, lose), *_ = dpo_pairs(explored[:1], experts)[0]
    assert win.meta["episode_id"] == "e-a" and lose.meta["episode_id"] == "x-a"


def test_make_pair_batches_keeps_pairs_together():
    pairs = [(_random_samples(1, seed=i)[0], _random_samples(1, seed=100 + i)[0]) for i in range(7)]
    batches = make_pair_batches(pairs, max_tokens=400, rng=random.Random(0))
    seen = []
    for b in batches:
        k = len(b.index) // 2
        assert b.index[:k] == b.index[k:] and b.n_padded <= 400 or k == 1
        for row, i in enumerate(b.index[:k]):
            assert b.input_ids[row, : len(pairs[i][0])].tolist() == pairs[i][0].ids
            assert b.input_ids[k + row, : len(pairs[i][1])].tolist() == pairs[i][1].ids
        seen += b.index[:k]
    assert sorted(seen) == list(range(7))


def test_reflection_replay_and_retroact_filters():
    episode = _episode()  # trial 0 fails (R=0), reflection, trial 1 wins (R=1)
    (replay,) = reflection_replay([episode])
    assert replay.reward == 1.0 and replay.meta["has_next"]
    kept, counts = retroact_samples([episode], alpha=1.0)
    # The failed trial's actor sample (R = 0) is dropped; the winning trial and the useful reflection stay.
    assert counts == {"actor_zero": 1, "reflector_unchanged": 0}
    assert sorted((s.role, s.reward) for s in kept) == [(ACTOR, 1.0), (REFLECTOR, 1.0)]
    # A reflection followed by no change is dropped; the code-form scaling uses R_k.
    episode.trials[1].ret = 0.0
    kept, counts = retroact_samples([episode])
    assert kept == [] and counts == {"actor_zero": 2, "reflector_unchanged": 1}
    episode.trials[0].ret, episode.trials[1].ret = 0.5, 1.0
    kept, _ = retroact_samples([episode], alpha=1.0)
    assert [s.reward for s in kept if s.role == REFLECTOR] == [0.5 * 1.5]
    kept, _ = retroact_samples([episode], alpha=1.0, scaled=False)
    assert [s.reward for s in kept if s.role == REFLECTOR] == [0.5]
    # A partial score is an actor reward of its own, unless only wins count; the reflection's rating is unchanged.
    episode.trials[1].success = False
    kept, _ = retroact_samples([episode], alpha=1.0)
    assert sorted((s.role, s.reward) for s in kept) == [(ACTOR, 0.5), (ACTOR, 1.0), (REFLECTOR, 0.75)]
    kept, counts = retroact_samples([episode], alpha=1.0, actor_reward="success")
    assert [(s.role, s.reward) for s in kept] == [(REFLECTOR, 0.75)] and counts["actor_zero"] == 2
    episode.trials[1].success = True
    kept, _ = retroact_samples([episode], alpha=1.0, actor_reward="success")
    assert sorted((s.role, s.reward) for s in kept) == [(ACTOR, 1.0), (REFLECTOR, 0.75)]


def test_retroact_new_valid_steps_train_only_understood_first_actions():
    """actor_steps="new_valid": a partial-score trial of 4 steps (look: valid; open door: not understood; look
    again: a repeat; go north: valid and new) trains on steps 0 and 3 only, the others stay context with their
    behaviour log-probs zeroed; a rewarded trial with no such step is dropped and counted."""
    trial = _trial(0, [1, 2], [([10, 11], [50]), ([12], [51]), ([13, 14], [52]), ([15], [])], ret=0.5)
    for step, (action, valid) in zip(trial.steps, [("look", True), ("open door", False), ("look", True),
                                                   ("go north", True)]):
        step.action, step.valid = action, valid
    episode = Episode("ep2", "sciworld", "task-b", "train", "rollout", [trial])
    (everything,), _ = retroact_samples([episode])
    assert [t for t, m in zip(everything.ids, everything.mask) if m] == [10, 11, 12, 13, 14, 15]
    (s,), counts = retroact_samples([episode], actor_steps="new_valid")
    assert s.ids == everything.ids and s.reward == 0.5 and counts["actor_no_step"] == 0
    assert [t for t, m in zip(s.ids, s.mask) if m] == [10, 11, 15]
    assert [lp for lp, m in zip(s.logprobs, s.mask) if not m] == [0.0] * (len(s.ids) - 3)
    for step in trial.steps:
        step.valid = False
    kept, counts = retroact_samples([episode], actor_steps="new_valid")
    assert kept == [] and counts == {"actor_zero": 0, "reflector_unchanged": 0, "actor_no_step": 1}


def test_policy_lag_bound_drops_or_downweights_stale_samples():
    episode = _episode()  # actor generations at version 3, the reflection at version 2
    episode.trials[1].steps[0].generation.version = 1  # trial 1 was played across an update: 1, then 3
    samples = actor_samples(episode) + reflector_samples(episode)
    assert [s.meta.get("min_version", s.meta["version"]) for s in samples] == [3, 1, 2]
    current = {ACTOR: 4, REFLECTOR: 4}
    kept, counts = bound_policy_lag(samples, current, max_lag=2)
    # Lags 1 (trial 0), 3 (trial 1: its oldest step counts), 2 (the reflection): one sample over the bound.
    assert [s.meta["trial"] for s in kept if s.role == ACTOR] == [0] and len(kept) == 2
    assert counts == {"lag_max": 3, "stale_dropped": 1, "stale_downweighted": 0}
    kept, counts = bound_policy_lag(samples, current, max_lag=2, stale="downweight")
    assert [s.reward for s in kept] == [0.0, 1.0 / 2, samples[2].reward] and counts["stale_downweighted"] == 1
    assert samples[1].reward == 1.0  # the input is left as it was
    assert bound_policy_lag(samples, current, max_lag=3)[0] == samples
    with pytest.raises(ValueError, match="drop"):
        bound_policy_lag(samples, current, 1, stale="ignore")


def _demo_pair(task: str) -> list[Episode]:
    """A task's IL demos: the expert's memory-free win, and a failed attempt + reflection + the same win."""
    alone = _trial(0, [1, 2, 3], [([10, 11], [50])], ret=1.0)
    failed = _trial(0, [1, 2, 3], [([12], [51])], ret=0.0)
    failed.reflection = Generation(REFLECTOR, [7, 8], [20, 21], [0.0, 0.0], EXPERT_VERSION, "plan")
    after = _trial(1, [1, 2, 4], [([10, 11], [50])], ret=1.0)
    after.memory = ["plan"]
    return [Episode(f"{task}-a", "tw", task, "train", "expert", [alone]),
            Episode(f"{task}-b", "tw", task, "train", "expert", [failed, after])]


def test_il_samples_memory_only_drops_the_memory_free_copy_on_that_fraction_of_tasks():
    demos = [e for task in "abcd" for e in _demo_pair(task)]
    both = il_samples(demos)
    assert sorted((s.role, s.meta["episode_id"]) for s in both) == sorted(
        [(ACTOR, f"{t}-a") for t in "abcd"] + [(ACTOR, f"{t}-b") for t in "abcd"] + [(REFLECTOR, f"{t}-b") for t in "abcd"])
    half = il_samples(demos, memory_only=0.5, seed=3)
    dropped = {f"{t}-a" for t in "abcd"} - {s.meta["episode_id"] for s in half}
    assert len(dropped) == 2 and len(half) == len(both) - 2  # only memory-free actor copies go
    assert half == il_samples(demos, memory_only=0.5, seed=3)  # the same tasks for the same seed
    every = il_samples(demos, memory_only=1.0)
    assert {(s.role, s.meta["trial"]) for s in every} == {(ACTOR, 1), (REFLECTOR, 0)}
