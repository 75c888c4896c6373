"""A PNG of the training curves in a run folder (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tether.tracking import read_metrics  # noqa: E402

PPO_CURVES = [
    "reward/score",
    "kl/ref",
    "kl/coef",
    "loss/policy",
    "loss/value",
    "ppo/clipfrac",
    "ppo/approx_kl",
    "ppo/explained_variance",
    "policy/entropy",
    "response/length",
    "ppo/ratio_mean",
]
"""The panels of a PPO run's curves.png (the demo adds the gold judge's score in front)."""


def plot_metrics(metrics_path: str | Path, out_path: str | Path, keys: list[str], title: str = "") -> Path | None:
    """Plot each of ``keys`` against step, one panel each; keys never logged are skipped. Returns the PNG path."""
    records = read_metrics(metrics_path)
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not present:
        return None
    cols = min(3, len(present))
    rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    onsets = alarm_onsets(records)
    for ax, key in zip(axes.flat, present):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), lw=1.4)
        for step in onsets.values():
            ax.axvline(step, color="tab:red", ls="--", lw=0.9, alpha=0.7)
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    if onsets:
        title = (
            (title + "\n" if title else "")
            + "alarms (red lines): "
            + ", ".join(f"{kind} at {step}" for kind, step in onsets.items())
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def alarm_onsets(records: list[dict]) -> dict[str, int]:
    """The first step at which each ``alarm/<kind>`` metric is on: kind -> step."""
    onsets = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("alarm/") and value == 1 and key[6:] not in onsets:
                onsets[key[6:]] = r["step"]
    return onsets
