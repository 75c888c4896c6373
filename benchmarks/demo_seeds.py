"""Run `tether demo` for several seeds and print the before/after numbers the README quotes.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/seeds

Each seed runs in its own process (one after another), so wall times are comparable. The script exits non-zero
if any seed misses the bar: correctness +15 points, KL below 10 nats, reward model agreeing with gold >= 80%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = parser.parse_args()
    ok = True
    print("| seed | correct SFT -> PPO | gold SFT -> PPO | KL | RM vs gold | wall |")
    for seed in args.seeds:
        run_dir = Path(args.out) / f"seed{seed}"
        cmd = [sys.executable, "-m", "tether.cli", "demo", f"seed={seed}", f"output_dir={run_dir}", *args.overrides]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        s = json.loads((run_dir / "summary.json").read_text())
        gain = 100 * (s["ppo.correct"] - s["sft.correct"])
        print(
            f"| {seed} | {s['sft.correct']:.1%} -> {s['ppo.correct']:.1%} ({gain:+.1f}) | "
            f"{s['sft.gold']:+.3f} -> {s['ppo.gold']:+.3f} | {s['ppo.kl']:.2f} | {s['rm.accuracy']:.1%} | "
            f"{s['wall_seconds']:.0f} s |"
        )
        ok &= gain >= 15 and s["ppo.kl"] < 10 and s["rm.accuracy"] >= 0.8
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
