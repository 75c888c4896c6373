"""Where scores come from: a reward model, or any Python function ``reward_fn(prompts, responses) -> scores``.

Also the score post-processing the tutorial recommends around PPO: a missing-EOS penalty, two of its length-bias
remedies (a per-token length penalty and ``score / sqrt(length)``) and reward scaling, either per batch (the
tutorial's ``normalize_rewards``) or by running moments (MOSS "reward scaling", TRL use_score_scaling).
"""

from __future__ import annotations

import importlib
import math
from contextlib import nullcontext
from typing import Callable

import torch

from tether.data import left_pad, sequence_rows
from tether.errors import TetherError
from tether.models import sequence_scores
from tether.precision import Placement


class RewardModelScorer:
    """Scores (prompt, response) token batches with a frozen sequence-classification reward model.

    The score is read at the last real token. With ``rm_tokenizer`` (a reward model whose vocabulary differs from
    the policy's), prompts and responses are decoded and re-encoded as the reward model was trained to read them:
    ``rm_tokenizer(prompt) + rm_tokenizer(response) + EOS``; otherwise the policy's token ids are scored directly.
    With a ``placement`` the model is held frozen on its device and dtype, and scores under its autocast; without
    one it is used as it is.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        fill_id: int,
        rm_tokenizer=None,
        max_length: int = 1024,
        placement: Placement | None = None,
    ):
        self.model = placement.frozen(model) if placement is not None else model
        self.autocast = placement.autocast if placement is not None else nullcontext
        self.fill_id = fill_id
        self.rm_tokenizer = rm_tokenizer
        self.max_length = max_length

    @torch.no_grad()
    def __call__(
        self, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=None, prompts=None
    ) -> torch.Tensor:
        if self.rm_tokenizer is not None:
            return self._score_text(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, prompts)
        ids = torch.cat([prompt_ids, response_ids], dim=1)
        mask = torch.cat([prompt_mask, response_mask], dim=1)
        with self.autocast():  # scores come out in float32
            return sequence_scores(self.model, ids, mask, self.fill_id)

    def _score_text(self, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, given) -> torch.Tensor:
        """Re-encode for the reward model's own tokenizer: a conversation through its own chat template when it has
        one; otherwise the prompt text as the policy read it."""
        prompts, responses = decode_texts(tokenizer, prompt_ids, prompt_mask, response_ids, response_mask)
        rm_tok = self.rm_tokenizer
        if given is not None:
            templated = bool(getattr(rm_tok, "chat_template", None))
            prompts = [g if isinstance(g, str) or templated else p for g, p in zip(given, prompts)]
        rows = [sequence_rows(rm_tok, p, r, self.max_length)[0] for p, r in zip(prompts, responses)]
        ids, mask = left_pad(rows, rm_tok.pad_token_id)
        device = response_ids.device
        with self.autocast():
            return sequence_scores(self.model, ids.to(device), mask.to(device), rm_tok.eos_token_id)


class FunctionScorer:
    """Scores decoded text with a Python callable ``fn(prompts, responses: list[str]) -> scores``; the prompts are
    as the data gave them (strings or lists of messages) when the caller passes them, else decoded text.

    A function that raises, or returns something that is not one number per response, is a one-line
    :class:`TetherError` naming it. A NaN or inf score is passed on as NaN: the PPO trainer's non-finite guard
    replaces it with the batch's finite mean and counts it, so one bad sample does not end a long run.
    """

    def __init__(self, fn: Callable, name: str = "reward_fn"):
        self.fn = fn
        self.name = name

    def __call__(
        self, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=None, prompts=None
    ) -> torch.Tensor:
        decoded, responses = decode_texts(tokenizer, prompt_ids, prompt_mask, response_ids, response_mask)
        prompts = decoded if prompts is None else list(prompts)  # as the data gave them: strings or conversations
        where = f"reward function '{self.name}'"
        try:
            scores = self.fn(prompts, responses)
        except Exception as e:  # the user's code: any error becomes one line naming the function
            raise TetherError(f"{where} raised {_one_line(e)}") from None
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise TetherError(f"{where} must return numbers, one per response; got {_shorten(scores)}") from None
        if scores.numel() != len(prompts):
            raise TetherError(f"{where} returned {scores.numel()} scores for {len(prompts)} responses")
        scores = torch.where(torch.isfinite(scores), scores, float("nan"))
        return scores.to(response_ids.device)


def _one_line(error: Exception) -> str:
    """``'ValueError: first line of the message'`` (just the type when the message is empty)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _shorten(value, width: int = 60) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def decode_texts(tokenizer, prompt_ids, prompt_mask, response_ids, response_mask) -> tuple[list[str], list[str]]:
    """(prompts, responses) as text: left-padded prompts and right-padded responses, without special tokens."""
    prompts = [
        tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(prompt_ids, prompt_mask)
    ]
    return prompts, decode_responses(tokenizer, response_ids, response_mask)


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response texts without padding and special tokens."""
    return [
        tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True)
        for row, n in zip(response_ids, response_mask.sum(-1))
    ]


def load_reward_function(spec: str) -> Callable:
    """Import ``module:function`` (importable from the current folder or sys.path), or ``path/to/file.py:function``."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise TetherError(f"reward function '{spec}': expected 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        module = _module_from_file(spec, module_name)
    else:
        import sys

        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise TetherError(f"reward function '{spec}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TetherError(f"reward function '{spec}': '{attr}' is not a callable in '{module_name}'")
    return fn


def _module_from_file(spec: str, path: str):
    """Run a Python file as a module (its own folder importable while it loads)."""
    import importlib.util
    import sys
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise TetherError(f"reward function '{spec}': no such file '{path}'")
    module_spec = importlib.util.spec_from_file_location(f"tether_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error becomes one line naming it
        raise TetherError(f"reward function '{spec}': loading '{path}' raised {_one_line(e)}") from None
    finally:
        sys.path.remove(str(file.resolve().parent))
    return module


class RunningMoments:
    """Running mean and standard deviation of all scores seen so far (parallel/Welford merge of batch moments)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def transform_scores(
    raw: torch.Tensor,
    ended: torch.Tensor,
    lengths: torch.Tensor,
    *,
    missing_eos_penalty: float | None,
    length_penalty: float,
    score_norm: str,
    score_clip: float | None,
    moments: RunningMoments,
    length_norm: str = "none",
) -> torch.Tensor:
    """The score PPO optimises, from the raw scores of one rollout batch, in this order (docs/algorithm.md step 2):

    1. ``length_norm='sqrt'``: ``raw / sqrt(length)`` (the tutorial's length remedy 2, applied to the raw score);
    2. penalties: ``- missing_eos_penalty * [no EOS] - length_penalty * length`` (in the units they are given in);
    3. ``score_norm``: 'batch' ``(s - mean) / (std + 1e-8)`` (the tutorial's ``normalize_rewards``), 'batch_scale'
       the same plus the batch mean (whitened without shifting the mean), 'scale' ``s / running_std``, 'norm'
       ``(s - running_mean) / running_std``; batch statistics use torch's (Bessel-corrected) std, as the tutorial;
    4. ``score_clip``: clamp to ``[-score_clip, score_clip]``.

    NaN/inf scores stay NaN and are left out of every statistic, so one bad sample cannot poison the running moments.

    Args:
        raw: (B,) scores from the reward model or function.
        ended: (B,) bool, True where the response stopped with EOS.
        lengths: (B,) response lengths in tokens (EOS included).
        moments: the running moments 'scale' and 'norm' update and read.

    Returns:
        (B,) float32 scores.
    """
    scores = raw.float().clone()
    if length_norm == "sqrt":
        scores = scores / lengths.float().clamp(min=1).sqrt()
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended).float()
    if length_penalty:
        scores = scores - length_penalty * lengths.float()
    finite = scores[torch.isfinite(scores)]
    if score_norm in ("batch", "batch_scale"):
        mean = finite.mean() if finite.numel() else 0.0
        std = finite.std() if finite.numel() > 1 else 0.0  # torch.std is Bessel-corrected, as the tutorial's
        shifted = (scores - mean) / (std + 1e-8)
        scores = shifted if score_norm == "batch" else shifted + mean
    elif score_norm in ("scale", "norm"):
        if finite.numel():
            moments.update(finite)
        if score_norm == "norm":
            scores = scores - moments.mean
        scores = scores / (moments.std + 1e-8)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    return scores
