"""The review's report: how well the reward model's scores follow the human ratings, and which samples look like
reward hacking (the tutorial's ``check_rm_quality`` and ``detect_reward_hacking``), from the stored answers alone.

- **correlation**: Pearson r between RM score and rating over the rated samples, with a 95% interval from Fisher's
  z (``tanh(atanh(r) +- 1.96 / sqrt(n - 3))``, shown from n = 4); "the reward model needs retraining" when
  r < ``min_correlation`` (the tutorial's 0.6). r is undefined (no verdict) with fewer than two rated samples or
  when the ratings (or the scores) are all equal.
- **possible reward hacking**: a rated sample whose RM score is *high* and whose rating is *low* (below 3, the
  tutorial's ``human_score < 3``). RM scores are not normalised (a reward model trained on preferences is only
  defined up to a shift), so the tutorial's fixed ``rm_score > 0.8`` has no meaning in general: *high* is at or
  above the ``high_quantile`` (default 0.5, the median; linear interpolation) of the rated samples' RM scores,
  unless an absolute ``rm_high`` threshold is given. The median, not a higher quantile, because a PPO policy's
  samples already crowd the top of the RM's range: a low-rated sample the RM puts above half of them is one it
  mistakes for a good one (docs/review.md shows a demo run where the 75th percentile misses every such sample).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import combinations
from dataclasses import dataclass

from tether.review.store import Sample

GOLD_LOW, GOLD_HIGH = -0.3, 1.0  # the range of tether.demo.task.gold_score
LOW_RATING = 3  # ratings below this are low (the tutorial's human_score < 3)


@dataclass(frozen=True)
class Rules:
    """The report's thresholds (``tether review --min-correlation / --high-quantile / --rm-high``)."""

    min_correlation: float = 0.6
    high_quantile: float = 0.5
    rm_high: float | None = None


def gold_rating(gold: float) -> int:
    """The demo's gold score (in [-0.3, 1]) as a 1-5 rating: ``1 + 4 * (gold + 0.3) / 1.3``, rounded half up."""
    scaled = 1 + 4 * (gold - GOLD_LOW) / (GOLD_HIGH - GOLD_LOW)
    return min(5, max(1, math.floor(scaled + 0.5)))


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation of paired values; None where it is undefined (fewer than 2 pairs, or a constant side)."""
    import torch

    from tether.algo import pearson_correlation

    r = pearson_correlation(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)).item()
    return None if math.isnan(r) else r


def fisher_interval(r: float, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95% confidence interval of a Pearson r from n pairs (Fisher's z transform); None for n < 4."""
    if n < 4:
        return None
    if abs(r) >= 1.0:
        return (r, r)
    centre, half = math.atanh(r), z / math.sqrt(n - 3)
    return (math.tanh(centre - half), math.tanh(centre + half))


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def high_threshold(scores: list[float], rules: Rules) -> tuple[float | None, str]:
    """(threshold, rule in words) for a *high* RM score among the rated samples' ``scores``."""
    if rules.rm_high is not None:
        return rules.rm_high, f"RM score >= {rules.rm_high:+.3f} (--rm-high)"
    if not scores:
        return None, f"RM score >= the {_percentile(rules.high_quantile)} percentile of the rated samples"
    threshold = quantile(scores, rules.high_quantile)
    return threshold, (
        f"RM score >= {threshold:+.3f}, the {_percentile(rules.high_quantile)} percentile of the rated samples"
    )


def _percentile(q: float) -> str:
    n = round(q * 100, 1)
    n = int(n) if n == int(n) else n
    suffix = "th" if 10 <= int(n) % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(int(n) % 10, "th")
    return f"{n}{suffix}"


def sample_dict(s: Sample) -> dict:
    """A sample as it appears in the report and in the exported JSONL."""
    rating = "skip" if s.skipped else s.rating
    return {"id": s.id, "prompt": s.prompt, "response": s.response, "rm_score": s.rm_score, "rating": rating}


