import itertools
import math

import pytest
import torch

from learners.losses import (
    AdaptiveKLController,
    advantages,
    clipped_importance_weights,
    dpo_loss,
    il_loss,
    offpolicy_pg_loss,
    reflection_pg_loss,
    retroact_reflection_reward,
    sequence_logprob,
    shift_for_next_token,
    token_logprobs,
)


def test_token_logprobs_matches_log_softmax_and_is_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, labels), expected, atol=1e-6)
    out = token_logprobs(logits.bfloat16(), labels)
    assert out.dtype == torch.float32 and out.shape == labels.shape


def test_token_logprobs_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4]])
    out = token_logprobs(logits, torch.tensor([0]))
    assert torch.isfinite(out).all() and abs(float(out)) < 1e-6


def test_il_loss_closed_form():
    # position 0: p(label 1) = 3/4; position 1: p(label 0) = 1/2; position 2 masked out
    logits = torch.log(torch.tensor([[[1.0, 3.0], [1.0, 1.0], [1.0, 9.0]]]))
    labels = torch.tensor([[1, 0, 0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, n = il_loss(token_logprobs(logits, labels), mask)
    assert n == 2
    assert math.isclose(float(loss), -(math.log(0.75) + math.log(0.5)) / 2, rel_tol=1e-6)
    assert math.isclose(float(sequence_logprob(token_logprobs(logits, labels), mask)), math.log(0.375), rel_tol=1e-6)


def test_il_loss_ignores_masked_positions():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 7)
    labels = torch.randint(0, 7, (1, 4))
    mask = torch.tensor([[0, 1, 0, 1]])
    base, _ = il_loss(token_logprobs(logits, labels), mask)
    logits2, labels2 = logits.clone(), labels.clone()
    logits2[0, 0] = torch.randn(7) * 50
    logits2[0, 2, :] = float("-inf")  # even a -inf/nan log-prob at a masked position must not leak
    labels2[0, 0] = (labels[0, 0] + 1) % 7
    labels2[0, 2] = (labels[0, 2] + 3) % 7
    other, _ = il_loss(token_logprobs(logits2, labels2), mask)
    assert torch.equal(base, other)


def test_il_loss_gradient_only_on_agent_tokens():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss, _ = il_loss(token_logprobs(logits, torch.tensor([[1, 2, 3]])), torch.tensor([[0, 1, 0]]))
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    assert logits.grad[0, 1].abs().sum() > 0


def test_il_loss_empty_mask_is_zero():
    lp = torch.randn(2, 3, requires_grad=True)
    loss, n = il_loss(lp, torch.zeros(2, 3))
    assert n == 0 and float(loss.detach()) == 0.0
    loss.backward()  # still differentiable: a role with no agent tokens does not break a joint step


def test_shift_for_next_token():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1]])
    labels, lmask = shift_for_next_token(ids, mask)
    assert labels.tolist() == [[6, 7, 8]] and lmask.tolist() == [[0, 1, 1]]


# --- DPO ----------------------------------------------------------------------------------------------------------


def test_dpo_loss_policy_equals_reference_is_log2():
    lp = torch.tensor([-3.0, -7.5, -1.0], requires_grad=True)
    loss, cr, rr = dpo_loss(lp, lp * 2, lp.detach(), (lp * 2).detach(), beta=0.1)
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-6)
    assert torch.equal(cr, torch.zeros(3)) and torch.equal(rr, torch.zeros(3))


def test_dpo_loss_closed_form_and_gradient():
    chosen = torch.tensor([-4.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -1.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-5.0, -2.0]), torch.tensor([-5.0, -2.0])
    beta = 0.5
    loss, cr, rr = dpo_loss(chosen, rejected, ref_c, ref_r, beta)
    # pair 0: margin (1) - (-1) = 2 -> z = 1; pair 1: margin 0 - 1 = -1 -> z = -0.5
    z = torch.tensor([1.0, -0.5])
    assert math.isclose(float(loss.detach()), float(torch.log1p(torch.exp(-z)).mean()), rel_tol=1e-6)
    assert torch.allclose(cr, torch.tensor([0.5, 0.0])) and torch.allclose(rr, torch.tensor([-0.5, 0.5]))
    assert not cr.requires_grad and not rr.requires_grad
    loss.backward()
    g = -beta * torch.sigmoid(-z) / 2  # d loss / d chosen; d / d rejected is its negative
    assert torch.allclose(chosen.grad, g) and torch.allclose(rejected.grad, -g)


