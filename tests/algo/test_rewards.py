"""Tests for tether.algo.rewards: last-token index and KL-shaped per-token rewards."""

import pytest
import torch

from tether.algo import last_token_index, shape_rewards


def ragged(batch=6, length=8, seed=0, allow_empty=True):
    g = torch.Generator().manual_seed(seed)
    kl = torch.randn(batch, length, generator=g, dtype=torch.float64)
    scores = torch.randn(batch, generator=g, dtype=torch.float64)
    lengths = torch.randint(0 if allow_empty else 1, length + 1, (batch,), generator=g)
    lengths[0], lengths[1] = 0, length  # always cover an empty row and a full row
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return scores, kl, mask


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    idx = last_token_index(mask)
    assert idx.dtype == torch.long
    assert idx.tolist() == [2, 0, 0, 3]
    assert last_token_index(mask.bool()).tolist() == [2, 0, 0, 3]
    assert last_token_index(mask.float()).tolist() == [2, 0, 0, 3]


def test_shape_rewards_by_hand():
    # beta = 0.1
    # row 0: mask [1,1,1], kl [0.1,0.2,0.3] -> non-score [-0.01,-0.02,-0.03]; score 2 on index 2 -> 1.97
    # row 1: mask [1,0,0], kl [0.5,9,9]     -> non-score [-0.05, 0, 0];       score -1 on index 0 -> -1.05
    scores = torch.tensor([2.0, -1.0], dtype=torch.float64)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, non_score = shape_rewards(scores, kl, mask, 0.1)
    expected_non_score = torch.tensor([[-0.01, -0.02, -0.03], [-0.05, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(non_score, expected_non_score)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, -0.02, 1.97], [-1.05, 0.0, 0.0]], dtype=torch.float64))


def test_scores_of_shape_b1_are_accepted():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    flat, _ = shape_rewards(torch.tensor([1.0, 2.0]), torch.zeros(2, 3), mask, 0.1)
    column, _ = shape_rewards(torch.tensor([[1.0], [2.0]]), torch.zeros(2, 3), mask, 0.1)
    torch.testing.assert_close(column, flat)
    torch.testing.assert_close(flat, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))


def test_empty_row_gets_no_score():
    scores = torch.tensor([5.0, 7.0])
    kl = torch.ones(2, 3)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    rewards, non_score = shape_rewards(scores, kl, mask, 0.5)
    assert torch.all(rewards[0] == 0) and torch.all(non_score[0] == 0)
    torch.testing.assert_close(rewards[1], torch.tensor([-0.5, 6.5, 0.0]))


def test_identical_policy_and_reference_gives_score_on_last_token_only():
    scores, kl, mask = ragged(seed=1)
    rewards, non_score = shape_rewards(scores, torch.zeros_like(kl), mask, 0.2)
    assert torch.all(non_score == 0)
    assert rewards.sum().item() == pytest.approx(scores[mask.any(1)].sum().item())
    assert (rewards != 0).sum().item() == int((mask.any(1) & (scores != 0)).sum())


def naive_shape_rewards(scores, kl, mask, beta):
    batch, length = kl.shape
    rewards = torch.zeros(batch, length, dtype=kl.dtype)
    non_score = torch.zeros(batch, length, dtype=kl.dtype)
    for b in range(batch):
        last = None
        for t in range(length):
            if mask[b, t]:
                non_score[b, t] = -beta * kl[b, t].item()
                rewards[b, t] = non_score[b, t]
                last = t
        if last is not None:
            rewards[b, last] += scores[b].item()
    return rewards, non_score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(seed):
    scores, kl, mask = ragged(seed=seed)
    rewards, non_score = shape_rewards(scores, kl, mask.float(), 0.07)
    ref_rewards, ref_non_score = naive_shape_rewards(scores, kl, mask, 0.07)
    torch.testing.assert_close(rewards, ref_rewards)
    torch.testing.assert_close(non_score, ref_non_score)


def test_padding_never_leaks_and_inputs_not_mutated():
    scores, kl, mask = ragged(seed=3)
    dirty = kl.clone()
    dirty[~mask] = float("nan")
    before = (scores.clone(), dirty.clone(), mask.clone())
    clean_out = shape_rewards(scores, kl, mask, 0.3)
    dirty_out = shape_rewards(scores, dirty, mask, 0.3)
    for a, b in zip(clean_out, dirty_out):
        torch.testing.assert_close(a, b)
        assert torch.all(b[~mask] == 0)
    assert torch.equal(scores, before[0]) and torch.equal(mask, before[2])
    assert torch.equal(dirty.isnan(), before[1].isnan())


def test_step_scores_land_where_they_stand_and_padding_drops_them():
    # beta = 0.1, kl 0.1 everywhere: non-score -0.01 per valid token; step score 0.5 on t=1, outcome 2 on t=2;
    # a step score written on padding (row 1, t=2) is ignored
    kl = torch.full((2, 3), 0.1, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    steps = torch.tensor([[0.0, 0.5, 0.0], [0.25, 0.0, 9.0]], dtype=torch.float64)
    rewards, non_score = shape_rewards(torch.tensor([2.0, 1.0], dtype=torch.float64), kl, mask, 0.1, steps)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, 0.49, 1.99], [0.24, 0.99, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(non_score, -0.01 * mask.double())
    plain, _ = shape_rewards(torch.tensor([2.0, 1.0], dtype=torch.float64), kl, mask, 0.1, torch.zeros_like(steps))
    torch.testing.assert_close(plain, shape_rewards(torch.tensor([2.0, 1.0], dtype=torch.float64), kl, mask, 0.1)[0])