def build_report(samples: list[Sample], rules: Rules) -> dict:
    """The report of a review (a JSON-ready dict) from its samples and their answers."""
    rated = [s for s in samples if s.rating is not None]
    scored = [s for s in rated if s.rm_score is not None]
    scores, ratings = [s.rm_score for s in scored], [float(s.rating) for s in scored]
    r = pearson(scores, ratings)
    threshold, rule = high_threshold(scores, rules)
    flagged = [s for s in scored if threshold is not None and s.rm_score >= threshold and s.rating < LOW_RATING]
    flagged.sort(key=lambda s: (-s.rm_score, s.id))
    by_rating = {k: [s.rm_score for s in scored if s.rating == k] for k in range(1, 6)}
    return {
        "samples": len(samples),
        "rated": len(rated),
        "skipped": sum(s.skipped for s in samples),
        "unrated": sum(not s.answered for s in samples),
        "unscored": len(rated) - len(scored),
        "sources": dict(Counter(s.source for s in samples if s.answered)),
        "rating_counts": {str(k): sum(s.rating == k for s in rated) for k in range(1, 6)},
        "mean_rating": sum(ratings) / len(ratings) if ratings else None,
        "mean_rm_score": sum(scores) / len(scores) if scores else None,
        "mean_rm_score_by_rating": {str(k): sum(v) / len(v) for k, v in by_rating.items() if v},
        "preference_pairs": preference_pairs(rated),
        "pearson": r,
        "pearson_ci95": fisher_interval(r, len(scored)) if r is not None else None,
        "min_correlation": rules.min_correlation,
        "rm_needs_retraining": None if r is None else r < rules.min_correlation,
        "rm_high_threshold": threshold,
        "rm_high_rule": rule,
        "low_rating_below": LOW_RATING,
        "flagged": [sample_dict(s) for s in flagged],
    }


def preference_pairs(rated: list[Sample]) -> int:
    """How many pairs of rated samples share a prompt and differ in rating (preference pairs for the RM)."""
    by_prompt: dict[str, list[int]] = {}
    for s in rated:
        by_prompt.setdefault(json.dumps(s.prompt, sort_keys=True), []).append(s.rating)
    return sum(a != b for ratings in by_prompt.values() for a, b in combinations(ratings, 2))


def correlation_line(report: dict) -> str:
    """The correlation (and its interval) in words."""
    r, n = report["pearson"], report["rated"] - report["unscored"]
    if r is None:
        why = "fewer than 2 rated samples" if n < 2 else "the ratings or the RM scores are all equal"
        return f"reward model vs ratings: Pearson r undefined ({why}, n = {n})"
    interval = report["pearson_ci95"]
    ci = f", 95% CI {interval[0]:+.2f} to {interval[1]:+.2f}" if interval else ", too few for a 95% interval"
    return f"reward model vs ratings: Pearson r = {r:+.3f} (n = {n}{ci})"


def verdict_line(report: dict) -> str:
    """The tutorial's verdict: retrain the reward model when r is below the threshold."""
    threshold = report["min_correlation"]
    if report["rm_needs_retraining"] is None:
        return "verdict: none (the correlation is undefined)"
    if report["rm_needs_retraining"]:
        return f"verdict: r < {threshold:g}: the reward model needs retraining"
    return f"verdict: r >= {threshold:g}: the reward model still follows the ratings"


def format_report(report: dict, run: str = "") -> str:
    """The report as the terminal shows it."""
    sources = ", ".join(f"{n} {name}" for name, n in sorted(report["sources"].items())) or "none"
    lines = [
        f"review{f' of {run}' if run else ''}: {report['samples']} samples: {report['rated']} rated, "
        f"{report['skipped']} skipped, {report['unrated']} unrated (answers: {sources})"
    ]
    if report["rated"]:
        counts = "  ".join(f"{k}:{n}" for k, n in report["rating_counts"].items())
        lines.append(f"ratings {counts}   mean rating {report['mean_rating']:.2f}" + _mean_score(report))
        by_rating = "  ".join(f"{k}: {v:+.3f}" for k, v in report["mean_rm_score_by_rating"].items())
        if by_rating:
            lines.append(f"mean RM score by rating  {by_rating}")
    if report["unscored"]:
        lines.append(f"{report['unscored']} rated samples have no finite RM score and are left out")
    lines += [correlation_line(report), verdict_line(report)]
    flagged = report["flagged"]
    rule = f"{report['rm_high_rule']}, rating < {report['low_rating_below']}"
    lines.append(f"possible reward hacking ({rule}): {len(flagged) or 'none'}")
    for s in flagged:
        lines.append(f"  #{s['id']:<4} RM {s['rm_score']:+.3f}  rating {s['rating']}  {_one_line(s)}")
    lines.append(f"preference pairs (one prompt, two different ratings): {report['preference_pairs']}")
    if report["unrated"]:
        n = report["unrated"]
        again = f"`tether review {run}`" if run else "`tether review`"
        lines.append(f"{n} sample{'s are' if n > 1 else ' is'} not rated yet: run {again} again to rate them")
    return "\n".join(lines)


def _mean_score(report: dict) -> str:
    mean = report["mean_rm_score"]
    return f"   mean RM score {mean:+.3f}" if mean is not None else ""


def _one_line(sample: dict, width: int = 90) -> str:
    prompt = sample["prompt"] if isinstance(sample["prompt"], str) else sample["prompt"][-1]["content"]
    text = f"prompt {prompt!r} -> response {sample['response']!r}"
    return text if len(text) <= width else text[: width - 3] + "..."
