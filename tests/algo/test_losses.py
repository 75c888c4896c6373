"""Tests for tether.algo.losses: PPO-clip policy loss, clipped value loss, Bradley-Terry loss."""

import math

import pytest
import torch

from tether.algo import pairwise_reward_loss, ppo_policy_loss, ppo_value_loss

E = math.e


def ragged(batch=8, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(batch, length, generator=g, dtype=torch.float64) for _ in range(3))
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return a, b, c, mask


# ---------------------------------------------------------------- policy loss


def test_policy_loss_by_hand_four_cases():
    # eps = 0.2, per token (ratio, A) -> max(-A*ratio, -A*clip(ratio, 0.8, 1.2)):
    #   (e,    +1): max(-2.718, -1.2)  = -1.2     clip binds (gradient 0)
    #   (e,    -1): max(+2.718, +1.2)  = +2.718   no clip (pessimistic branch, gradient -A*ratio = e)
    #   (1/e,  +1): max(-0.368, -0.8)  = -0.368   no clip (gradient -A*ratio = -1/e)
    #   (1/e,  -1): max(+0.368, +0.8)  = +0.8     clip binds (gradient 0)
    # loss = (-1.2 + e - 1/e + 0.8) / 4 ; clipfrac = 2/4
    new = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, stats = ppo_policy_loss(new, old, adv, torch.ones(1, 4), 0.2)
    assert loss.item() == pytest.approx((-1.2 + E - 1 / E + 0.8) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # d/d new of -A*exp(new - old) = -A*ratio, divided by 4 tokens
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, E / 4, -1 / E / 4, 0.0]], dtype=torch.float64))
    # approx_kl (k3 of old -> new): (ratio - 1) - log ratio = e - 2 for the first two, 1/e for the last two
    assert stats["approx_kl"].item() == pytest.approx((2 * (E - 2) + 2 / E) / 4)
    assert stats["ratio_mean"].item() == pytest.approx((2 * E + 2 / E) / 4)
    assert stats["ratio_max"].item() == pytest.approx(E)
    assert stats["ratio_min"].item() == pytest.approx(1 / E)


