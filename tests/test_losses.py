import math

import torch

from learners.losses import il_loss, sequence_logprob, shift_for_next_token, token_logprobs


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
