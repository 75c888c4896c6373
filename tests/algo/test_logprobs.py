"""Tests for tether.algo.logprobs: gathered log-softmax and entropy from logits."""

import math

import pytest
import torch

from tether.algo import entropy_from_logits, logprobs_from_logits


def random_logits(shape=(3, 5, 11), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits, tokens


def test_by_hand():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]
    # log p(token 2) = ln(1/2) ; log p(token 0) = ln(1/4)
    # H = -(2 * 1/4 * ln(1/4) + 1/2 * ln(1/2)) = ln 2 + 0.5 ln 2 = 1.5 ln 2
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]], dtype=torch.float64)
    tokens = torch.tensor([[2, 0]])
    torch.testing.assert_close(
        logprobs_from_logits(logits, tokens), torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    )
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((1, 2), 1.5 * math.log(2), dtype=torch.float64))


def test_uniform_logits():
    logits = torch.full((2, 3, 7), 4.2)
    tokens = torch.randint(0, 7, (2, 3))
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), torch.full((2, 3), -math.log(7)))
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(7)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_full_log_softmax(dtype):
    logits, tokens = random_logits(dtype=dtype)
    full = torch.log_softmax(logits, -1)
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == tokens.shape and out.dtype == dtype
    torch.testing.assert_close(out, full.gather(-1, tokens[..., None]).squeeze(-1))
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1))
    assert torch.all(ent >= 0) and torch.all(ent <= math.log(logits.shape[-1]) + 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_float32(dtype):
    logits, tokens = random_logits(dtype=dtype)
    upcast = logits.float()
    out = logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.log_softmax(upcast, -1).gather(-1, tokens[..., None]).squeeze(-1))
    ent = entropy_from_logits(logits)
    assert ent.dtype == torch.float32
    torch.testing.assert_close(ent, entropy_from_logits(upcast))


def test_shift_invariance_and_large_logits():
    logits, tokens = random_logits(seed=1)
    shifted = logits + torch.randn(logits.shape[:-1], dtype=torch.float64)[..., None] * 1e3
    torch.testing.assert_close(logprobs_from_logits(shifted, tokens), logprobs_from_logits(logits, tokens))
    torch.testing.assert_close(entropy_from_logits(shifted), entropy_from_logits(logits))
    big = torch.tensor([[[1e4, 0.0, -1e4]]], dtype=torch.float32)
    assert torch.isfinite(logprobs_from_logits(big, torch.tensor([[1]]))).all()
    assert entropy_from_logits(big).item() == pytest.approx(0.0, abs=1e-6)


def test_filtered_vocab_with_minus_inf_logits():
    # logits [0, 0, -inf] -> a fair coin over the first two tokens: H = ln 2, log p = ln 1/2
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    assert entropy_from_logits(logits).item() == pytest.approx(math.log(2))
    assert logprobs_from_logits(logits, torch.tensor([[0]])).item() == pytest.approx(-math.log(2))


def test_gradient_is_onehot_minus_softmax_and_input_not_mutated():
    logits, tokens = random_logits(seed=2)
    before = logits.clone()
    leaf = logits.clone().requires_grad_(True)
    logprobs_from_logits(leaf, tokens).sum().backward()
    expected = torch.nn.functional.one_hot(tokens, logits.shape[-1]).double() - torch.softmax(logits, -1)
    torch.testing.assert_close(leaf.grad, expected)
    entropy_from_logits(logits)
    assert torch.equal(logits, before)
