"""Where scores come from: a reward model, or any Python function ``reward_fn(prompts, responses) -> scores``.

Also the score post-processing the tutorial recommends around PPO: a missing-EOS penalty, two of its length-bias
remedies (a per-token length penalty and ``score / sqrt(length)``) and reward scaling, either per batch (the
tutorial's ``normalize_rewards``) or by running moments (MOSS "reward scaling", TRL use_score_scaling).
"""

from __future__ import annotations

import bisect
import importlib
import math
import operator
import os
from contextlib import nullcontext
from typing import Callable

import torch

from tether.data import left_pad, sequence_rows
from tether.errors import TetherError
from tether.passes import sequence_scores, token_scalars
from tether.precision import Placement


class RewardModelScorer:
    """Scores (prompt, response) token batches with a frozen sequence-classification reward model.

    The score is read at the last real token. With ``rm_tokenizer`` (a reward model whose vocabulary differs from
    the policy's), prompts and responses are decoded and re-encoded as the reward model was trained to read them:
    ``rm_tokenizer(prompt) + rm_tokenizer(response) + EOS``; otherwise the policy's token ids are scored directly.
    With a ``placement`` the model is held frozen on its device and dtype, and scores under its autocast; without
    one it is used as it is. With ``step_id`` (``model.step_marker``: a reward model that scores steps) the score is
    also read at every earlier response token equal to it, as a step score (:meth:`score_steps`); this needs the
    policy's tokens, so not with ``rm_tokenizer``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        fill_id: int,
        rm_tokenizer=None,
        max_length: int = 1024,
        placement: Placement | None = None,
        step_id: int | None = None,
    ):
        if step_id is not None and rm_tokenizer is not None:
            raise TetherError("model.step_marker needs a reward model that reads the policy's tokens (its tokenizer)")
        self.model = placement.frozen(model) if placement is not None else model
        self.autocast = placement.autocast if placement is not None else nullcontext
        self.fill_id = fill_id
        self.rm_tokenizer = rm_tokenizer
        self.max_length = max_length
        self.step_id = step_id

    @torch.no_grad()
    def __call__(
        self, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=None, prompts=None
    ) -> torch.Tensor:
        """(B,) scores at the last real token (plus the step scores, with ``step_id``)."""
        if self.step_id is not None:
            raw_scores, step_scores = self.score_steps(prompt_ids, prompt_mask, response_ids, response_mask)
            return raw_scores if step_scores is None else raw_scores + step_scores.sum(-1)
        if self.rm_tokenizer is not None:
            return self._score_text(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, prompts)
        ids = torch.cat([prompt_ids, response_ids], dim=1)
        mask = torch.cat([prompt_mask, response_mask], dim=1)
        with self.autocast():  # scores come out in float32
            return sequence_scores(self.model, ids, mask, self.fill_id, prompt_ids.shape[1] - 1)

    @torch.no_grad()
    def score_steps(
        self, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=None, prompts=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(raw_scores, step_scores)``: (B,) scores at the last real token, and with ``step_id`` the (B, T) scores
        at the response tokens before it that equal ``step_id`` (0 elsewhere; None when there are none)."""
        if self.step_id is None:
            return self(prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, prompts), None
        ids = torch.cat([prompt_ids, response_ids], dim=1)
        mask = torch.cat([prompt_mask, response_mask], dim=1)
        with self.autocast():
            per_token = token_scalars(self.model, ids, mask, self.fill_id)  # (B, P + T) float32
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = (positions * mask.long()).argmax(-1)  # as sequence_scores reads it
        marked = (ids == self.step_id) & (mask == 1) & (positions < last[:, None])
        marked[:, : prompt_ids.shape[1]] = False
        step_scores = torch.where(marked, per_token, 0.0)[:, prompt_ids.shape[1] :]
        return per_token.gather(1, last[:, None]).squeeze(1), step_scores if marked.any() else None

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

    Per response the function returns a number (the outcome score, on the last response token) or a list of
    ``(end, score)`` step pairs, mixed freely within a batch. ``end`` is an exclusive character offset into the
    response text, like a slice end: the step is ``response[:end]``, its last character is ``end - 1``, and its
    score lands on the response token that holds that character (:func:`char_ends`). ``end = len(response)`` lands
    on the last response token (its EOS when it has one), so ``[(len(r), s)]`` means the same as ``s``. A pair
    that lands on the last response token is the outcome score (penalties and normalisation apply to it); the
    others are step scores, added to the per-token rewards as given; pairs on one token add up, and a list without
    a pair on the last token has outcome 0.

    A function that raises, or returns anything else (not one number or list of pairs per response, an ``end``
    that is not an int in ``1..len(response)``), is a one-line :class:`TetherError` naming it and the response.
    A NaN or inf score is passed on as a NaN outcome (a non-finite step score too; that response's step scores
    become 0): the PPO trainer's non-finite guard replaces it with the batch's finite mean and counts it, so one
    bad sample does not end a long run.
    """

    def __init__(self, fn: Callable, name: str = "reward_fn"):
        self.fn = fn
        self.name = name

    def __call__(
        self, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=None, prompts=None
    ) -> torch.Tensor:
        """(B,) each response's total: its outcome plus its step scores (what a gold judge or an evaluation reads)."""
        raw_scores, step_scores = self.score_steps(
            prompt_ids, prompt_mask, response_ids, response_mask, tokenizer, prompts
        )
        return raw_scores if step_scores is None else raw_scores + step_scores.sum(-1)

    def score_steps(
        self, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer=None, prompts=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(raw_scores, step_scores)``: (B,) outcome scores and (B, T) step scores where steps end before the last
        response token (0 elsewhere), or None when no response has such a step."""
        decoded, responses = decode_texts(tokenizer, prompt_ids, prompt_mask, response_ids, response_mask)
        prompts = decoded if prompts is None else list(prompts)  # as the data gave them: strings or conversations
        where = f"reward function '{self.name}'"
        try:
            returned = self.fn(prompts, responses)
        except Exception as e:  # the user's code: any error becomes one line naming the function
            raise TetherError(f"{where} raised {_one_line(e)}") from None
        device = response_ids.device
        if not (isinstance(returned, (list, tuple)) and any(_is_steps(v) for v in returned)):
            return _numbers(returned, len(prompts), where).to(device), None
        if len(returned) != len(prompts):
            raise TetherError(f"{where} returned {len(returned)} scores for {len(prompts)} responses")
        raw_scores = torch.zeros(len(prompts))
        step_scores = torch.zeros(response_ids.shape, dtype=torch.float32)
        lengths = response_mask.sum(-1).tolist()
        for i, value in enumerate(returned):
            if not _is_steps(value):
                raw_scores[i] = _number(value, f"{where}: response {i}")
                continue
            pairs = _pairs(value, len(responses[i]), f"{where}: response {i}")
            ends = char_ends(tokenizer, response_ids[i, : int(lengths[i])].tolist()) if pairs else []
            for end, score in pairs:
                token = len(ends) - 1 if end == len(responses[i]) else bisect.bisect_right(ends, end - 1)
                if token >= len(ends) - 1:
                    raw_scores[i] += score
                else:
                    step_scores[i, token] += score
            if not torch.isfinite(step_scores[i]).all():
                raw_scores[i], step_scores[i] = float("nan"), 0.0  # the sample loses its signal; the guard counts it
        raw_scores = torch.where(torch.isfinite(raw_scores), raw_scores, float("nan"))
        has_steps = bool(step_scores.ne(0).any())
        return raw_scores.to(device), step_scores.to(device) if has_steps else None


def char_ends(tokenizer, ids: list[int]) -> list[int]:
    """For each token k of a response, how many characters of the response text tokens 0..k complete (the text
    decoded without special tokens, as the reward function sees it). The token holding character c is the first k
    with ``ends[k] > c`` (``bisect_right(ends, c)``).

    ``ends[k]`` is the longest prefix that the decoded tokens 0..k share with the whole text, never decreasing: a
    token that decodes to nothing (EOS) completes no character, and a character split across tokens (a multi-byte
    character in byte-level BPE, decoded as U+FFFD until complete) belongs to the token that completes it.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    prefixes = tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True)
    ends, done = [], 0
    for prefix in prefixes:
        shared = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
        done = max(done, shared)
        ends.append(done)
    return ends


