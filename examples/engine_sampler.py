"""A sampler in tether's place: the shape an inference engine's client takes (docs/algorithm.md, "Another sampler in
tether's place").

    tether ppo ... sampling.sampler=examples/engine_sampler.py:GenerateSampler

``GenerateSampler`` draws with ``transformers``' ``generate``, so it runs anywhere tether does; it is slower than
tether's own sampler and is here as a template. An engine (vLLM, SGLang) would go where ``generate`` is called: load
the policy's current weights into it (the policy comes with every call, and its weights change after every update),
send it the prompts, and hand back the token ids it drew. tether takes only the tokens: the policy's own forward pass
computes the log-probs PPO needs, so the engine's kernels never enter PPO's ratio.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from tether.sampling import Sampled


class GenerateSampler:
    """Draws each row's response with ``model.generate`` and returns them as token lists, as an engine would."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, prompt_ids, prompt_mask, sampling, stops, keys, autocast, record):
        self.calls += 1
        # exactly the distribution PPO scores: none of the model's own generation defaults (repetition penalty ...)
        config = GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_new_tokens=sampling.min_new_tokens,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
        # the padding's id may lie outside the vocabulary (tether's models never embed it): any real id will do under
        # the mask; an engine would take each row's real tokens, prompt_ids[i][prompt_mask[i] == 1]
        ids = prompt_ids.masked_fill(prompt_mask == 0, stops[0])
        with torch.no_grad(), autocast():
            out = model.generate(input_ids=ids, attention_mask=prompt_mask, generation_config=config)
        responses = [to_first_stop(row, stops) for row in out[:, prompt_ids.shape[1] :].tolist()]
        return Sampled.of_responses(responses, stops[0], prompt_ids.device)


def to_first_stop(ids: list[int], stops: list[int]) -> list[int]:
    """A response's tokens up to and including its first stop token (all of them if it has none)."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids
