"""The lean sampler: its noise, its filters, a naive uncached reference, rows that sample alike in any batch, and
what it records against the plain path (a full forward pass)."""

import math

import pytest
import torch
from transformers import GenerationConfig

from tether.algo import entropy_from_logits, logprobs_from_logits
from tether.data import prompt_batch
from tether.models import ActorCritic, load_causal_lm, reference_copy
from tether.passes import model_inputs, response_logits
from tether.precision import Placement
from tether.rewards import FunctionScorer
from tether.rollout import collect_rollout, mask_after_eos
from tether.sampling import Sampling, decode_step, draw, filter_logits, row_keys, sample, uniform_noise

PROMPTS = ["1+1=", "12*34+5=", "9-4=", "7+7=", "100-1="]


def test_noise_is_uniform_and_belongs_to_the_row_and_step():
    keys = row_keys(0, 3, range(50_000))
    u = uniform_noise(keys, 0)
    assert u.shape == (50_000,) and u.dtype == torch.float64 and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.equal(uniform_noise(keys[2:3], 0), u[2:3])  # a row's noise ignores the other rows
    assert (uniform_noise(keys, 1) != u).float().mean() > 0.999  # and differs from step to step
    assert len({tuple(row_keys(s, i, [0]).tolist()) for s in range(3) for i in range(3)}) == 9


def test_draws_follow_the_softmax_and_never_a_filtered_token():
    logits = torch.tensor([2.0, float("-inf"), 1.0, 0.0, float("-inf"), -1.0, -30.0, float("-inf")])
    tokens = draw(logits.softmax(-1).expand(40_000, 8), row_keys(1, 0, range(40_000)), step=0)
    freq = torch.bincount(tokens, minlength=8).float() / 40_000
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.01, rtol=0)
    assert freq[[1, 4, 7]].sum() == 0


def test_draw_by_hand():
    """Inverse CDF: weights 2, 1, 1 (probabilities 0.5, 0.25, 0.25) split (0, 1) at 0.5 and 0.75; u picks the
    interval it falls in."""
    weights = torch.tensor([[2.0, 1.0, 1.0]])  # need not sum to one
    keys = row_keys(0, 0, range(2000))
    u, tokens = uniform_noise(keys, 4), draw(weights.expand(2000, 3), keys, 4)
    expected = (u > 0.5).long() + (u > 0.75).long()
    assert torch.equal(tokens, expected)


def test_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, Sampling(1, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]  # the 0.5 head alone reaches 0.5
    assert kept(top_p=0.79) == [True, True, False, False]
    assert kept(top_p=0.9) == [True, True, True, False]
    assert kept(top_p=0.01) == [True, False, False, False]  # the most likely token always stays
    torch.testing.assert_close(filter_logits(logits, Sampling(1, temperature=0.5)), logits / 0.5)


@pytest.mark.parametrize(
    "sampling", [Sampling(1), Sampling(1, temperature=0.7), Sampling(1, 0.7, top_k=5), Sampling(1, top_p=0.6)]
)
@pytest.mark.parametrize("banned", [None, torch.tensor([0, 3])])
def test_decode_step_against_the_separate_functions(sampling, banned):
    """One step's draw, log-softmax and entropy against filter/softmax/draw and the PPO update's own functions."""
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 2
    keys = row_keys(3, 1, range(64))
    tokens, logp, entropy = decode_step(logits, sampling, keys, 5, banned, record=True)
    allowed = logits if banned is None else logits.index_fill(-1, banned, float("-inf"))
    expected = draw(filter_logits(allowed, sampling).softmax(-1), keys, 5)
    assert torch.equal(tokens, expected)
    if banned is not None:
        assert not torch.isin(tokens, banned).any()
    scaled = (logits / sampling.temperature)[:, None]
    torch.testing.assert_close(logp.gather(-1, tokens[:, None]), logprobs_from_logits(scaled, tokens[:, None]))
    torch.testing.assert_close(entropy, entropy_from_logits(scaled)[:, 0])
    assert decode_step(logits, sampling, keys, 5, banned)[1:] == (None, None)
    assert torch.equal(decode_step(logits, sampling, keys, 5, banned)[0], tokens)