def _is_steps(value) -> bool:
    """Whether one response's return is a list of step pairs (a list or tuple whose items are lists or tuples)."""
    return isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in value)


def _numbers(returned, count: int, where: str) -> torch.Tensor:
    """(count,) float32 scores from a return of one number per response (non-finite ones as NaN)."""
    try:
        scores = torch.as_tensor(returned, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise TetherError(f"{where} must return numbers, one per response; got {_shorten(returned)}") from None
    if scores.numel() != count:
        raise TetherError(f"{where} returned {scores.numel()} scores for {count} responses")
    return torch.where(torch.isfinite(scores), scores, float("nan"))


def _number(value, where: str, what: str = "a number or a list of (end, score) pairs") -> float:
    """``float(value)`` for a number (not a string), else a one-line error saying what was expected."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise TetherError(f"{where}: expected {what}; got {_shorten(value)}") from None


def _pairs(value, length: int, where: str) -> list[tuple[int, float]]:
    """The ``(end, score)`` pairs of one response, checked: ``end`` an int in ``1..length``, ``score`` a number."""
    pairs = []
    for pair in value:
        if len(pair) != 2:
            raise TetherError(f"{where}: expected (end, score) pairs; got {_shorten(pair)}")
        try:
            end = operator.index(pair[0])
        except TypeError:
            raise TetherError(
                f"{where}: a step end must be an int character offset; got {_shorten(pair[0])}"
            ) from None
        if not 1 <= end <= length:
            raise TetherError(f"{where}: step end {end} is outside 1..{length} (the response has {length} characters)")
        pairs.append((end, _number(pair[1], where, "a number as the step score")))
    return pairs


def step_token(tokenizer, marker: str) -> int:
    """The id of ``model.step_marker``, which must be exactly one token of the policy's tokenizer."""
    ids = tokenizer.encode(marker, add_special_tokens=False)
    if len(ids) != 1:
        raise TetherError(
            f"model.step_marker {marker!r} is {len(ids)} tokens of the policy's tokenizer; it must be one"
        )
    return ids[0]


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
    """Response texts without padding and special tokens: the tokens the policy sampled (a multi-turn episode's
    environment replies, which ``response_mask`` leaves out, are left out here too)."""
    rows = zip(response_ids, response_mask)
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in rows]


