"""The methods' updates on a real MethodLearner (PEFT + DeepSpeed, CPU) with the tiny Llama: each moves the policy
the way its objective says, touches only the roles it trains, and checkpoints its extra state."""

from __future__ import annotations

import random

import pytest
import torch

from agents.model import TINY_MODEL, resolve_model
from agents.trajectory import ACTOR, REFLECTOR
from learners.batching import TokenSample
from learners.methods import MethodLearner


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return str(resolve_model(TINY_MODEL))


KL = {"kl_coef": 0.2, "target_kl": 0.1, "kl_horizon": 10000}  # the KL penalty's settings (retroformer section)


def make(tiny_path: str, tmp_path, **kw) -> MethodLearner:
    kw = {"dtype": "float32", "lr": 1e-2, "gradient_clipping": 1.0, "max_len": 4096, "seed": 0,
          "output_dir": tmp_path / "learner", "lora_dropout": 0.0, **KL, **kw}
    return MethodLearner(tiny_path, **kw)


def sample(role: str, prompt: list[int], completion: list[int], **kw) -> TokenSample:
    return TokenSample(prompt + completion, [0] * len(prompt) + [1] * len(completion), role, **kw)


def seqlp(learner: MethodLearner, samples: list[TokenSample]) -> list[float]:
    return learner.sequence_logprobs(samples)


def test_dpo_raises_chosen_over_rejected_against_the_start(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path)
    rng = random.Random(0)
    pairs = []
    for i in range(4):
        prompt = [rng.randint(100, 4000) for _ in range(10 + i)]
        chosen = [rng.randint(100, 4000) for _ in range(6)]
        rejected = [rng.randint(100, 4000) for _ in range(7)]
        pairs.append((sample(ACTOR, prompt, chosen), sample(ACTOR, prompt, rejected)))
    flat = [s for p in pairs for s in p]
    before = seqlp(learner, flat)
    reflector = learner.adapter_tensors(REFLECTOR)
    m = learner.train_dpo(pairs, beta=0.5, epochs=3, lr=5e-3, max_tokens_per_batch=64)
    after = seqlp(learner, flat)
    margin = lambda lp: [lp[2 * i] - lp[2 * i + 1] for i in range(len(pairs))]  # noqa: E731
    assert all(a > b for a, b in zip(margin(after), margin(before)))
    assert m["pairs"] == 4 and m["steps"] > 3 and m["reward_accuracy/actor"] > 0.5
    # The first step's reference is the policy itself: loss log 2 before anything moved.
    assert m["loss_first/actor"] < 0.6931 + 1e-3
    assert all(torch.equal(reflector[k], v) for k, v in learner.adapter_tensors(REFLECTOR).items())


def test_dpo_nll_term_keeps_the_chosen_trajectories_likely(tiny_path, tmp_path):
    """RPO (eto.nll_coef): the same pairs, steps and seed with and without the chosen trajectories' NLL; with it
    the chosen ones end up likelier than pure DPO leaves them, and the step reports that NLL."""
    rng = random.Random(1)
    pairs = []
    for i in range(4):
        prompt = [rng.randint(100, 4000) for _ in range(10 + i)]
        pairs.append((sample(ACTOR, prompt, [rng.randint(100, 4000) for _ in range(6)]),
                      sample(ACTOR, prompt, [rng.randint(100, 4000) for _ in range(7)])))
    chosen = [c for c, _ in pairs]
    after, metrics = [], []
    for coef, folder in ((0.0, tmp_path / "dpo"), (1.0, tmp_path / "rpo")):
        learner = make(tiny_path, folder)
        metrics.append(learner.train_dpo(pairs, beta=0.5, epochs=3, lr=5e-3, max_tokens_per_batch=64,
                                         nll_coef=coef))
        after.append(seqlp(learner, chosen))
    assert sum(after[1]) > sum(after[0])
    assert "nll_chosen/actor" not in metrics[0] and metrics[1]["nll_chosen/actor"] > 0
    # The per-side implicit rewards show it while training: the anchor keeps the winners' log-ratio higher.
    assert metrics[1]["reward_chosen/actor"] > metrics[0]["reward_chosen/actor"]
    for m in metrics:
        assert m["reward_chosen/actor"] - m["reward_rejected/actor"] == pytest.approx(m["reward_margin/actor"],
                                                                                     abs=1e-5)
    assert (metrics[0]["nll_coef"], metrics[1]["nll_coef"]) == (0.0, 1.0)


