"""``PPOTrainer.generate``'s Hugging Face keyword arguments, checked and turned into tether's sampler settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tether.legacy.errors import LegacyValueError
from tether.rollout import Sampling, merge_stops

# generate() kwargs tether honours (docs/migration.md, "generate(...)"); length_sampler, batch_size, return_prompt,
# generate_ref_response and remove_padding are named parameters
GENERATE_KWARGS = (
    "max_new_tokens",
    "min_new_tokens",
    "min_length",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "eos_token_id",
    "pad_token_id",
)
# generate() kwargs that only concerned TRL's batching or Hugging Face's outputs: accepted, no effect on the samples
GENERATE_IGNORED = ("use_cache", "synced_gpus", "output_scores", "pad_to_multiple_of")
_OFF_POLICY = (
    "tether's sampler has no repetition processors, and PPO scores the unpenalised policy (off-policy samples)"
)
# generate() kwargs refused unless they have a value that changes nothing: name -> (those values, the reason)
GENERATE_REFUSED = {
    "num_beams": ((None, 1), "beam search is not sampling, and PPO needs responses sampled from the policy"),
    "num_return_sequences": ((None, 1), "one response per query; repeat a query to sample it several times"),
    "repetition_penalty": ((None, 1.0), _OFF_POLICY),
    "no_repeat_ngram_size": ((None, 0), _OFF_POLICY),
    "return_dict_in_generate": ((None, False), "generate returns token tensors only, as TRL's batched generate did"),
}


def whole(value, name: str, lowest: int | None = 0) -> int:
    """``value`` as an int (a whole float such as TRL's ``top_k=0.0`` is fine); LegacyValueError if not whole or
    below ``lowest``."""
    try:
        number = int(value)
        ok = number == value and (lowest is None or number >= lowest) and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        bound = "" if lowest is None else f" >= {lowest}"
        raise LegacyValueError(f"generate: {name} must be a whole number{bound}, got {value!r}")
    return number


def _sampling(kw: dict) -> Sampling:
    """The sampler's settings from ``generate``'s kwargs; ``do_sample=False`` is greedy (sampling from the top-1)."""
    max_new = whole(kw.get("max_new_tokens", 32), "max_new_tokens", lowest=1)
    min_new = whole(kw.get("min_new_tokens") or 0, "min_new_tokens")
    if not kw.get("do_sample", True):
        return Sampling(max_new, 1.0, 1.0, 1, min_new)
    temperature, top_p = kw.get("temperature", 1.0), kw.get("top_p", 1.0)
    if temperature is None or temperature <= 0:
        raise LegacyValueError(f"generate: temperature must be > 0, got {temperature}")
    top_k = whole(kw.get("top_k") or 0, "top_k")  # 0 (or TRL's 0.0): off
    return Sampling(max_new, float(temperature), float(1.0 if top_p is None else top_p), top_k, min_new)


@dataclass
class Generation:
    """What ``generate``'s kwargs ask for: sampler settings, HF's ``min_length``, stop ids, the padding id."""

    sampling: Sampling
    min_length: int
    stops: list[int]
    fill_id: int

    def for_batch(self, width: int, length_sampler=None) -> Sampling:
        """The settings for one left-padded batch ``width`` tokens wide: ``length_sampler()`` gives max_new_tokens,
        and ``min_length`` (prompt + response, as in HF) becomes ``min_length - width`` new tokens, as TRL got."""
        max_new = self.sampling.max_new_tokens if length_sampler is None else int(length_sampler())
        min_new = max(self.sampling.min_new_tokens, self.min_length - width)
        return replace(self.sampling, max_new_tokens=max_new, min_new_tokens=min_new)


def parse_generation(kw: dict, default_stops: list[int], eos_id: int, default_fill: int) -> Generation:
    """Check ``generate``'s kwargs (a one-line LegacyValueError for a refused or unknown one) and collect them.

    Args:
        kw: the Hugging Face generation kwargs given to ``generate``.
        default_stops: the stop ids when ``eos_token_id`` is not given.
        eos_id: the tokenizer's EOS, which always stops a response (TRL cut responses at it).
        default_fill: the id after the stop token with ``remove_padding=False`` when ``pad_token_id`` is not given.
    """
    kw = dict(kw)
    for name, (no_op, reason) in GENERATE_REFUSED.items():
        if name in kw and kw.pop(name) not in no_op:
            raise LegacyValueError(f"generate: {name} is not supported: {reason}")
    for name in GENERATE_IGNORED:
        kw.pop(name, None)
    known = {name: kw.pop(name) for name in GENERATE_KWARGS if name in kw}
    if kw:
        raise LegacyValueError(
            f"generate: unsupported argument(s) {', '.join(sorted(kw))}; supported: "
            f"{', '.join(GENERATE_KWARGS + GENERATE_IGNORED)} (docs/migration.md)"
        )
    given = known.get("eos_token_id")
    if given is None:
        stops = list(default_stops)
    else:
        given = given if isinstance(given, (list, tuple)) else [given]
        stops = merge_stops(eos_id, [whole(i, "eos_token_id") for i in given])
    pad = known.get("pad_token_id")
    return Generation(
        sampling=_sampling(known),
        min_length=whole(known.get("min_length") or 0, "min_length", lowest=None),  # <= 0: off (TRL's -1)
        stops=stops,
        fill_id=default_fill if pad is None else whole(pad, "pad_token_id"),
    )