def load_reward_function(spec: str) -> Callable:
    """Import ``module:function`` (importable from the current folder or sys.path), or ``path/to/file.py:function``."""
    return load_callable(spec, "reward function", "function")


def load_callable(spec: str, what: str, kind: str) -> Callable:
    """Import ``module:name`` or ``path/to/file.py:name`` and return that callable. Errors are one-line
    :class:`TetherError` s naming ``what`` (``'reward function'``, ``'ppo.env'``) and the ``kind`` expected."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise TetherError(f"{what} '{spec}': expected 'module:{kind}' or 'file.py:{kind}'")
    if module_name.endswith(".py"):
        module = _module_from_file(spec, module_name, what)
    else:
        import sys

        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise TetherError(f"{what} '{spec}': cannot import module '{module_name}' ({e})") from None
        except Exception as e:  # the user's module: any error while it loads becomes one line naming it
            raise TetherError(f"{what} '{spec}': importing '{module_name}' raised {_one_line(e)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TetherError(f"{what} '{spec}': '{attr}' is not a callable in '{module_name}'")
    return fn


def _module_from_file(spec: str, path: str, what: str = "reward function"):
    """Run a Python file as a module (its own folder importable while it loads)."""
    import importlib.util
    import sys
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise TetherError(f"{what} '{spec}': no such file '{path}'")
    module_spec = importlib.util.spec_from_file_location(f"tether_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error becomes one line naming it
        raise TetherError(f"{what} '{spec}': loading '{path}' raised {_one_line(e)}") from None
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
