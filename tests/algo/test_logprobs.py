"""Tests for tether.algo.logprobs: gathered log-softmax and entropy from logits."""

import math

import pytest
import torch

import tether.algo.logprobs as logprobs_module
from tether.algo import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits


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


def test_logprobs_and_entropy_in_one_pass_match_the_separate_functions():
    logits, tokens = random_logits(seed=3)
    leaf = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(leaf, tokens)
    torch.testing.assert_close(logp, logprobs_from_logits(logits, tokens))
    torch.testing.assert_close(ent, entropy_from_logits(logits))
    assert logp.requires_grad and not ent.requires_grad  # the entropy is a statistic here, not a loss term
    weights = torch.randn(tokens.shape, dtype=torch.float64)
    (logp * weights).sum().backward()
    naive = logits.clone().requires_grad_(True)
    (torch.log_softmax(naive, -1).gather(-1, tokens[..., None]).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, naive.grad)


def test_gradcheck_of_the_blockwise_backward():
    logits, tokens = random_logits(shape=(2, 3, 5), seed=4)
    leaf = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, tokens), (leaf,))
    assert torch.autograd.gradcheck(entropy_from_logits, (leaf,))


@pytest.mark.parametrize("block", [1, 11, 23, 10**9])  # under one row, one row, two rows, everything at once
def test_results_do_not_depend_on_the_block_size(monkeypatch, block):
    logits, tokens = random_logits(shape=(3, 5, 11), seed=5, dtype=torch.float32)
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", 10**9)
    whole = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(whole, tokens)
    logp.sum().backward()
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", block)
    split = logits.clone().requires_grad_(True)
    logp_b, ent_b = logprobs_and_entropy(split, tokens)
    logp_b.sum().backward()
    torch.testing.assert_close(logp_b, logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent_b, ent, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy_from_logits(logits), ent, rtol=0, atol=1e-6)
    torch.testing.assert_close(split.grad, whole.grad, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_same_numbers_as_on_the_cpu(monkeypatch):
    monkeypatch.setattr(logprobs_module, "DEVICE_CHUNK_ELEMENTS", 23)  # several blocks on the GPU too
    logits, tokens = random_logits(shape=(3, 5, 11), seed=6, dtype=torch.float32)
    results = []
    for device in ("cpu", "cuda"):
        leaf = logits.to(device).requires_grad_(True)
        logp, ent = logprobs_and_entropy(leaf, tokens.to(device))
        logp.sum().backward()
        results.append([t.detach().cpu() for t in (logp, ent, leaf.grad)])
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu, cpu)


@pytest.mark.parametrize("block", [7, 10**9])  # blocks within a row and across rows; everything at once
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_the_numbers_of_a_float32_upcast_bit_for_bit(monkeypatch, block, dtype):
    """Upcast a block at a time inside the pass: log-probs, entropies and the gradient (written in the logits' dtype)
    are exactly those of casting the logits to float32 first and the float32 gradient back."""
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", block)
    logits, tokens = random_logits(shape=(3, 5, 11), seed=7, dtype=dtype)
    weights = torch.randn(3, 5)
    inside, upcast = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(inside, tokens)
    logp_ref, ent_ref = logprobs_and_entropy(upcast.float(), tokens)
    (logp * weights).sum().backward()
    (logp_ref * weights).sum().backward()
    assert logp.dtype == ent.dtype == torch.float32 and inside.grad.dtype == dtype
    for ours, reference in ((logp, logp_ref), (ent, ent_ref), (inside.grad, upcast.grad)):
        assert torch.equal(ours, reference)
    assert torch.equal(logprobs_from_logits(logits, tokens), logp_ref.detach())


def test_half_precision_logits_are_kept_for_the_backward_as_they_are_not_as_a_float32_copy():
    logits, tokens = random_logits(shape=(4, 6, 50), seed=8, dtype=torch.bfloat16)
    saved = []
    keep = lambda t: saved.append((t.dtype, t.numel())) or t  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logprobs_and_entropy(logits.clone().requires_grad_(True), tokens)
    assert (torch.bfloat16, logits.numel()) in saved
    assert not [numel for dtype, numel in saved if dtype == torch.float32 and numel >= logits.shape[-1]]
