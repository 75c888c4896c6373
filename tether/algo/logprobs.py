"""Token log-probabilities and entropies from logits, without materialising a full log-softmax.

``log p(token) = z[token] - logsumexp(z)`` and the entropy of ``softmax(z)`` is ``H = logsumexp(z) - sum p * z``
(the ``ppo/policy/entropy`` of OpenAI's lm-human-preferences, Ziegler et al. 2019). Logits in half precision
(float16 / bfloat16) are upcast to float32 one batch row at a time, so peak extra memory is one row's (T, V)
float32 copy rather than the whole (B, T, V) tensor, and results are returned in float32.

Notation: B = batch, T = response length, V = vocabulary size. Temperature scaling, if any, must be applied to the
logits by the caller (the same temperature as at sampling time).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["logprobs_from_logits", "entropy_from_logits"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _per_row_in_fp32(fn: Callable[..., torch.Tensor], logits: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to float logits; half-precision logits are upcast one leading-dim row at a time."""
    if logits.dtype not in _LOW_PRECISION:
        return fn(logits, *rest)
    rows = [fn(logits[i].float(), *(x[i] for x in rest)) for i in range(logits.shape[0])]
    return torch.stack(rows) if rows else logits.new_zeros(logits.shape[:-1], dtype=torch.float32)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    finite = logits.clamp(min=torch.finfo(logits.dtype).min)  # -inf logits (filtered vocab) have p = 0: 0 * min = 0
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits)``: ``log_softmax(logits, -1)`` gathered at tokens.

    Differentiable with respect to ``logits``.

    Args:
        logits: (B, T, V) logits, where ``logits[:, t]`` predicts ``tokens[:, t]``.
        tokens: (B, T) integer token ids.

    Returns:
        (B, T) log-probs; float32 if ``logits`` is float16/bfloat16, else the dtype of ``logits``.
    """
    return _per_row_in_fp32(_token_logprobs, logits, tokens)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution ``softmax(logits)`` at each position, in nats.

    ``H = logsumexp(z) - sum(softmax(z) * z)``. Logits of -inf (filtered tokens) are allowed and contribute 0.

    Args:
        logits: (B, T, V) logits.

    Returns:
        (B, T) entropies; float32 if ``logits`` is float16/bfloat16, else the dtype of ``logits``.
    """
    return _per_row_in_fp32(_entropy, logits)
