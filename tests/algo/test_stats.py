"""Tests for tether.algo.stats: Pearson correlation of paired samples."""

import math

import pytest
import torch

from tether.algo import pearson_correlation


def test_pearson_by_hand():
    # x = [1, 2, 3], y = [1, 3, 2]: dx = [-1, 0, 1], dy = [-1, 1, 0]
    # cov sum = 1 + 0 + 0 = 1; sum dx^2 = 2, sum dy^2 = 2 -> r = 1 / sqrt(2 * 2) = 0.5
    r = pearson_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0]))
    assert r.dtype == torch.float64 and r.item() == pytest.approx(0.5)


def test_pearson_signs_and_invariance():
    x = torch.tensor([0.5, -1.0, 2.0, 3.5, 0.0])
    assert pearson_correlation(x, 3 * x + 7).item() == pytest.approx(1.0)
    assert pearson_correlation(x, -0.1 * x).item() == pytest.approx(-1.0)
    y = torch.tensor([1.0, 0.0, 4.0, 2.0, 2.0])
    assert pearson_correlation(x, y).item() == pytest.approx(pearson_correlation(y, x).item())
    assert pearson_correlation(2 * x - 1, 5 * y + 3).item() == pytest.approx(pearson_correlation(x, y).item())


def test_pearson_undefined_is_nan():
    assert math.isnan(pearson_correlation(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0])).item())
    assert math.isnan(pearson_correlation(torch.tensor([1.0]), torch.tensor([2.0])).item())
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        pearson_correlation(torch.zeros(3), torch.zeros(2))
