"""Step 1 of the PPO loop: sample responses and compute, without gradients, everything PPO needs about them.

Sampling uses Hugging Face ``generate`` with a KV cache. Log-probs are then recomputed with the same forward pass
the update uses (temperature-scaled logits), so the first minibatch of the first epoch has ratio exactly 1
(ppo_details #9, #16). The forward passes run in ``autocast()`` (a :meth:`tether.precision.Placement.autocast`: bf16
autocast for ``model.dtype=bfloat16``); log-probs and entropies are computed from float32 logits outside it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from tether.algo import entropy_from_logits, logprobs_from_logits
from tether.models import ActorCritic, gather_ids, model_inputs, response_logits
from tether.types import Rollout


@dataclass
class Sampling:
    """How responses are drawn (the fields of SamplingConfig the sampler reads)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@torch.no_grad()
def generate(policy, prompt_ids, prompt_mask, sampling: Sampling, eos_id: int, pad_id: int, autocast=nullcontext):
    """Sample one response per prompt. Returns (response_ids, response_mask), both (B, T), right-padded.

    The response keeps its EOS (and ``response_mask`` covers it); tokens after EOS become ``pad_id``. Sampling runs
    in the ``autocast()`` context.
    """
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        eos_token_id=eos_id,
        pad_token_id=eos_id,  # finished rows are filled with EOS inside generate; replaced by pad below
    )
    was_training = policy.training
    policy.eval()
    inputs = model_inputs(prompt_ids, prompt_mask, eos_id)
    inputs.pop("position_ids")  # generate derives positions from the attention mask itself (ppo_details #11)
    with autocast():
        out = policy.generate(**inputs, generation_config=config)
    policy.train(was_training)
    response_ids = out[:, prompt_ids.shape[1] :]
    return mask_after_eos(response_ids, eos_id, pad_id)


def mask_after_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int):
    """(ids, mask) with mask 1 up to and including the first EOS, ids set to ``pad_id`` after it."""
    is_eos = response_ids == eos_id
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
):
    """Old log-probs, reference log-probs, values and entropy (all (B, T)), computed in chunks of ``chunk`` rows."""
    outs = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    for start in range(0, sequence_ids.shape[0], chunk):
        rows = slice(start, start + chunk)
        ids, mask = sequence_ids[rows], attention_mask[rows]
        resp = gather_ids(response_ids[rows], mask[:, prompt_length:], fill_id)
        with autocast():  # logits and values come out in float32
            logits, values = actor_critic(ids, mask, prompt_length, temperature, fill_id)
            ref_logits = response_logits(reference, ids, mask, prompt_length, temperature, fill_id)
        outs["logprobs"].append(logprobs_from_logits(logits, resp))
        outs["entropy"].append(entropy_from_logits(logits))
        outs["values"].append(values)
        outs["ref_logprobs"].append(logprobs_from_logits(ref_logits, resp))
    return {k: torch.cat(v) for k, v in outs.items()}


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
) -> Rollout:
    """Generate responses and fill a Rollout with old/reference log-probs, values and raw scores.

    ``autocast`` is the context of the policy's and reference's forward passes; the scorer brings its own.
    """
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    response_ids, response_mask = generate(
        actor_critic.policy, prompt_ids, prompt_mask, sampling, eos_id, pad_id, autocast
    )
    raw_scores = scorer(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=tokenizer).float()
    return build_rollout(
        actor_critic,
        reference,
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        raw_scores,
        sampling.temperature,
        eos_id,
        chunk,
        autocast,
    )


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
) -> Rollout:
    """A Rollout for given responses and scores: old/reference log-probs, values and entropy, padding zeroed."""
    ended = ((response_ids == eos_id) & (response_mask == 1)).any(-1)
    sequence_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
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
    )