def test_dpo_loss_stable_for_huge_margins():
    big = torch.tensor([1e5])
    zero = torch.zeros(1)
    loss, _, _ = dpo_loss(big, zero, zero, zero, beta=0.1)
    assert float(loss) == 0.0
    loss, _, _ = dpo_loss(-big, zero, zero, zero, beta=0.1)
    assert math.isclose(float(loss), 1e4, rel_tol=1e-6)


def test_dpo_loss_reference_gets_no_gradient():
    ref = torch.tensor([-1.0, -2.0], requires_grad=True)
    pol = torch.tensor([-1.5, -0.5], requires_grad=True)
    loss, _, _ = dpo_loss(pol, pol, ref, ref.flip(0), beta=1.0)
    loss.backward()
    assert ref.grad is None and pol.grad is not None


# --- RetroAct off-policy policy gradient --------------------------------------------------------------------------


def test_importance_weights_clip_exactly_and_carry_no_gradient():
    behaviour = torch.zeros(1, 5)
    lp = torch.log(torch.tensor([[2.0, 0.5, 1.1, 0.9, 3.0]])).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w = clipped_importance_weights(lp, behaviour, mask, eps=0.3)
    assert torch.allclose(w, torch.tensor([[1.3, 0.7, 1.1, 0.9, 0.0]]), atol=1e-6)
    assert w[0, 0].item() == pytest.approx(1.3, abs=1e-7) and w[0, 1].item() == pytest.approx(0.7, abs=1e-7)
    assert not w.requires_grad and w.grad_fn is None


def test_importance_weights_zero_at_masked_inf_nan():
    lp = torch.tensor([[0.0, float("inf"), float("nan")]])
    behaviour = torch.tensor([[0.0, float("-inf"), 0.0]])
    w = clipped_importance_weights(lp, behaviour, torch.tensor([[1, 0, 0]]), eps=0.2)
    assert w.tolist() == [[1.0, 0.0, 0.0]]


def test_offpolicy_pg_loss_closed_form():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.1, 0.1]])).requires_grad_()
    behaviour = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.8, 0.5, 0.1]]))
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    rewards = torch.tensor([2.0, -1.0])
    loss, n = offpolicy_pg_loss(lp, behaviour, mask, rewards, eps=0.3)
    # weights on the mask: [1.0, 1.3] and [1.0, 0.7] (0.2 clipped up to 0.7)
    expected = -(2.0 * (1.0 * math.log(0.25) + 1.3 * math.log(0.9)) - (1.0 * math.log(0.8) + 0.7 * math.log(0.1))) / 4
    assert n == 4 and math.isclose(float(loss.detach()), expected, rel_tol=1e-6)
    loss.backward()
    # d loss / d log pi_t = -w_t R_b / n: the weight is a constant, not differentiated
    expected_grad = torch.tensor([[0.0, -2.0 * 1.0, -2.0 * 1.3], [1.0, 0.7, 0.0]]) / 4
    assert torch.allclose(lp.grad, expected_grad, atol=1e-6)


def test_offpolicy_pg_loss_ignores_masked_positions():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 6, requires_grad=True)
    labels = torch.randint(0, 6, (2, 4))
    behaviour = torch.randn(2, 4) - 2
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]])
    rewards = torch.tensor([1.0, 0.5])
    loss, _ = offpolicy_pg_loss(token_logprobs(logits, labels), behaviour, mask, rewards, eps=0.3)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[1, 1].abs().sum() == 0 and logits.grad[1, 3].abs().sum() == 0
    assert logits.grad[0, 1].abs().sum() > 0

    logits2 = logits.detach().clone().requires_grad_()
    behaviour2 = behaviour.clone()
    with torch.no_grad():
        logits2[0, 0] = torch.randn(6) * 50
        logits2[1, 3] = torch.randn(6) * 50
    behaviour2[0, 3], behaviour2[1, 1], behaviour2[1, 3] = float("nan"), float("-inf"), 1e4
    loss2, _ = offpolicy_pg_loss(token_logprobs(logits2, labels), behaviour2, mask, rewards, eps=0.3)
    assert torch.equal(loss.detach(), loss2.detach())
    loss2.backward()
    keep = mask.bool()
    assert torch.equal(logits.grad[keep], logits2.grad[keep])
    # -inf / nan log-probs at masked positions must not leak into the loss value either
    lp = torch.zeros(1, 3)
    lp[0, 1], lp[0, 2] = float("-inf"), float("nan")
    loss3, n = offpolicy_pg_loss(lp, torch.zeros(1, 3), torch.tensor([[1, 0, 0]]), torch.tensor([1.0]), eps=0.3)
    assert n == 1 and float(loss3) == 0.0


