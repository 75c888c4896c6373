"""Token log-probabilities and entropies from logits, without materialising a full log-softmax.

``log p(token) = log_softmax(z)[token]`` and the entropy of ``softmax(z)`` is ``H = -sum p log p`` (the
``ppo/policy/entropy`` of OpenAI's lm-human-preferences, Ziegler et al. 2019). Both walk the logits a block of rows
at a time (about :data:`CHUNK_ELEMENTS` values), so the passes over a block find it in the CPU's cache instead of
main memory, and no (B, T, V) temporary is made: the log-probs' backward writes ``g (onehot - softmax(z))`` straight
into the gradient. :func:`logprobs_and_entropy` gives both from one log-softmax per block. Logits in half precision
(float16 / bfloat16) are upcast to float32 a block at a time inside the forward and again inside the backward, which
keeps the half-precision logits, not a float32 copy, for it and writes the gradient in their dtype (each value
rounded once, as a float32 computation cast back would); results are returned in float32. (:func:`entropy_from_logits`
upcasts one batch row at a time: one row's (T, V) float32 copy at most.)

Notation: B = batch, T = response length, V = vocabulary size. Temperature scaling, if any, must be applied to the
logits by the caller (the same temperature as at sampling time).
"""

from __future__ import annotations

import torch

__all__ = ["logprobs_from_logits", "entropy_from_logits", "logprobs_and_entropy"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
CHUNK_ELEMENTS = 1 << 20  # logits per block of rows on the CPU (4 MiB in float32: the cache); at least one row
DEVICE_CHUNK_ELEMENTS = 1 << 26  # elsewhere (a GPU): big blocks, few kernel launches, a bounded temporary


def _blocks(logits: torch.Tensor) -> list[slice]:
    """Row ranges of (N, V) ``logits`` of about ``CHUNK_ELEMENTS`` values each (``DEVICE_CHUNK_ELEMENTS`` off the
    CPU)."""
    rows, width = logits.shape
    size = CHUNK_ELEMENTS if logits.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    step = max(1, size // max(width, 1))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last dim of log-probs; -inf entries (filtered tokens, p = 0) contribute 0."""
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


class _TokenLogprobs(torch.autograd.Function):
    """(N,) log-probs of ``tokens`` under (N, V) ``logits`` and, if asked, their (N,) entropies (no gradient), in
    float32 for half-precision logits (upcast a block at a time)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool):
        dtype = torch.float32 if logits.dtype in _LOW_PRECISION else logits.dtype
        picked = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        entropy = torch.empty(logits.shape[0] if with_entropy else 0, dtype=dtype, device=logits.device)
        for rows in _blocks(logits):
            logp = torch.log_softmax(logits[rows].to(dtype), -1)
            picked[rows] = logp.gather(-1, tokens[rows, None]).squeeze(-1)
            if with_entropy:
                entropy[rows] = _entropy_of(logp)
        ctx.save_for_backward(logits, tokens)
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        logits, tokens = ctx.saved_tensors
        out = torch.empty_like(logits)
        if logits.dtype == grad.dtype:  # written in place: one pass per block, then the tokens' one-hot part
            for rows in _blocks(logits):
                torch.mul(torch.softmax(logits[rows], -1), -grad[rows, None], out=out[rows])
            return out.scatter_add_(-1, tokens[:, None], grad[:, None]), None, None
        for rows in _blocks(logits):  # half precision: each block in float32, rounded once as it is stored
            part = torch.softmax(logits[rows].to(grad.dtype), -1).mul_(-grad[rows, None])
            out[rows] = part.scatter_add_(-1, tokens[rows, None], grad[rows, None])
        return out, None, None


def _per_row_in_fp32(fn, logits: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn(logits, *rest)``, a tuple of (...) tensors; half-precision logits are upcast one leading-dim row at a time
    (an empty batch at once)."""
    if logits.dtype not in _LOW_PRECISION or logits.shape[0] == 0:
        return fn(logits.float() if logits.dtype in _LOW_PRECISION else logits, *rest)
    rows = [fn(logits[i].float(), *(x[i] for x in rest)) for i in range(logits.shape[0])]
    return tuple(torch.stack(parts) for parts in zip(*rows))


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, ...]:
    """(log-probs, entropies or an empty tensor) of (..., V) logits (float32 for half precision)."""
    flat = logits.reshape(-1, logits.shape[-1])
    logp, entropy = _TokenLogprobs.apply(flat, tokens.reshape(-1).long(), with_entropy)
    return logp.view(tokens.shape), entropy.view(tokens.shape) if with_entropy else entropy


def _entropy(logits: torch.Tensor) -> tuple[torch.Tensor]:
    flat = logits.reshape(-1, logits.shape[-1])
    parts = [_entropy_of(torch.log_softmax(flat[rows], -1)) for rows in _blocks(flat)]
    return (torch.cat(parts).view(logits.shape[:-1]) if parts else flat.new_zeros(logits.shape[:-1]),)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits)``: ``log_softmax(logits, -1)`` gathered at tokens.

    Differentiable with respect to ``logits``.

    Args:
        logits: (B, T, V) logits, where ``logits[:, t]`` predicts ``tokens[:, t]``.
        tokens: (B, T) integer token ids.

    Returns:
        (B, T) log-probs; float32 if ``logits`` is float16/bfloat16, else the dtype of ``logits``.
    """
    return _token_logprobs(logits, tokens, with_entropy=False)[0]


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`logprobs_from_logits` (differentiable) and :func:`entropy_from_logits` (not), in one pass.

    Returns:
        ((B, T) log-probs, (B, T) entropies), float32 for float16/bfloat16 logits.
    """
    return _token_logprobs(logits, tokens, with_entropy=True)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution ``softmax(logits)`` at each position, in nats.

    ``H = -sum p log p``. Logits of -inf (filtered tokens) are allowed and contribute 0. Differentiable.

    Args:
        logits: (B, T, V) logits.

    Returns:
        (B, T) entropies; float32 if ``logits`` is float16/bfloat16, else the dtype of ``logits``.
    """
    return _per_row_in_fp32(_entropy, logits)[0]