def test_retroact_raises_rewarded_actions_and_keeps_il_term(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path)
    prompt = list(range(200, 212))
    good, bad = [301, 302, 303, 304], [401, 402, 403, 404]
    probe = [sample(ACTOR, prompt, good), sample(ACTOR, prompt, bad)]
    base_lp = learner.token_logprobs(probe)
    rl = [sample(ACTOR, prompt, good, logprobs=base_lp[0].tolist(), reward=1.0)]
    il = [sample(ACTOR, [7, 8, 9, 10], [501, 502, 503])]
    before = seqlp(learner, probe + il)
    reflector = learner.adapter_tensors(REFLECTOR)
    m = learner.train_retroact(rl, il, epochs=4, lr=5e-3, eps=0.3, il_coef=1.0, max_tokens_per_batch=4096)
    after = seqlp(learner, probe + il)
    assert after[0] > before[0]  # the rewarded completion became likelier
    assert after[2] > before[2]  # and the IL regulariser trained its own data
    assert m["steps"] == 4 and "loss/rl/actor" in m and "loss/il/actor" in m
    # The weight clips at 1 + eps once the policy has moved past it from the behaviour policy.
    assert m["clip_frac/rl/actor"] > 0.0
    # No reflector sample: the reflector adapter never moved.
    assert all(torch.equal(reflector[k], v) for k, v in learner.adapter_tensors(REFLECTOR).items())


def test_retroact_weights_each_sample_by_its_reward(tiny_path, tmp_path):
    """Rewards of 1, -1 and 0 on three prompts: the first step's loss is ALGORITHMS.md's
    -sum_t w_t R log pi(t) / n (w = 1 while the policy is the behaviour policy), the rewarded completion becomes
    likelier, the negatively rewarded one less likely, where plain IL on the same samples raises both."""
    rng = random.Random(3)
    prompts = [[rng.randint(100, 4000) for _ in range(10 + i)] for i in range(3)]
    completions = [[rng.randint(100, 4000) for _ in range(5)] for _ in range(3)]
    probe = [sample(ACTOR, p, c) for p, c in zip(prompts, completions)]
    rewards = [1.0, -1.0, 0.0]

    def rl_samples(learner):
        behaviour = learner.token_logprobs(probe)  # on-policy: every importance weight starts at exactly 1
        return [sample(ACTOR, p, c, logprobs=lp.tolist(), reward=r)
                for p, c, lp, r in zip(prompts, completions, behaviour, rewards)]

    learner = make(tiny_path, tmp_path / "rl")
    rl = rl_samples(learner)
    before = seqlp(learner, probe)
    n = sum(s.n_trained for s in rl)
    expected = -sum(r * lp for r, lp in zip(rewards, before)) / n
    m = learner.train_retroact(rl, [], epochs=3, lr=5e-3, eps=0.3, il_coef=1.0, max_tokens_per_batch=4096)
    assert m["steps"] == 3 and m["loss_first/rl/actor"] == pytest.approx(expected, rel=1e-4)
    after = seqlp(learner, probe)
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1

    control = make(tiny_path, tmp_path / "il")  # the same updates with the rewards dropped: plain IL
    control.train_il(probe, epochs=3, lr=5e-3, max_tokens_per_batch=4096)
    il_after = seqlp(control, probe)
    assert il_after[0] > before[0] and il_after[1] > before[1]


