"""Tests for tether.algo.dpo: hand-computed values, identities, a naive per-pair loop, micro-batch invariance."""

import math

import pytest
import torch

from tether.algo import dpo_loss


def logps(batch=8, seed=0):
    """Four (B,) float64 tensors of sequence log-probs: policy chosen/rejected, reference chosen/rejected."""
    g = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(batch, generator=g, dtype=torch.float64) for _ in range(4)]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- (a) by hand


def test_one_pair_by_hand():
    # beta = 0.5: chosen reward 0.5 * (-1 - -2) = +0.5, rejected reward 0.5 * (-3 - -2) = -0.5, margin z = 1
    # loss = -log sigmoid(1) = log(1 + e^-1) = 0.31326
    # d loss / d logp_chosen = -beta * sigmoid(-z) = -0.5 * 0.26894; d / d logp_rejected = +0.5 * 0.26894
    pc = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0], dtype=torch.float64)
    loss, stats = dpo_loss(pc, pr, ref, ref, beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert stats["chosen_reward"].item() == pytest.approx(0.5)
    assert stats["rejected_reward"].item() == pytest.approx(-0.5)
    assert stats["margin"].item() == pytest.approx(1.0)
    assert stats["accuracy"].item() == 1.0
    loss.backward()
    sig = 1 / (1 + math.e)  # sigmoid(-1)
    assert pc.grad.item() == pytest.approx(-0.5 * sig)
    assert pr.grad.item() == pytest.approx(0.5 * sig)


def test_two_pairs_with_label_smoothing_by_hand():
    # beta = 1: margins z = (0 - 0) - (-1 - 0) = 1 and (-2 - 0) - (0 - 0) = -2
    # eps = 0.1: per pair 0.9 * softplus(-z) + 0.1 * softplus(z); accuracy 1/2; margin mean -0.5
    pc = torch.tensor([0.0, -2.0], dtype=torch.float64)
    pr = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    loss, stats = dpo_loss(pc, pr, zeros, zeros, beta=1.0, label_smoothing=0.1)
    expected = [0.9 * softplus(-z) + 0.1 * softplus(z) for z in (1.0, -2.0)]
    assert loss.item() == pytest.approx(sum(expected) / 2)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == pytest.approx(-0.5)
    assert stats["chosen_reward"].item() == pytest.approx(-1.0)
    assert stats["rejected_reward"].item() == pytest.approx(-0.5)


# ---------------------------------------------------------------- (b) identities


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(label_smoothing):
    pc, pr, _, _ = logps(seed=1)
    loss, stats = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3, label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(math.log(2))
    for key in ("chosen_reward", "rejected_reward", "margin", "accuracy"):
        assert stats[key].item() == 0.0


def test_swapping_chosen_and_rejected():
    # -log sigmoid(-z) = -log sigmoid(z) + z, so the swapped loss is the loss plus the mean margin
    pc, pr, rc, rr = logps(seed=2)
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    swapped, swapped_stats = dpo_loss(pr, pc, rr, rc, beta=0.1)
    assert swapped.item() == pytest.approx(loss.item() + stats["margin"].item())
    assert swapped_stats["margin"].item() == pytest.approx(-stats["margin"].item())
    assert swapped_stats["accuracy"].item() == pytest.approx(1 - stats["accuracy"].item())  # no ties here
    assert swapped_stats["chosen_reward"].item() == pytest.approx(stats["rejected_reward"].item())


def test_only_log_ratios_matter_and_beta_scales_them():
    pc, pr, rc, rr = logps(seed=3)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.25)
    shift = torch.linspace(-5, 5, len(pc), dtype=torch.float64)  # the same shift of policy and reference per side
    shifted, _ = dpo_loss(pc + shift, pr - shift, rc + shift, rr - shift, beta=0.25)
    scaled, _ = dpo_loss(0.25 * pc, 0.25 * pr, 0.25 * rc, 0.25 * rr, beta=1.0)
    assert shifted.item() == pytest.approx(loss.item())
    assert scaled.item() == pytest.approx(loss.item())


def test_no_gradient_reaches_the_reference():
    pc, pr, rc, rr = (x.requires_grad_(True) for x in logps(seed=4))
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad.lt(0).all() and pr.grad.gt(0).all()  # chosen pushed up, rejected down, every pair


# ---------------------------------------------------------------- (c) naive loop


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_matches_a_per_pair_loop(label_smoothing):
    pc, pr, rc, rr = logps(batch=16, seed=5)
    beta = 0.7
    losses, wins = [], 0
    for i in range(len(pc)):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        losses.append((1 - label_smoothing) * softplus(-z) + label_smoothing * softplus(z))
        wins += z > 0
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(sum(losses) / len(losses))
    assert stats["accuracy"].item() == pytest.approx(wins / len(pc))


# ---------------------------------------------------------------- (d) micro-batch invariance


def test_micro_batch_gradients_sum_to_the_whole_batch():
    # the loss is a mean over pairs: micro-batch losses weighted by their share of the batch add up to it
    pc, pr, rc, rr = logps(batch=10, seed=6)
    whole_c, whole_r = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    whole, _ = dpo_loss(whole_c, whole_r, rc, rr, beta=0.2, label_smoothing=0.1)
    whole.backward()
    micro_c, micro_r = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for index in (slice(0, 3), slice(3, 4), slice(4, 10)):
        part, _ = dpo_loss(micro_c[index], micro_r[index], rc[index], rr[index], beta=0.2, label_smoothing=0.1)
        scaled = part * len(pc[index]) / len(pc)
        scaled.backward()
        total += scaled.detach()
    assert total.item() == pytest.approx(whole.item())
    torch.testing.assert_close(micro_c.grad, whole_c.grad)
    torch.testing.assert_close(micro_r.grad, whole_r.grad)
