"""Reward hacking shown, caught and fixed: `tether demo` over bias x remedy x seed, and the table and plot of
docs/reward-hacking.md.

    python benchmarks/hacking.py --seeds 0 1 2 --out runs/hacking --jobs 2

Each seed trains its SFT model once (the unbiased demo); every biased run of that seed starts from it
(``demo.sft_model``: the same seed gives the same SFT model; the later phases then draw from a different point of
the RNG stream than a run that trains its own SFT model, so their numbers are comparable, not identical). Runs go
``--jobs`` at a time, each on one thread. Prints a markdown table and writes ``results.json`` and
``proxy_vs_gold.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REMEDIES = ["none", "length_penalty", "sqrt_length", "balanced_pairs", "iterate"]
# the length remedies (length_penalty, sqrt_length) act on length only: run for the length bias, not for politeness
POLITENESS_REMEDIES = ["none", "balanced_pairs", "iterate"]
SETTINGS = [("none", "none")] + [("length", r) for r in REMEDIES] + [("politeness", r) for r in POLITENESS_REMEDIES]


def demo(run_dir: Path, seed: int, overrides: list[str]) -> dict:
    if not (run_dir / "summary.json").is_file():  # finished runs are kept: rerunning the script resumes the grid
        cmd = [sys.executable, "-m", "tether.cli", "demo", f"seed={seed}", f"output_dir={run_dir}", *overrides]
        with open(run_dir.with_suffix(".log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((run_dir / "summary.json").read_text())


def run_seed(out: Path, seed: int, jobs: int, extra: list[str], settings: list[tuple]) -> dict:
    base = out / f"seed{seed}" / "none-none"
    base.parent.mkdir(parents=True, exist_ok=True)
    results = {("none", "none"): demo(base, seed, extra)}
    sft = [f"demo.sft_model={base / 'sft' / 'model'}"]
    todo = [s for s in settings if s != ("none", "none")]
    with ThreadPoolExecutor(jobs) as pool:
        runs = {
            s: pool.submit(
                demo,
                out / f"seed{seed}" / f"{s[0]}-{s[1]}",
                seed,
                [f"demo.bias={s[0]}", f"demo.remedy={s[1]}", *sft, *extra],
            )
            for s in todo
        }
        results |= {s: f.result() for s, f in runs.items()}
    return results


def finished(seed_dir: Path, settings: list[tuple]) -> dict:
    """The summaries of the finished runs of one seed."""
    found = {s: seed_dir / f"{s[0]}-{s[1]}" / "summary.json" for s in settings}
    return {s: json.loads(path.read_text()) for s, path in found.items() if path.is_file()}


def table(all_results: dict[int, dict]) -> str:
    seeds = sorted(all_results)
    lines = [
        "| bias | remedy | gold SFT → PPO | RM score SFT → PPO | correct SFT → PPO | KL | alarms (runs with any) | "
        "PPO gold > SFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        rows = [all_results[seed][setting] for seed in seeds if setting in all_results[seed]]
        if not rows:
            continue

        def mean(key, rows=rows):
            return sum(r[key] for r in rows) / len(rows)

        kinds = sorted({a["kind"] for r in rows for a in r["alarms"]})
        fired = sum(bool(r["alarms"]) for r in rows)
        better = sum(r["ppo.gold"] > r["sft.gold"] for r in rows)
        lines.append(
            f"| {setting[0]} | {setting[1]} | {mean('sft.gold'):+.3f} → {mean('ppo.gold'):+.3f} | "
            f"{mean('sft.rm_score'):+.2f} → {mean('ppo.rm_score'):+.2f} | "
            f"{mean('sft.correct'):.0%} → {mean('ppo.correct'):.0%} | {mean('ppo.kl'):.2f} | "
            f"{fired}/{len(rows)} {', '.join(kinds)} | {better}/{len(rows)} |"
            + (
                ""
                if len(rows) == len(seeds)
                else f" (seed {', '.join(str(s) for s in seeds if setting in all_results[s])})"
            )
        )
    return "\n".join(lines)


def plot(run_dir: Path, out: Path) -> None:
    """Proxy (reward-model score) and gold over PPO iterations of one biased run, with its alarm onsets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tether.plot import alarm_onsets
    from tether.tracking import read_metrics

    rows = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    fig, proxy = plt.subplots(figsize=(7, 3.6))
    proxy.plot(steps, [r["reward/score"] for r in rows], color="tab:blue", label="reward-model score (proxy)")
    proxy.set_xlabel("PPO iteration")
    proxy.set_ylabel("reward-model score", color="tab:blue")
    gold = proxy.twinx()
    gold.plot(steps, [r["gold/score"] for r in rows], color="tab:orange", label="gold score")
    gold.set_ylabel("gold score", color="tab:orange")
    for kind, step in alarm_onsets(rows).items():
        proxy.axvline(step, color="tab:red", ls="--", lw=1)
        proxy.annotate(
            f"alarm: {kind}",
            (step, proxy.get_ylim()[1]),
            fontsize=8,
            color="tab:red",
            va="top",
            rotation=90,
            ha="right",
        )
    fig.suptitle(f"{run_dir.parent.name}, {run_dir.name}: the proxy climbs while gold falls")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/hacking")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--settings", nargs="+", help="only these bias-remedy settings, e.g. length-none")
    parser.add_argument("--table-only", action="store_true", help="run nothing: tabulate the finished runs")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    settings = [tuple(s.split("-", 1)) for s in args.settings] if args.settings else SETTINGS
    if args.table_only:
        results = {seed: finished(out / f"seed{seed}", settings) for seed in args.seeds}
    else:
        results = {seed: run_seed(out, seed, args.jobs, args.overrides, settings) for seed in args.seeds}
    flat = {f"seed{s}/{b}-{r}": v for s, res in results.items() for (b, r), v in res.items()}
    (out / "results.json").write_text(json.dumps(flat, indent=2))
    plot(out / f"seed{args.seeds[0]}" / "length-none", out / "proxy_vs_gold.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