def test_policy_loss_single_clipped_token_is_minus_1_2():
    # ratio = e, A = 1, eps = 0.2 -> -A * clip(e, 0.8, 1.2) = -1.2
    loss, stats = ppo_policy_loss(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clipfrac"].item() == 1.0


def test_first_step_ratio_one():
    new, _, adv, mask = ragged(seed=1)
    loss, stats = ppo_policy_loss(new, new.clone(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(-adv[mask].mean().item())
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == stats["ratio_max"].item() == stats["ratio_min"].item() == 1.0


def test_policy_default_denominator_is_masked_mean():
    new, old, adv, mask = ragged(seed=2)
    ratio = torch.exp(new - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    loss, _ = ppo_policy_loss(new, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(per_token[mask].mean().item())
    loss_d, _ = ppo_policy_loss(new, old, adv, mask, 0.2, loss_denominator=100.0)
    assert loss_d.item() == pytest.approx(per_token[mask].sum().item() / 100.0)


def micro_batch_check(loss_fn, first, *rest, mask):
    """Full batch in one call vs 4 micro-batches of 2 rows with the full batch's token count as denominator."""
    full_leaf = first.clone().requires_grad_(True)
    full_loss, full_stats = loss_fn(full_leaf, *rest, mask)
    full_loss.backward()
    micro_leaf = first.clone().requires_grad_(True)
    total_tokens = mask.sum()
    summed = torch.zeros((), dtype=first.dtype)
    for rows in torch.arange(first.shape[0]).split(2):
        loss, _ = loss_fn(micro_leaf[rows], *(x[rows] for x in rest), mask[rows], loss_denominator=total_tokens)
        loss.backward()
        summed = summed + loss.detach()
    torch.testing.assert_close(summed, full_loss.detach())
    torch.testing.assert_close(micro_leaf.grad, full_leaf.grad)
    assert full_leaf.grad.abs().sum() > 0
    return full_stats


def test_policy_micro_batch_invariance():
    new, old, adv, mask = ragged(seed=3)
    new = old + 0.3 * new  # ratios around 1, some clipped
    stats = micro_batch_check(
        lambda n, o, a, m, **kw: ppo_policy_loss(n, o, a, m, 0.2, **kw), new, old, adv, mask=mask
    )
    assert 0 < stats["clipfrac"].item() < 1


def test_value_micro_batch_invariance():
    new, old, ret, mask = ragged(seed=4)
    new = old + 0.3 * new
    stats = micro_batch_check(lambda n, o, r, m, **kw: ppo_value_loss(n, o, r, m, 0.2, **kw), new, old, ret, mask=mask)
    assert 0 < stats["value_clipfrac"].item() < 1


def test_policy_padding_never_leaks():
    new, old, adv, mask = ragged(seed=5)
    clean_new = new.clone().requires_grad_(True)
    clean_loss, clean_stats = ppo_policy_loss(clean_new, old, adv, mask, 0.2)
    clean_loss.backward()
    dirty_new, dirty_old, dirty_adv = new.clone(), old.clone(), adv.clone()
    dirty_new[~mask], dirty_old[~mask], dirty_adv[~mask] = 500.0, -500.0, float("nan")  # ratio e^1000 = inf
    dirty_new.requires_grad_(True)
    dirty_loss, dirty_stats = ppo_policy_loss(dirty_new, dirty_old, dirty_adv, mask, 0.2)
    dirty_loss.backward()
    torch.testing.assert_close(dirty_loss, clean_loss)
    torch.testing.assert_close(dirty_new.grad, clean_new.grad)
    assert torch.all(dirty_new.grad[~mask] == 0)
    for key in clean_stats:
        torch.testing.assert_close(dirty_stats[key], clean_stats[key])


def test_ratio_extremes_use_valid_tokens_only():
    # valid log-ratios -0.5 and -1 -> ratio_max = e^-0.5, ratio_min = e^-1 (padding must not contribute a 1)
    new = torch.tensor([[-0.5, -1.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    _, stats = ppo_policy_loss(new, torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3), mask, 0.2)
    assert stats["ratio_max"].item() == pytest.approx(math.exp(-0.5))
    assert stats["ratio_min"].item() == pytest.approx(math.exp(-1.0))
    _, stats = ppo_policy_loss(-new, torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3), mask, 0.2)
    assert stats["ratio_min"].item() == pytest.approx(math.exp(0.5))


def test_policy_stats_are_detached_scalars_and_inputs_not_mutated():
    new, old, adv, mask = ragged(seed=6)
    copies = [t.clone() for t in (new, old, adv, mask)]
    leaf = new.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(leaf, old, adv, mask, 0.2)
    assert set(stats) == {"clipfrac", "approx_kl", "ratio_mean", "ratio_max", "ratio_min"}
    assert loss.dim() == 0 and loss.requires_grad
    for value in stats.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    for before, after in zip(copies, (new, old, adv, mask)):
        assert torch.equal(before, after)


def test_policy_empty_micro_batch_is_zero_not_nan():
    new, old, adv, mask = ragged(seed=7)
    empty = torch.zeros_like(mask)
    leaf = new.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(leaf, old, adv, empty, 0.2, loss_denominator=10)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(leaf.grad == 0)
    assert torch.isnan(stats["ratio_max"]) and torch.isnan(stats["clipfrac"])
    loss_default, _ = ppo_policy_loss(new, old, adv, empty, 0.2)
    assert loss_default.item() == 0.0
    with pytest.raises(ValueError):
        ppo_policy_loss(new, old, adv, mask, 0.2, loss_denominator=0)


# ---------------------------------------------------------------- value loss


def test_value_loss_by_hand_both_branches():
    # eps_v = 0.2
    # token 0: old 1, new 1.1, R 2: V_clip = 1.1 ; (1.1-2)^2 = 0.81 both -> 0.5*0.81 = 0.405, not clipped
    # token 1: old 1, new 3.0, R 2: V_clip = 1.2 ; (3-2)^2 = 1 vs (1.2-2)^2 = 0.64 -> unclipped wins, 0.5
    # token 2: old 0, new 1.0, R 1: V_clip = 0.2 ; (1-1)^2 = 0 vs (0.2-1)^2 = 0.64 -> clipped wins, 0.32
    # loss = (0.405 + 0.5 + 0.32) / 3 ; value_clipfrac = 1/3 ; value_error = (0.81 + 1 + 0) / 3
    new = torch.tensor([[1.1, 3.0, 1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 2.0, 1.0]], dtype=torch.float64)
    loss, stats = ppo_value_loss(new, old, ret, torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx((0.405 + 0.5 + 0.32) / 3)
    assert stats["value_clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["value_error"].item() == pytest.approx((0.81 + 1.0 + 0.0) / 3)
    assert stats["value_mean"].item() == pytest.approx(5.1 / 3)
    loss.backward()
    # d/dnew 0.5*(new-R)^2 / 3 = (new - R)/3 on the unclipped branch ; 0 where the flat clipped branch wins
    torch.testing.assert_close(new.grad, torch.tensor([[-0.9 / 3, 1.0 / 3, 0.0]], dtype=torch.float64))


def test_value_loss_equals_mse_inside_clip_range_and_without_clipping():
    new, old, ret, mask = ragged(seed=8)
    near = old + 0.1 * torch.tanh(new)  # |new - old| <= 0.1 < eps_v
    mse = 0.5 * ((near - ret) ** 2)[mask].mean().item()
    loss, stats = ppo_value_loss(near, old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(mse) and stats["value_clipfrac"].item() == 0.0
    far = old + 3 * new
    loss_none, stats_none = ppo_value_loss(far, old, ret, mask, None)
    assert loss_none.item() == pytest.approx(0.5 * ((far - ret) ** 2)[mask].mean().item())
    assert stats_none["value_clipfrac"].item() == 0.0
    loss_clip, _ = ppo_value_loss(far, old, ret, mask, 0.2)
    assert loss_clip.item() > loss_none.item()  # the max can only add


def test_value_padding_never_leaks_and_stats_detached():
    new, old, ret, mask = ragged(seed=9)
    clean, clean_stats = ppo_value_loss(new, old, ret, mask, 0.2)
    d_new, d_old, d_ret = new.clone(), old.clone(), ret.clone()
    d_new[~mask], d_old[~mask], d_ret[~mask] = 1e6, float("nan"), -1e6
    leaf = d_new.requires_grad_(True)
    dirty, dirty_stats = ppo_value_loss(leaf, d_old, d_ret, mask, 0.2)
    dirty.backward()
    torch.testing.assert_close(dirty, clean)
    assert torch.all(leaf.grad[~mask] == 0)
    assert set(dirty_stats) == {"value_clipfrac", "value_error", "value_mean"}
    for key, value in dirty_stats.items():
        assert value.dim() == 0 and not value.requires_grad
        torch.testing.assert_close(value, clean_stats[key])


# ---------------------------------------------------------------- Bradley-Terry


def test_bt_loss_is_ln2_at_equal_scores_and_gradient_widens_the_gap():
    chosen = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss, stats = pairwise_reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # d/dc -log sigmoid(c - r) = -(1 - sigmoid(0)) / 3 = -1/6 ; d/dr = +1/6 -> descent raises c - r
    torch.testing.assert_close(chosen.grad, torch.full((3,), -1 / 6))
    torch.testing.assert_close(rejected.grad, torch.full((3,), 1 / 6))
    assert stats["accuracy"].item() == 0.0  # ties are not correct


def test_bt_loss_by_hand_with_margin_and_stats():
    # diffs [1, -1, 1]: loss = (log(1+e^-1) + log(1+e^1) + log(1+e^-1)) / 3
    chosen = torch.tensor([1.0, 0.0, 3.0])
    rejected = torch.tensor([0.0, 1.0, 2.0])
    loss, stats = pairwise_reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx((2 * math.log1p(math.exp(-1)) + math.log1p(E)) / 3, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(2 / 3)
    assert stats["margin"].item() == pytest.approx(1 / 3)
    assert stats["chosen_mean"].item() == pytest.approx(4 / 3)
    assert stats["rejected_mean"].item() == pytest.approx(1.0)
    # margin 1 shifts every diff by -1: diffs [0, -2, 0] -> (2 ln 2 + log(1+e^2)) / 3 ; stats unchanged
    loss_m, stats_m = pairwise_reward_loss(chosen, rejected, margin=1.0)
    assert loss_m.item() == pytest.approx((2 * math.log(2) + math.log1p(math.exp(2))) / 3, rel=1e-6)
    assert stats_m["margin"].item() == pytest.approx(1 / 3)
    loss_t, _ = pairwise_reward_loss(chosen, rejected, margin=torch.ones(3))
    torch.testing.assert_close(loss_t, loss_m)


def test_bt_loss_is_stable_for_large_gaps():
    loss_bad, _ = pairwise_reward_loss(torch.tensor([-500.0]), torch.tensor([500.0]))
    loss_good, stats = pairwise_reward_loss(torch.tensor([500.0]), torch.tensor([-500.0]))
    assert loss_bad.item() == pytest.approx(1000.0)
    assert loss_good.item() == pytest.approx(0.0, abs=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
