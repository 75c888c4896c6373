"""Evaluate a policy on held-out prompts: reward-model score, an optional gold judge, KL to the reference, length."""

from __future__ import annotations

import torch

from tether.algo import logprobs_from_logits
from tether.data import prompt_batch
from tether.passes import gather_ids, response_logits
from tether.precision import Placement
from tether.rewards import decode_responses
from tether.rollout import Sampling, generate, is_stop, stop_ids


@torch.no_grad()
def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts: list,
    sampling: Sampling,
    *,
    placement: Placement,
    scorer=None,
    judge=None,
    samples_per_prompt: int = 1,
    batch_size: int = 128,
    max_prompt_length: int = 128,
    seed: int = 0,
) -> dict:
    """Sample ``samples_per_prompt`` responses per prompt and average the measurements over all of them.

    Returns a dict with ``rm_score`` (if ``scorer``), ``gold`` (if ``judge(prompts, responses) -> scores``),
    ``kl`` (mean over responses of the summed per-token log pi - log pi_ref, at the sampling temperature; only with
    a ``reference``: ``reference=None`` skips its forward passes), ``length`` (response tokens including EOS),
    ``ended`` (fraction that stopped) and the ``samples`` themselves: one dict per response, in prompt order
    (each prompt's ``samples_per_prompt`` responses together), with ``prompt``, ``response`` and, when measured,
    its own ``rm_score`` and ``gold``. Prompts go to ``placement``'s device (where the models are) and forward
    passes run under its autocast.
    """
    torch.manual_seed(seed)
    stops = stop_ids(tokenizer, policy)
    texts, rm, gold, kl, lengths, ended = [], [], [], [], [], []
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    for i in range(0, len(all_prompts), batch_size):
        chunk = all_prompts[i : i + batch_size]
        prompt_ids, prompt_mask = map(placement.move, prompt_batch(tokenizer, chunk, max_prompt_length))
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        response_ids, response_mask = generate(
            policy, prompt_ids, prompt_mask, sampling, stops, pad, placement.autocast
        )
        ids = torch.cat([prompt_ids, response_ids], 1)
        mask = torch.cat([prompt_mask, response_mask], 1)
        p = prompt_ids.shape[1]
        if reference is not None:
            targets = gather_ids(response_ids, response_mask, eos)
            with placement.autocast():  # the log-prob functions upcast bf16 logits
                logits = response_logits(policy, ids, mask, p, sampling.temperature, eos)
                ref_logits = response_logits(reference, ids, mask, p, sampling.temperature, eos)
            logp, ref = logprobs_from_logits(logits, targets), logprobs_from_logits(ref_logits, targets)
            kl.append(((logp - ref) * response_mask).sum(-1))
        lengths.append(response_mask.sum(-1).float())
        ended.append((is_stop(response_ids, stops) & (response_mask == 1)).any(-1).float())
        responses = decode_responses(tokenizer, response_ids, response_mask)
        texts += responses
        if scorer is not None:
            rm.append(scorer(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=tokenizer, prompts=chunk))
        if judge is not None:
            gold += list(judge(chunk, responses))
    samples = [{"prompt": p, "response": r} for p, r in zip(all_prompts, texts)]
    result = {
        "length": torch.cat(lengths).mean().item(),
        "ended": torch.cat(ended).mean().item(),
        "samples": samples,
    }
    if reference is not None:
        result = {"kl": torch.cat(kl).mean().item(), **result}
    if scorer is not None:
        scores = torch.cat(rm).float()
        result["rm_score"] = scores.mean().item()
        for sample, score in zip(samples, scores.tolist()):
            sample["rm_score"] = score
    if judge is not None:
        result["gold"] = sum(gold) / len(gold)
        for sample, score in zip(samples, gold):
            sample["gold"] = float(score)
    return result
