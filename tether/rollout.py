"""Step 1 of the PPO loop: sample responses and compute, without gradients, everything PPO needs about them.

Sampling is :func:`tether.sampling.sample`, a lean KV-cached loop whose randomness belongs to each row. While it
samples, it records the policy's log-probs and entropy of the temperature-scaled logits and the trunk's hidden states
(a value head reads them), so the policy's trunk runs once per rollout. These are the numbers the update's forward
pass computes (over the whole sequence, without a cache) to float rounding, so the first minibatch of the first
epoch has ratio 1 (ppo_details #9, #16). Responses that did not come from the sampler (the legacy API's ``step``,
multi-turn episodes) get them from that full forward pass instead. The forward passes run in ``autocast()`` (a
:meth:`tether.precision.Placement.autocast`: bf16 autocast for ``model.dtype=bfloat16``); log-probs and entropies are
computed outside it, in float32 (bf16 logits upcast a block at a time).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
import torch
from tether.algo import logprobs_and_entropy, logprobs_from_logits
from tether.models import ActorCritic
from tether.passes import gather_ids, response_logits
from tether.errors import TetherError
from tether.sampling import Sampled, Sampler, Sampling, sample
from tether.types import Rollout, length_groups

__all__ = ["Sampling", "build_rollout", "collect_rollout", "generate", "mask_after_eos", "stop_ids"]


def stop_ids(tokenizer, policy=None) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS, then the ids in the policy's
    ``generation_config.eos_token_id`` (chat models often list their end-of-turn token there too)."""
    return merge_stops(
        tokenizer.eos_token_id, getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    )


def merge_stops(eos_id: int, extra) -> list[int]:
    """``[eos_id]`` followed by the ids of ``extra`` (None, one id or a list of them) it does not hold yet."""
    ids = [eos_id]
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def as_stop_list(eos_id: int | list[int]) -> list[int]:
    """One stop id or a list of them, as a list."""
    return [eos_id] if isinstance(eos_id, int) else list(eos_id)


@torch.no_grad()
def generate(
    policy,
    prompt_ids,
    prompt_mask,
    sampling: Sampling,
    eos_id: int | list[int],
    pad_id: int,
    autocast=nullcontext,
    keys: torch.Tensor | None = None,
    sampler: Sampler = sample,
):
    """Sample one response per prompt. Returns (response_ids, response_mask), both (B, T), right-padded.

    ``eos_id`` is one stop token or a list of them (:func:`stop_ids`; the first is also the fill id). The response
    keeps its stop token (and ``response_mask`` covers it); tokens after it become ``pad_id``. Sampling runs in the
    ``autocast()`` context; ``keys`` are the rows' noise keys (:func:`tether.sampling.row_keys`); ``sampler`` draws.
    """
    stops = as_stop_list(eos_id)
    sampled = sampler(policy, prompt_ids, prompt_mask, sampling, stops, keys, autocast, False)
    sampled = checked(sampled, prompt_ids, sampling, None if sampler is sample else policy)
    return mask_after_eos(sampled.tokens, stops, pad_id)


def checked(sampled, prompt_ids: torch.Tensor, sampling: Sampling, policy=None) -> Sampled:
    """What a sampler returned, if it is a Sampled with one row of at most ``max_new_tokens`` token ids per prompt,
    on the prompts' device (and, given the ``policy``, ids in its vocabulary: another sampler's tokenizer may not be
    the policy's)."""
    tokens = getattr(sampled, "tokens", None)
    rows, limit = len(prompt_ids), sampling.max_new_tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or len(tokens) != rows or tokens.shape[1] > limit:
        got = f"tokens of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(sampled).__name__
        raise TetherError(
            f"sampler: expected a Sampled with ({rows}, T <= {limit}) tokens (one row per prompt); got {got}"
        )
    if tokens.dtype != torch.long or tokens.device != prompt_ids.device:
        raise TetherError(
            f"sampler: tokens must be int64 on {prompt_ids.device} (the prompts' device); got {tokens.dtype} on "
            f"{tokens.device}"
        )
    vocab = getattr(policy.get_output_embeddings(), "out_features", None) if policy is not None else None
    if vocab is not None and tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab:
        raise TetherError(
            f"sampler: token ids must be in [0, {vocab}) (the policy's vocabulary); got ids from {int(tokens.min())} "
            f"to {int(tokens.max())}"
        )
    return sampled