def test_decode_step_entropy_by_hand_and_with_filtered_logits():
    """p = (0.5, 0.25, 0.25, 0): H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2; a -inf logit adds nothing."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0]]))
    _, logp, entropy = decode_step(logits, Sampling(1), row_keys(0, 0, [0]), 0, record=True)
    torch.testing.assert_close(entropy, torch.tensor([1.5 * math.log(2)]))
    torch.testing.assert_close(logp[0, :3].exp(), torch.tensor([0.5, 0.25, 0.25]))


def naive_sample(model, ids, mask, sampling, keys, eos):
    """Reference: no cache, the whole sequence through the model at every step, the same noise, EOS masked."""
    tokens = []
    for step in range(sampling.max_new_tokens):
        logits = model(**model_inputs(ids, mask, eos)).logits[:, -1].float()
        logits[:, eos] = float("-inf")
        token = draw(filter_logits(logits, sampling).softmax(-1), keys, step)
        tokens.append(token)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1)


@pytest.mark.parametrize(
    "sampling", [Sampling(10, 0.8, min_new_tokens=10), Sampling(10, top_p=0.9, top_k=20, min_new_tokens=10)]
)
def test_the_cached_loop_samples_what_the_naive_loop_samples(policy_dir, tokenizer, device, sampling):
    placement = Placement(torch.device(device))
    policy = placement.frozen(load_causal_lm(policy_dir))
    ids, mask = map(placement.move, prompt_batch(tokenizer, PROMPTS, 32))
    keys = row_keys(0, 0, range(len(PROMPTS)))
    eos = tokenizer.eos_token_id  # held back by min_new_tokens: every row runs to max_new_tokens
    fast = sample(policy, ids, mask, sampling, [eos], keys).tokens
    assert torch.equal(fast.cpu(), naive_sample(policy, ids, mask, sampling, keys, eos).cpu())


def test_a_row_samples_the_same_in_any_batch(policy_dir, tokenizer, device):
    placement = Placement(torch.device(device))
    policy = placement.frozen(load_causal_lm(policy_dir))
    sampling, stops = Sampling(12, 1.0), [tokenizer.eos_token_id]
    keys = row_keys(7, 2, range(len(PROMPTS)))
    together = sample(policy, *map(placement.move, prompt_batch(tokenizer, PROMPTS, 32)), sampling, stops, keys)
    for row in (0, 3):  # alone (no left padding) and in a pair with other padding
        ids, mask = map(placement.move, prompt_batch(tokenizer, [PROMPTS[row], PROMPTS[4]], 32))
        pair = sample(policy, ids, mask, sampling, stops, keys[[row, 4]]).tokens
        length = min(pair.shape[1], together.tokens.shape[1])
        assert torch.equal(pair[0, :length], together.tokens[row, :length])


def test_top_k_one_is_greedy_generate(policy_dir, tokenizer, device):
    placement = Placement(torch.device(device))
    policy = placement.frozen(load_causal_lm(policy_dir))
    ids, mask = map(placement.move, prompt_batch(tokenizer, PROMPTS, 32))
    eos = tokenizer.eos_token_id
    ours = sample(policy, ids, mask, Sampling(8, top_k=1, min_new_tokens=8), [eos]).tokens
    config = GenerationConfig(do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=eos, pad_token_id=eos)
    theirs = policy.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    assert torch.equal(ours, theirs)


def test_min_new_tokens_holds_the_stop_back(policy_dir, tokenizer, device):
    placement = Placement(torch.device(device))
    policy = placement.frozen(load_causal_lm(policy_dir))
    ids, mask = map(placement.move, prompt_batch(tokenizer, PROMPTS, 32))
    eos = tokenizer.eos_token_id
    tokens = sample(policy, ids, mask, Sampling(6, min_new_tokens=4), [eos], row_keys(0, 0, range(5))).tokens
    assert not (tokens[:, :4] == eos).any()
    stopped = (tokens == eos).long()
    assert torch.equal(stopped.cummax(1).values, stopped)  # after a row's stop token comes only the fill id


def test_recorded_logprobs_entropy_and_hidden_match_the_full_forward(policy_dir, tokenizer, device):
    placement = Placement(torch.device(device))
    policy = placement.frozen(load_causal_lm(policy_dir))
    ids, mask = map(placement.move, prompt_batch(tokenizer, PROMPTS, 32))
    keys = row_keys(0, 0, range(len(ids)), ids.device)
    got = sample(policy, ids, mask, Sampling(9, 0.7, top_p=0.8), [tokenizer.eos_token_id], keys, record=True)
    seq = torch.cat([ids, got.tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(got.tokens)], 1)
    logits = response_logits(policy, seq, full_mask, ids.shape[1], 0.7, tokenizer.eos_token_id)
    _, kept = mask_after_eos(got.tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert 0 < kept.sum() < kept.numel()  # some rows stopped early: their later steps are padding
    kept = kept.bool()
    for recorded, full in [
        (got.logprobs, logprobs_from_logits(logits, got.tokens)),
        (got.entropy, entropy_from_logits(logits)),
    ]:
        torch.testing.assert_close(recorded[kept], full[kept], atol=1e-5, rtol=1e-5)
        assert not recorded[~kept].any()  # after a row's stop: 0
    assert torch.isfinite(got.logprobs).all()  # recorded before top-p, as the update computes them
    assert got.hidden.shape == (*got.tokens.shape, policy.config.n_embd) and not got.hidden[~kept].any()


@pytest.mark.parametrize("critic", [False, True])
def test_rollout_from_the_recording_equals_the_plain_path(policy_dir, reward_dir, tokenizer, device, critic):
    """collect_rollout (the sampler's recording) against build_rollout's full forward on the same responses."""
    from tether.models import load_reward_model
    from tether.rollout import build_rollout

    torch.manual_seed(0)
    placement = Placement(torch.device(device))
    policy = load_causal_lm(policy_dir)
    value_model = load_reward_model(reward_dir) if critic else None
    actor_critic = placement.trained(ActorCritic(policy, value_model))
    if not critic:
        torch.nn.init.normal_(actor_critic.value_head.weight)  # non-zero values, to compare something
    reference = placement.frozen(reference_copy(policy))
    ids, mask = map(placement.move, prompt_batch(tokenizer, PROMPTS, 32))
    scorer = FunctionScorer(lambda prompts, responses: [float(len(r)) for r in responses])
    fast = collect_rollout(actor_critic, reference, scorer, tokenizer, ids, mask, Sampling(10, 0.9), chunk=2)
    plain = build_rollout(
        actor_critic, reference, ids, mask, fast.response_ids, fast.response_mask, fast.raw_scores, 0.9,
        tokenizer.eos_token_id, chunk=3,
    )  # fmt: skip
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), atol=1e-5, rtol=1e-5)
    assert math.isclose(fast.response_mask.float().mean().item(), plain.response_mask.float().mean().item())


def test_prepacked_and_plain_decoding_agree(policy_dir, tokenizer):
    policy = load_causal_lm(policy_dir).eval()
    ids, mask = prompt_batch(tokenizer, PROMPTS, 32)
    keys, stops = row_keys(3, 1, range(len(PROMPTS))), [tokenizer.eos_token_id]
    packed, plain = (
        sample(policy, ids, mask, Sampling(12, 0.9, fast_decoding=fast), stops, keys, record=True)
        for fast in (True, False)
    )
    assert torch.equal(packed.tokens, plain.tokens)
    torch.testing.assert_close(packed.logprobs, plain.logprobs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed.hidden, plain.hidden, atol=1e-6, rtol=1e-6)


def test_the_two_level_draw_is_the_one_running_sum_inverted():
    """The blocked sum picks the token a single float64 running sum over the whole vocabulary picks, with zero
    weights (filtered or banned ids) in and across blocks, and a vocabulary that is not a multiple of the block."""
    gen = torch.Generator().manual_seed(0)
    weights = (torch.randn(500, 5003, generator=gen) * 3).softmax(-1)
    weights[:, 100:700] = 0  # whole blocks of zeros and parts of others
    weights[:, -3:] = 0
    keys = row_keys(3, 0, range(500))
    for step in range(10):
        running = torch.cumsum(weights, -1, dtype=torch.float64)
        target = uniform_noise(keys, step) * running[:, -1]
        expected = torch.searchsorted(running, target[:, None])[:, 0]
        for block in (256, 64, 7):
            assert torch.equal(draw(weights, keys, step, block), expected)
    assert not ((expected >= 100) & (expected < 700)).any() and (expected < 5000).all()
