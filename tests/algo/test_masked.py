"""Tests for tether.algo.masked: masked reductions, variance convention, whitening, explained variance."""

import math

import pytest
import torch

from tether.algo import exact_div, explained_variance, masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # valid values: 1, 2, 4


def ragged(batch=5, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return x, mask


def test_masked_sum_and_mean_by_hand():
    # sum = 1 + 2 + 4 = 7 ; count = 3 ; mean = 7/3
    assert masked_sum(X, M).item() == pytest.approx(7.0)
    assert masked_mean(X, M).item() == pytest.approx(7.0 / 3.0)
    # per row: sums [1+2, 4] = [3, 4] ; counts [2, 1] ; means [1.5, 4]
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0], dtype=torch.float64))
    # per column: sums [1+4, 2, 0] ; counts [2, 1, 0] -> last column is 0/0 = nan
    col = masked_mean(X, M, dim=0)
    torch.testing.assert_close(col[:2], torch.tensor([2.5, 2.0], dtype=torch.float64))
    assert torch.isnan(col[2])


def test_float_and_bool_masks_agree():
    assert masked_mean(X, M).item() == masked_mean(X, M.double()).item()
    assert masked_var(X, M).item() == masked_var(X, M.float()).item()


def test_masked_var_population_and_unbiased_by_hand():
    # values 1, 2, 4 ; mean 7/3 ; deviations -4/3, -1/3, 5/3 ; squares 16/9 + 1/9 + 25/9 = 42/9
    # population: 42/9 / 3 = 14/9 ; unbiased: 42/9 / 2 = 7/3
    assert masked_var(X, M).item() == pytest.approx(14.0 / 9.0)
    assert masked_var(X, M, unbiased=True).item() == pytest.approx(7.0 / 3.0)
    vals = X[M]
    assert masked_var(X, M).item() == pytest.approx(vals.var(unbiased=False).item())


def test_masked_var_raises_on_empty_mask():
    with pytest.raises(ValueError, match="no element"):
        masked_var(X, torch.zeros_like(M))
    one = torch.zeros_like(M)
    one[0, 0] = True
    assert masked_var(X, one).item() == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, one, unbiased=True)


def test_whiten_shift_mean_true_gives_mean0_var1_population():
    x, mask = ragged()
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    # population variance (divide by n) is 1, so the unbiased one is n/(n-1) > 1
    n = mask.sum().item()
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert masked_var(w, mask, unbiased=True).item() == pytest.approx(n / (n - 1), rel=1e-6)
    assert torch.all(w[~mask] == 0)


def test_whiten_shift_mean_false_keeps_mean_by_hand():
    # values 1, 2, 3, 6: mean 3 ; population var (4 + 1 + 0 + 9) / 4 = 3.5
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    s = math.sqrt(3.5 + 1e-8)
    expected = torch.tensor([[(1 - 3) / s + 3, (2 - 3) / s + 3, 3.0, (6 - 3) / s + 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), expected)
    w = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w, mask).item() == pytest.approx(3.0)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)


def naive_whiten(x, mask, shift_mean, eps=1e-8):
    vals = [x[i][j].item() for i in range(x.shape[0]) for j in range(x.shape[1]) if mask[i][j]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            if mask[i][j]:
                out[i][j] = (x[i][j].item() - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_naive_loop(shift_mean):
    x, mask = ragged(seed=3)
    x = x * 3 + 2
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=shift_mean), naive_whiten(x, mask, shift_mean))


def test_padding_never_leaks():
    x, mask = ragged(seed=1)
    y = x.clone()
    y[~mask] = float("nan")
    z = x.clone()
    z[~mask] = 1e30
    for other in (y, z):
        assert masked_sum(other, mask).item() == pytest.approx(masked_sum(x, mask).item())
        assert masked_mean(other, mask).item() == pytest.approx(masked_mean(x, mask).item())
        assert masked_var(other, mask).item() == pytest.approx(masked_var(x, mask).item())
        torch.testing.assert_close(masked_whiten(other, mask), masked_whiten(x, mask))
        torch.testing.assert_close(masked_mean(other, mask, dim=1), masked_mean(x, mask, dim=1))
        returns = torch.where(mask, 2 * x + 1 + torch.cos(x), other)
        ev_clean = explained_variance(x, 2 * x + 1 + torch.cos(x), mask).item()
        assert explained_variance(other, returns, mask).item() == pytest.approx(ev_clean)


def test_inputs_not_mutated():
    x, mask = ragged(seed=2)
    x0, m0 = x.clone(), mask.clone()
    masked_whiten(x, mask, shift_mean=False)
    masked_var(x, mask, unbiased=True)
    explained_variance(x, x * 2, mask)
    assert torch.equal(x, x0) and torch.equal(mask, m0)


def test_explained_variance_by_hand():
    # returns [1, 2, 3], values [1, 2, 2]: residual [0, 0, 1]
    # var(residual) = 1/3 - (1/3)^2 = 2/9 ; var(returns) = (1 + 0 + 1)/3 = 2/3 ; EV = 1 - (2/9)/(2/3) = 2/3
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(2.0 / 3.0)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)  # perfect
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0)  # constant
    assert explained_variance(-returns, returns, mask).item() == pytest.approx(-3.0)  # var(2R)/var(R) = 4
    ev = explained_variance(values, torch.full_like(returns, 5.0), mask)  # var(returns) == 0
    assert ev.dim() == 0 and torch.isnan(ev)


def test_exact_div():
    assert exact_div(12, 4) == 3
    assert exact_div(64, 64, "x") == 1
    with pytest.raises(ValueError, match="batch_size / num_minibatches"):
        exact_div(10, 4, "batch_size / num_minibatches")
    with pytest.raises(ValueError):
        exact_div(10, 0, "zero")