def is_stop(ids: torch.Tensor, eos_id: int | list[int]) -> torch.Tensor:
    """Bool tensor: where ``ids`` holds the stop token ``eos_id`` (or one of a list of them)."""
    return torch.isin(ids, torch.tensor(as_stop_list(eos_id), device=ids.device))


def mask_after_eos(response_ids: torch.Tensor, eos_id: int | list[int], pad_id: int):
    """(ids, mask) with mask 1 up to and including the first stop token, ids set to ``pad_id`` after it."""
    is_eos = is_stop(response_ids, eos_id)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    return response_ids.masked_fill(after_eos, pad_id), response_mask


@torch.no_grad()
def score_tokens(
    actor_critic: ActorCritic,
    reference,
    sequence_ids,
    attention_mask,
    prompt_length,
    response_ids,
    temperature: float,
    fill_id: int,
    chunk: int,
    autocast=nullcontext,
    sampled: Sampled | None = None,
):
    """Old log-probs, reference log-probs, values and entropy (all (B, T)), computed in chunks of ``chunk`` rows.

    With ``sampled`` (recorded by the sampler) the policy's log-probs, entropy and hidden states are taken from it:
    only the reference (and a separate critic) run here.
    """
    outs = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    width, order = response_ids.shape[1], []
    # rows of like length together, without the columns that are padding in all of them (as the update's micro-batches)
    for rows, (first, stop) in length_groups(
        attention_mask[:, :prompt_length], attention_mask[:, prompt_length:], chunk
    ):
        order.append(rows)
        rows = rows.to(sequence_ids.device)
        columns = slice(first, prompt_length + stop)
        ids, mask, length = sequence_ids[rows, columns], attention_mask[rows, columns], prompt_length - first
        resp = gather_ids(response_ids[rows, :stop], mask[:, length:], fill_id)
        with autocast():  # values come out in float32; logits in float32 or bf16 (upcast by the log-prob functions)
            if sampled is None:
                logits, values = actor_critic(ids, mask, length, temperature, fill_id)
            else:
                values = actor_critic.values(ids, mask, length, fill_id, sampled.hidden[rows, :stop])
            ref_logits = response_logits(reference, ids, mask, length, temperature, fill_id)
        if sampled is None:
            logprobs, entropy = logprobs_and_entropy(logits, resp)
            outs["logprobs"].append(pad_right(logprobs, width))
            outs["entropy"].append(pad_right(entropy, width))
        else:
            outs["logprobs"].append(sampled.logprobs[rows])
            outs["entropy"].append(sampled.entropy[rows])
        outs["values"].append(pad_right(values, width))
        outs["ref_logprobs"].append(pad_right(logprobs_from_logits(ref_logits, resp), width))
    back = torch.cat(order).argsort().to(sequence_ids.device)  # to row order
    return {k: torch.cat(v)[back] for k, v in outs.items()}


