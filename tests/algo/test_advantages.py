"""Tests for tether.algo.advantages.compute_gae: hand example, identities, naive reference, padding."""

import pytest
import torch

from tether.algo import compute_gae, shape_rewards


def ragged(batch=6, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=g, dtype=torch.float64)
    values = torch.randn(batch, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return rewards, values, mask


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-sequence double loop over each row's valid positions, in python floats."""
    batch, length = rewards.shape
    adv = torch.zeros(batch, length, dtype=torch.float64)
    ret = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        steps = [t for t in range(length) if mask[b, t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            a = delta + gamma * lam * next_a
            adv[b, t], ret[b, t] = a, a + values[b, t].item()
            next_v, next_a = values[b, t].item(), a
    return adv, ret


def test_gae_by_hand_1x3():
    # gamma = 0.9, lambda = 0.8 -> gamma*lambda = 0.72 ; r = [1, 0, 2], V = [0.5, 1.0, 1.5], V_3 = 0
    # t=2: delta = 2 + 0.9*0   - 1.5 = 0.5  ; A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35 ; A1 = 0.35 + 0.72*0.5  = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4  ; A0 = 1.4  + 0.72*0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 1.5]], dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0]], dtype=torch.float64))


def test_gae_by_hand_with_padding_uses_terminal_value_zero():
    # same example with a padded 4th position holding garbage: it must act as V = 0, A = 0 and come back 0
    rewards = torch.tensor([[1.0, 0.0, 2.0, 100.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 1.5, -100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = compute_gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("seed, gamma, lam", [(0, 0.9, 0.8), (1, 1.0, 0.95), (2, 0.99, 0.0), (3, 0.7, 1.0)])
def test_matches_naive_loop_on_ragged_masks(seed, gamma, lam):
    rewards, values, mask = ragged(seed=seed)
    adv, ret = compute_gae(rewards, values, mask.float(), gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_interior_mask_holes_are_skipped():
    rewards, values, mask = ragged(seed=4)
    mask = mask.clone()
    mask[0, 2] = mask[0, 5] = False  # holes inside the first (full-length) row
    adv, ret = compute_gae(rewards, values, mask, 0.95, 0.9)
    ref_adv, ref_ret = naive_gae(rewards, values, mask, 0.95, 0.9)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_lambda_zero_is_one_step_td():
    rewards, values, mask = ragged(seed=5)
    gamma = 0.9
    adv, _ = compute_gae(rewards, values, mask, gamma, 0.0)
    v = values * mask
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # V beyond the last valid token is 0
    td = (rewards + gamma * v_next - values) * mask
    torch.testing.assert_close(adv, td)


def reward_to_go(rewards, mask):
    r = rewards * mask
    return r.flip(1).cumsum(1).flip(1) * mask


def test_gamma_lambda_one_zero_values_is_reward_to_go():
    rewards, _, mask = ragged(seed=6)
    adv, ret = compute_gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    torch.testing.assert_close(adv, reward_to_go(rewards, mask))
    torch.testing.assert_close(ret, reward_to_go(rewards, mask))


def test_gamma_lambda_one_is_reward_to_go_minus_values():
    rewards, values, mask = ragged(seed=7)
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, reward_to_go(rewards, mask) - values * mask)
    torch.testing.assert_close(ret, reward_to_go(rewards, mask))  # Monte-Carlo returns


def test_returns_are_advantages_plus_values_and_padding_is_zero():
    rewards, values, mask = ragged(seed=8)
    adv, ret = compute_gae(rewards, values, mask, 0.97, 0.93)
    torch.testing.assert_close(ret, (adv + values) * mask)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_no_grad_no_mutation_and_padding_never_leaks():
    rewards, values, mask = ragged(seed=9)
    r = rewards.clone().requires_grad_(True)
    v = values.clone().requires_grad_(True)
    adv, ret = compute_gae(r, v, mask, 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.equal(r.detach(), rewards) and torch.equal(v.detach(), values)
    dirty_r, dirty_v = rewards.clone(), values.clone()
    dirty_r[~mask] = float("nan")
    dirty_v[~mask] = 1e9
    adv2, ret2 = compute_gae(dirty_r, dirty_v, mask, 0.99, 0.95)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_step_scores_flow_into_the_returns_by_hand():
    # one response of 4 tokens: beta * kl = 0.01 on every token, a step score 0.5 on t=1, the outcome 1 on t=3
    # r = [-0.01, 0.49, -0.01, 0.99]; V = 0, lambda = 1, so R_t = r_t + gamma * R_{t+1}
    # gamma = 1:   R = [1.46, 1.47, 0.98, 0.99]
    # gamma = 0.5: R3 = 0.99, R2 = -0.01 + 0.495 = 0.485, R1 = 0.49 + 0.2425 = 0.7325, R0 = -0.01 + 0.36625 = 0.35625
    kl, mask = torch.full((1, 4), 0.1, dtype=torch.float64), torch.ones(1, 4)
    steps = torch.tensor([[0.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    rewards, _ = shape_rewards(torch.tensor([1.0], dtype=torch.float64), kl, mask, 0.1, steps)
    values = torch.zeros(1, 4, dtype=torch.float64)
    _, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.46, 1.47, 0.98, 0.99]], dtype=torch.float64))
    _, ret = compute_gae(rewards, values, mask, 0.5, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.35625, 0.7325, 0.485, 0.99]], dtype=torch.float64))