def test_offpolicy_pg_loss_empty_mask_is_zero_with_graph():
    lp = torch.randn(2, 3, requires_grad=True)
    loss, n = offpolicy_pg_loss(lp, lp.detach(), torch.zeros(2, 3), torch.ones(2), eps=0.3)
    assert n == 0 and float(loss.detach()) == 0.0
    loss.backward()


def _bandit_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Both arms of a two-armed bandit as a batch of two one-token sequences: [2, 1]."""
    return torch.log_softmax(logits, -1).unsqueeze(-1)


def test_offpolicy_pg_bandit_raises_rewarded_arm():
    for rewarded in (0, 1):
        logits = torch.zeros(2, requires_grad=True)
        opt = torch.optim.SGD([logits], lr=0.5)
        behaviour = _bandit_logprobs(logits).detach()
        rewards = torch.zeros(2)
        rewards[rewarded] = 1.0
        probs = [0.5]
        for _ in range(20):
            loss, _ = offpolicy_pg_loss(_bandit_logprobs(logits), behaviour, torch.ones(2, 1), rewards, eps=0.3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            probs.append(float(torch.softmax(logits.detach(), -1)[rewarded]))
        assert all(b > a for a, b in itertools.pairwise(probs)), probs
        assert probs[-1] > 0.8


# --- Retroformer reflector policy gradient ------------------------------------------------------------------------


def test_reflection_pg_loss_closed_form():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.1, 0.1]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.1], [0.4, 0.1, 0.7]]))
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, n, kl = reflection_pg_loss(lp, ref, mask, adv, kl_coef=0.3)
    pg = -(1.0 * (math.log(0.25) + math.log(0.9)) - 2.0 * (math.log(0.8) + math.log(0.1))) / 4
    rs = [math.log(0.5 / 0.25), math.log(0.1 / 0.9), math.log(0.4 / 0.8), 0.0]
    k3 = sum(math.exp(r) - r - 1 for r in rs) / 4
    assert n == 4 and math.isclose(float(loss.detach()), pg + 0.3 * k3, rel_tol=1e-6)
    k3s = [math.exp(r) - r - 1 for r in rs]
    seq_kl = [k3s[0] + k3s[1], k3s[2] + k3s[3]]  # per-sequence sums of k3 over masked tokens
    assert math.isclose(float(kl), sum(seq_kl) / 2, rel_tol=1e-6) and not kl.requires_grad


def test_reflection_kl_term_zero_at_reference_and_nonnegative():
    torch.manual_seed(3)
    lp = (torch.randn(3, 5) - 2).requires_grad_()
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    zero_adv = torch.zeros(3)
    loss, _, kl = reflection_pg_loss(lp, lp.detach(), mask, zero_adv, kl_coef=5.0)
    assert float(loss.detach()) == 0.0 and float(kl) == 0.0
    loss.backward()
    assert lp.grad.abs().max() == 0  # no pull at pi == ref
    for _ in range(5):
        other = torch.randn(3, 5) - 2
        loss, _, _ = reflection_pg_loss(lp.detach(), other, mask, zero_adv, kl_coef=1.0)
        assert float(loss) > 0


def test_reflection_pg_loss_ignores_masked_positions():
    torch.manual_seed(4)
    lp = torch.randn(2, 4, requires_grad=True)
    ref = torch.randn(2, 4)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]])
    adv = torch.tensor([0.7, -0.3])
    loss, _, kl = reflection_pg_loss(lp, ref, mask, adv, kl_coef=0.5)
    loss.backward()
    assert lp.grad[~mask.bool()].abs().max() == 0
    lp2 = lp.detach().clone()
    ref2 = ref.clone()
    lp2[0, 0], lp2[1, 1], ref2[0, 3], ref2[1, 1] = float("-inf"), float("nan"), 1e4, float("inf")
    lp2.requires_grad_()
    loss2, _, kl2 = reflection_pg_loss(lp2, ref2, mask, adv, kl_coef=0.5)
    loss2.backward()
    assert torch.equal(loss.detach(), loss2.detach()) and torch.equal(kl, kl2)
    assert torch.equal(lp.grad[mask.bool()], lp2.grad[mask.bool()])


def _reflection_bandit(kl_coef: float, steps: int = 30) -> tuple[float, float]:
    """(final p(arm 0), final |log-ratio|) after SGD on the two-armed bandit with arm 0 rated above arm 1."""
    logits = torch.zeros(2, requires_grad=True)
    ref = _bandit_logprobs(logits).detach()
    opt = torch.optim.SGD([logits], lr=0.5)
    adv = advantages(torch.tensor([1.0, 0.0]))
    for _ in range(steps):
        loss, _, _ = reflection_pg_loss(_bandit_logprobs(logits), ref, torch.ones(2, 1), adv, kl_coef)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lp = _bandit_logprobs(logits).detach()
    return float(lp[0].exp()), float((lp - ref).abs().sum())


def test_reflection_pg_bandit_kl_pulls_toward_reference():
    p_free, _ = _reflection_bandit(kl_coef=0.0)
    assert p_free > 0.9  # no penalty: the better-rated reflection takes over
    results = [_reflection_bandit(c) for c in (0.0, 0.25, 1.0, 2.0)]
    ps = [p for p, _ in results]
    drifts = [d for _, d in results]
    assert all(a > b for a, b in itertools.pairwise(ps)), ps
    assert all(a > b for a, b in itertools.pairwise(drifts)), drifts
    assert all(p > 0.5 for p in ps)  # the penalty slows, but does not reverse, the rewarded direction

    # with a zero advantage the KL term alone walks a drifted policy back to the reference
    logits = torch.tensor([2.0, -1.0], requires_grad=True)
    ref = _bandit_logprobs(torch.zeros(2))
    opt = torch.optim.SGD([logits], lr=0.1)
    gaps = [3.0]
    for _ in range(30):
        loss, _, _ = reflection_pg_loss(_bandit_logprobs(logits), ref, torch.ones(2, 1), torch.zeros(2), 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gaps.append(float((logits[0] - logits[1]).detach()))
    assert all(abs(b) < abs(a) for a, b in itertools.pairwise(gaps)) and abs(gaps[-1]) < 0.3, gaps


def test_adaptive_kl_controller():
    up = AdaptiveKLController(init_kl_coef=0.2, target=0.1, horizon=100)
    assert math.isclose(up.update(0.12, n_steps=10), 0.2 * (1 + 0.2 * 10 / 100))  # error 0.2
    assert math.isclose(up.update(5.0, n_steps=10), 0.2 * 1.02 * 1.02)  # error clipped to +0.2
    down = AdaptiveKLController(init_kl_coef=0.2, target=0.1, horizon=100)
    assert math.isclose(down.update(0.09, n_steps=10), 0.2 * (1 - 0.1 * 10 / 100))
    assert math.isclose(down.update(0.0, n_steps=10), 0.2 * 0.99 * 0.98)  # error clipped to -0.2
    fixed = AdaptiveKLController(init_kl_coef=0.3, target=None, horizon=100)
    assert fixed.update(100.0, n_steps=1000) == 0.3 and fixed.value == 0.3

    state = up.state_dict()
    assert all(v is None or isinstance(v, float) for v in state.values())
    restored = AdaptiveKLController(init_kl_coef=0.2, target=0.1, horizon=100)
    restored.load_state_dict(state)
    assert restored.value == up.value
    assert restored.update(0.2, 10) == up.update(0.2, 10)


# --- baselines and rewards ----------------------------------------------------------------------------------------


def test_advantages_batch_mean():
    a = advantages(torch.tensor([1.0, 0.0, 0.0, 3.0]))
    assert torch.allclose(a, torch.tensor([0.0, -1.0, -1.0, 2.0]))
    assert advantages(torch.tensor([0.7])).tolist() == [0.0]
    assert advantages(torch.zeros(0)).numel() == 0


def test_advantages_group_baseline_and_singleton_fallback():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    groups = ["a", "a", "b", "b", "c", "a"]
    a = advantages(rewards, groups)
    # a: mean 2/3; b: mean 1 (an easy task: zero advantage); c alone -> batch mean 4/6
    expected = torch.tensor([1 / 3, -2 / 3, 0.0, 0.0, -2 / 3, 1 / 3])
    assert torch.allclose(a, expected, atol=1e-6)
    with pytest.raises(ValueError):
        advantages(rewards, groups[:-1])


def test_retroact_reflection_reward():
    assert retroact_reflection_reward(1.0, 0.0) == 1.0  # 0/1 returns after a failed trial: the plain rating
    assert retroact_reflection_reward(-1.0, 0.0) == -1.0
    assert retroact_reflection_reward(0.5, 0.25, alpha=1.0) == pytest.approx(0.625)
    assert retroact_reflection_reward(0.5, 0.25, alpha=0.5) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        retroact_reflection_reward(1.0, 0.0, alpha=0.0)