def pad_right(values: torch.Tensor, width: int) -> torch.Tensor:
    """(B, t) per-token values as (B, width): zeros after column t (padding, masked by the caller)."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


@torch.no_grad()
def collect_rollout(
    actor_critic,
    reference,
    scorer,
    tokenizer,
    prompt_ids,
    prompt_mask,
    sampling: Sampling,
    chunk: int,
    autocast=nullcontext,
    prompts: list | None = None,
    stops: list[int] | None = None,
    keys: torch.Tensor | None = None,
    clock: dict | None = None,
    scoring=lambda role: nullcontext(),
    sampler: Sampler = sample,
) -> Rollout:
    """Sample responses and fill a Rollout with old/reference log-probs, values and raw scores.

    ``autocast`` is the context of the policy's and reference's forward passes; the scorer brings its own.
    ``prompts`` (the prompts as the data gave them, strings or conversations) go to the scorer; ``stops`` are the
    tokens that end a response (default: the tokenizer's EOS); ``keys`` are the rows' noise keys
    (:func:`tether.sampling.row_keys`). A scorer returns (B,) scores; one with a ``score_steps`` method
    (``tether.rewards``' scorers) is asked for ``(raw_scores, step_scores)`` instead. ``clock``, when given, receives
    the seconds spent sampling (``time/sample``) and scoring (``time/score``: the scorer and the other passes).
    ``scoring(role)`` is the context the reward model's (``"reward"``) and then the other passes (``"reference"``)
    run in: ``model.offload_frozen`` brings that frozen role back there, one at a time. ``sampler`` draws the
    responses (:class:`tether.sampling.Sampler`); what it did not record, the policy's forward pass computes.
    """
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    stops = stops or [eos_id]
    start = time.perf_counter()
    sampled = sampler(actor_critic.policy, prompt_ids, prompt_mask, sampling, stops, keys, autocast, True)
    sampled = checked(sampled, prompt_ids, sampling, None if sampler is sample else actor_critic.policy)
    response_ids, response_mask = mask_after_eos(sampled.tokens, stops, pad_id)
    sampled_at = finished_at(prompt_ids.device)
    scored = (prompt_ids, prompt_mask, response_ids, response_mask)
    score_steps = getattr(scorer, "score_steps", None)  # scores on the tokens where steps end, besides the outcome
    with scoring("reward"):
        if score_steps is None:
            raw_scores, step_scores = scorer(*scored, tokenizer=tokenizer, prompts=prompts), None
        else:
            raw_scores, step_scores = score_steps(*scored, tokenizer=tokenizer, prompts=prompts)
    with scoring("reference"):
        rollout = build_rollout(
            actor_critic,
            reference,
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            raw_scores.float(),
            sampling.temperature,
            eos_id,
            chunk,
            autocast,
            stops,
            step_scores=step_scores,
            sampled=sampled if sampled.recorded else None,
        )
    if clock is not None:
        clock["time/sample"], clock["time/score"] = sampled_at - start, finished_at(prompt_ids.device) - sampled_at
    return rollout


def finished_at(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has done the work queued so far (a GPU runs behind the host, so a
    phase's clock would otherwise stop before its work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def build_rollout(
    actor_critic,
    reference,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    raw_scores,
    temperature: float,
    eos_id: int,
    chunk: int,
    autocast=nullcontext,
    stops: list[int] | None = None,
    step_scores: torch.Tensor | None = None,
    env_mask: torch.Tensor | None = None,
    sampled: Sampled | None = None,
) -> Rollout:
    """A Rollout for given responses and scores: old/reference log-probs, values and entropy, padding zeroed.
    ``ended`` marks responses that stopped with a token of ``stops`` (default: ``eos_id``); ``step_scores`` are
    (B, T) raw scores of steps that end before the last response token (``Rollout.step_scores``); ``env_mask``
    (B, T) marks an environment's reply tokens, attended to but zeroed like padding (``Rollout.env_mask``);
    ``sampled`` is what the sampler recorded about these responses (then the policy's trunk does not run again)."""
    ended = (is_stop(response_ids, stops or eos_id) & (response_mask == 1)).any(-1)
    sequence_ids = torch.cat([prompt_ids, response_ids], dim=1)
    seen = response_mask if env_mask is None else response_mask + env_mask
    attention_mask = torch.cat([prompt_mask, seen], dim=1)
    was_training = actor_critic.training
    actor_critic.eval()
    stats = score_tokens(
        actor_critic,
        reference,
        sequence_ids,
        attention_mask,
        prompt_ids.shape[1],
        response_ids,
        temperature,
        eos_id,
        chunk,
        autocast,
        sampled,
    )
    actor_critic.train(was_training)
    mask = response_mask.float()
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=stats["logprobs"] * mask,
        ref_logprobs=stats["ref_logprobs"] * mask,
        values=stats["values"] * mask,
        scores=raw_scores.clone(),
        raw_scores=raw_scores,
        ended=ended,
        entropy=stats["entropy"] * mask,
        step_scores=None if step_scores is None else step_scores.float() * mask,
        env_mask=env_mask,
    )
