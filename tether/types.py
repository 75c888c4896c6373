"""Batch containers. Notation: B = batch, P = prompt length (left-padded), T = response length (right-padded)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Rollout:
    """One PPO rollout batch: what was sampled and everything computed about it without gradients."""

    prompt_ids: torch.Tensor  # (B, P) left-padded prompt tokens
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) sampled tokens, pad after EOS
    response_mask: torch.Tensor  # (B, T) 1 where a response token counts (up to and including EOS)
    logprobs: torch.Tensor  # (B, T) log pi_old(a_t | s_t) at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(a_t | s_t) at the same temperature
    values: torch.Tensor  # (B, T) V(s_t) at rollout time
    scores: torch.Tensor  # (B,) reward score after scaling and penalties
    raw_scores: torch.Tensor  # (B,) reward score as the reward model (or function) gave it
    ended: torch.Tensor  # (B,) True where the response stopped with EOS
    entropy: torch.Tensor  # (B, T) entropy of pi_old(. | s_t)
    step_scores: torch.Tensor | None = None  # (B, T) raw scores of steps that end before the last token, else 0
    env_mask: torch.Tensor | None = None  # (B, T) 1 on an environment's reply tokens: read, never trained on
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate to the reference
    rewards: torch.Tensor | None = None  # (B, T) shaped reward: -kl_coef * kl, + score on the last token, + steps
    advantages: torch.Tensor | None = None  # (B, T) GAE advantages (whitened if configured)
    returns: torch.Tensor | None = None  # (B, T) value targets: GAE advantages + values

    @property
    def sequence_ids(self) -> torch.Tensor:
        """(B, P + T) prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T) 1 on real prompt and response tokens (an environment's replies included)."""
        seen = self.response_mask if self.env_mask is None else self.response_mask + self.env_mask
        return torch.cat([self.prompt_mask, seen], dim=1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows ``index`` of every tensor field (a minibatch)."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v[index] for k, v in picked.items() if isinstance(v, torch.Tensor)})

    def trimmed(self, span: tuple[int, int] | None = None) -> Rollout:
        """The same rows without the columns that are padding in every row: the prompt's leading ones and the
        response's trailing ones (at least one response column stays). Nothing that counts reads them: padding is
        masked out of attention and keeps no position (``position_ids`` count real tokens), a causal model's output
        at a position never depends on later tokens, and every loss and statistic is masked by ``response_mask``.
        ``span``: :func:`used_span` of these rows when the caller has it (from masks it already read back)."""
        start, stop = span or used_span(self.prompt_mask, self.response_mask)
        if start == 0 and stop == self.response_ids.shape[1]:
            return self
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        cut = {k: v[:, start:] if k.startswith("prompt_") else v[:, :stop] for k, v in picked.items() if is_columns(v)}
        return replace(self, **cut)


def used_span(prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)``: the first prompt column and one past the last response column that hold a real token in
    some row (the prompt's last column and the first response column always stay); masks on a device are read back."""
    width = prompt_mask.shape[1]
    columns = torch.cat([prompt_mask.any(0), response_mask.any(0)]).cpu().nonzero().flatten().tolist()
    start = min(next((c for c in columns if c < width), width), width - 1)
    return start, max((c - width + 1 for c in columns if c >= width), default=1)


def by_length(attention_mask: torch.Tensor) -> torch.Tensor:
    """The rows' indices (a CPU tensor) from the fewest real tokens to the most, ties in row order: cut into
    consecutive groups, rows of like length share their padding."""
    return torch.sort(attention_mask.sum(1).cpu(), stable=True).indices


def length_groups(prompt_mask: torch.Tensor, response_mask: torch.Tensor, size: int):
    """``(rows, span)`` for groups of ``size`` rows taken in order of length (:func:`by_length`), ``span`` the
    group's :func:`used_span`: micro-batches and scoring chunks that share their padding and drop what is left of it.
    The masks are read back once, not per group."""
    masks = torch.cat([prompt_mask, response_mask], 1).cpu()
    prompt_mask, response_mask = masks.split([prompt_mask.shape[1], response_mask.shape[1]], 1)
    order = by_length(masks)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        yield rows, used_span(prompt_mask[rows], response_mask[rows])


def is_columns(value) -> bool:
    """Whether a Rollout field is a (B, P) or (B, T) tensor (rather than one value per row, or absent)."""
    return isinstance(value, torch.Tensor) and value.dim() == 2


@dataclass
class PreferenceBatch:
    """Chosen and rejected sequences stacked as one batch: rows [0, B) chosen, rows [B, 2B) rejected."""

    input_ids: torch.Tensor  # (2B, L) left-padded prompt + response + EOS
    attention_mask: torch.Tensor  # (2B, L) 1 on real tokens

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2