def test_retroact_zero_reward_gives_no_gradient_and_il_term_is_plain_il(tiny_path, tmp_path):
    """A reward-0 sample contributes nothing: alone it leaves the adapter bit-identical (Adam's first step with a
    zero gradient moves nothing), and beside an IL batch the update is exactly train_il's on that batch."""
    prompt, completion = list(range(200, 212)), [301, 302, 303, 304]
    probe = [sample(ACTOR, prompt, completion)]
    il = [sample(ACTOR, [7, 8, 9, 10], [501, 502, 503])]

    learner = make(tiny_path, tmp_path / "zero")
    start = learner.adapter_tensors(ACTOR)
    zero = [sample(ACTOR, prompt, completion, logprobs=learner.token_logprobs(probe)[0].tolist(), reward=0.0)]
    learner.train_retroact(zero, [], epochs=2, lr=5e-3, eps=0.3, il_coef=1.0, max_tokens_per_batch=4096)
    assert all(torch.equal(start[k], v) for k, v in learner.adapter_tensors(ACTOR).items())

    learner = make(tiny_path, tmp_path / "zero+il")  # a fresh optimizer: Adam's step count moved above
    learner.train_retroact(zero, il, epochs=2, lr=5e-3, eps=0.3, il_coef=1.0, max_tokens_per_batch=4096)
    control = make(tiny_path, tmp_path / "il")
    control.train_il(il, epochs=2, lr=5e-3, max_tokens_per_batch=4096)
    theirs = control.adapter_tensors(ACTOR)
    moved = learner.adapter_tensors(ACTOR)
    assert not all(torch.equal(start[k], v) for k, v in moved.items())
    assert all(torch.allclose(theirs[k], v, atol=1e-6) for k, v in moved.items())


def test_retroact_requires_behaviour_logprobs(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path)
    with pytest.raises(ValueError, match="behaviour log-probs"):
        learner.train_retroact([sample(ACTOR, [5, 6, 7], [8, 9], reward=1.0)], [], epochs=1, eps=0.3, il_coef=1.0,
                               max_tokens_per_batch=4096)


def test_reflector_pg_follows_ratings_with_kl_and_checkpoints_it(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path, target_kl=1e-4, kl_horizon=10)
    prompt = list(range(300, 316))
    helped = sample(REFLECTOR, prompt, [601, 602, 603, 604, 605], reward=1.0, meta={"task_id": "t"})
    hurt = sample(REFLECTOR, prompt, [701, 702, 703, 704, 705], reward=-1.0, meta={"task_id": "t"})
    learner.set_reference([REFLECTOR])
    actor = learner.adapter_tensors(ACTOR)
    before = seqlp(learner, [helped, hurt])
    m = learner.train_reflector_pg([helped, hurt], epochs=4, lr=5e-3, baseline="batch", max_tokens_per_batch=4096)
    after = seqlp(learner, [helped, hurt])
    assert after[0] > before[0] and after[1] < before[1]
    # Step 1 starts at the reference (KL 0, coefficient down 4 %), later steps sit above the target (up 4 % each).
    assert m["kl/reflector"] > 0 and m["kl_coef_end"] > 0.2
    assert all(torch.equal(actor[k], v) for k, v in learner.adapter_tensors(ACTOR).items())
    # The reference still scores as the policy did before training.
    ref = learner.token_logprobs([helped], reference=True)[0].sum()
    assert float(ref) == pytest.approx(before[0], abs=1e-4)

    path = learner.save_checkpoint(tmp_path / "ck")
    fresh = make(tiny_path, tmp_path / "fresh")
    fresh.load_checkpoint(path)
    assert fresh.kl.value == pytest.approx(learner.kl.value)
    assert float(fresh.token_logprobs([helped], reference=True)[0].sum()) == pytest.approx(float(ref), abs=1e-5)
    assert seqlp(fresh, [helped]) == pytest.approx(seqlp(learner, [helped]), abs=1e-5)


def test_reflector_pg_refuses_actor_samples(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path)
    with pytest.raises(ValueError, match="reflector only"):
        learner.train_reflector_pg([sample(ACTOR, [5, 6, 7], [8, 9], reward=1.0)], epochs=1, baseline="batch",
                                   max_tokens_per_batch=4096)


