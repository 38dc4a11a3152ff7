"""SFT loss and log-prob gather against hand-computed numbers; gradient-accumulation invariance."""

import math

import pytest
import torch

from rlhf_cli.losses import IGNORE_INDEX, count_targets, sft_loss_sum, token_logprobs

# Two-token vocabulary, one sequence of 3 positions. Logits at t predict token t+1.
LOGITS = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
LP_T0 = math.log(0.5)  # position 0 predicts token 1 from [0, 0]
LP_T1 = 1.0 - math.log(math.e + 1.0)  # position 1 predicts token 0 from [1, 0]


def test_sft_loss_sum_hand_computed():
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    loss, n = sft_loss_sum(LOGITS, labels)
    assert n == 2
    assert loss.item() == pytest.approx(-(LP_T0 + LP_T1), abs=1e-6)


def test_sft_loss_ignores_masked_targets_and_first_label():
    # The first label is never a target (nothing predicts it), whatever its value.
    labels = torch.tensor([[1, 1, IGNORE_INDEX]])
    loss, n = sft_loss_sum(LOGITS, labels)
    assert n == 1 and count_targets(labels) == 1
    assert loss.item() == pytest.approx(-LP_T0, abs=1e-6)


def test_token_logprobs_shift_fp32_and_zero_on_ignored():
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    lp = token_logprobs(LOGITS.to(torch.bfloat16), labels)
    assert lp.dtype == torch.float32 and lp.shape == (1, 2)
    assert lp[0, 0].item() == pytest.approx(LP_T0, abs=1e-6)
    assert lp[0, 1].item() == 0.0


def test_token_logprobs_temperature_divides_logits():
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    lp = token_logprobs(LOGITS, labels, temperature=2.0)
    assert lp[0, 1].item() == pytest.approx(0.5 - math.log(math.exp(0.5) + 1.0), abs=1e-6)


def test_token_logprobs_match_sft_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX
    loss, _ = sft_loss_sum(logits, labels)
    assert (-token_logprobs(logits, labels).sum()).item() == pytest.approx(loss.item(), rel=1e-6)


def _grads_of(model, batches, normaliser):
    model.zero_grad()
    for ids, labels in batches:
        loss, _ = sft_loss_sum(model(ids), labels)
        (loss / normaliser).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_invariance_unequal_lengths():
    """One batch of 8 and four micro-batches of 2 give the same gradient when every micro-batch divides
    by the token count of the whole step; a mean of per-micro-batch means does not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(13, 8), torch.nn.Linear(8, 13))
    ids = torch.randint(0, 13, (8, 9))
    labels = ids.clone()
    for i, keep in enumerate([9, 2, 5, 9, 3, 7, 4, 6]):  # unequal target lengths
        labels[i, keep:] = IGNORE_INDEX
        labels[i, :1] = IGNORE_INDEX
    n_total = count_targets(labels)
    full = _grads_of(model, [(ids, labels)], n_total)
    micro = [(ids[i : i + 2], labels[i : i + 2]) for i in range(0, 8, 2)]
    accum = _grads_of(model, micro, n_total)
    for a, b in zip(full, accum, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # The 2024 bug: averaging micro-batch means over the accumulation steps.
    model.zero_grad()
    for mids, mlabels in micro:
        loss, n = sft_loss_sum(model(mids), mlabels)
        (loss / n / len(micro)).backward()
    assert not torch.allclose(full[-1], model[-1].bias.grad, rtol=1e-3)