def test_reward_model_ranks_helpful_reflections_and_checkpoints(tiny_path, tmp_path):
    learner = make(tiny_path, tmp_path)
    rng = random.Random(1)
    helpful = [601, 602, 603, 604]  # reflections that preceded an improved trial share these tokens
    unhelpful = [701, 702, 703, 704]

    def reflection(good: bool) -> TokenSample:
        prompt = [rng.randint(100, 4000) for _ in range(rng.randint(8, 14))]
        body = (helpful if good else unhelpful) + [rng.randint(100, 4000) for _ in range(3)]
        return sample(REFLECTOR, prompt, body, reward=1.0 if good else 0.0)

    with pytest.raises(RuntimeError, match="train_reward_model"):
        learner.score_reflections([reflection(True)])
    assert learner.train_reward_model([reflection(False) for _ in range(4)])["trained"] == 0  # one class only
    train = [reflection(i % 3 == 0) for i in range(12)]
    m = learner.train_reward_model(train)
    assert m["trained"] == 1 and m["positives"] == 4 and m["train_accuracy"] == 1.0
    held_out = [reflection(True), reflection(False), reflection(True), reflection(False)]
    scores = learner.score_reflections(held_out)
    assert min(scores[0], scores[2]) > max(scores[1], scores[3])
    # A checkpoint carries the reward model: a restored learner ranks the same way.
    fresh = make(tiny_path, tmp_path / "fresh")
    fresh.load_checkpoint(learner.save_checkpoint(tmp_path / "ck"))
    assert fresh.score_reflections(held_out) == pytest.approx(scores, abs=1e-6)


def test_dpo_reports_its_reference_scoring_before_its_first_step(tiny_path, tmp_path, monkeypatch):
    """What the driver's live line reads while DPO scores its pairs under the reference: every sample of every pair
    counted, all of them before the first optimizer step."""
    learner = make(tiny_path, tmp_path)
    rng = random.Random(1)
    pairs = [(sample(ACTOR, p, [rng.randint(100, 4000) for _ in range(5)]),
              sample(ACTOR, p, [rng.randint(100, 4000) for _ in range(6)]))
             for p in ([rng.randint(100, 4000) for _ in range(8 + i)] for i in range(3))]
    at_first_step = []
    step = learner.optimizer_step

    def watched(parts):
        at_first_step.append(learner.progress())
        return step(parts)

    monkeypatch.setattr(learner, "optimizer_step", watched)
    learner.train_dpo(pairs, beta=0.5, epochs=1, lr=1e-3, max_tokens_per_batch=64)
    first = at_first_step[0]
    assert (first["scored"], first["to_score"], first["step"], first["method"]) == (6, 6, 0, "dpo")


def test_one_roles_adapter_comes_from_another_checkpoint(tiny_path, tmp_path):
    """`retrorl eval --reflector-checkpoint`: the learner serves checkpoint A's actor with checkpoint B's reflector,
    each under its own checkpoint's version, bit for bit; with one shared adapter a role cannot be swapped alone."""
    from agents.adapters import read_folder

    rng = random.Random(0)
    data = [sample(role, [rng.randint(100, 4000) for _ in range(12)], [rng.randint(100, 4000) for _ in range(6)])
            for role in (ACTOR, REFLECTOR) for _ in range(2)]
    a, b = make(tiny_path, tmp_path / "a"), make(tiny_path, tmp_path / "b", seed=1)
    a.train_il(data, epochs=1, max_tokens_per_batch=64)
    a.publish()
    for _ in range(2):  # B's reflector: other weights, at version 2
        b.train_il(data, epochs=1, max_tokens_per_batch=64)
        b.publish()
    ckpt_a, ckpt_b = a.save_checkpoint(tmp_path / "ck_a"), b.save_checkpoint(tmp_path / "ck_b")
    both = make(tiny_path, tmp_path / "both")
    both.load_checkpoint_files(read_folder(ckpt_a))
    both.load_role_files(REFLECTOR, read_folder(ckpt_b))
    served = {u.role: u for u in both.publish(force=True)}
    assert {r: u.version for r, u in served.items()} == {ACTOR: 1, REFLECTOR: 2}
    for role, source in ((ACTOR, a), (REFLECTOR, b)):
        want = source.adapter_tensors(role)
        assert want.keys() == served[role].tensors.keys()
        assert all(torch.equal(want[k], served[role].tensors[k]) for k in want), role
    assert not all(torch.equal(v, served[REFLECTOR].tensors[k]) for k, v in a.adapter_tensors(REFLECTOR).items())

    shared = make(tiny_path, tmp_path / "shared", shared_adapter=True)
    with pytest.raises(ValueError, match="cannot be swapped alone"):
        shared.load_role_files(REFLECTOR, read_folder(ckpt_b))
