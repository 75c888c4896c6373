"""DPO beside PPO on the demo task: the same SFT model, the same preference pairs, the same held-out evaluation.

    python benchmarks/dpo_vs_ppo.py --seeds 0 1 2 --out runs/dpo_vs_ppo             # DPO_DEFAULTS below
    python benchmarks/dpo_vs_ppo.py --seeds 0 --out runs/dpo_vs_ppo dpo.beta=0.1 dpo.lr=1e-4  # other DPO settings

For each seed: `tether demo` (SFT -> pairs -> reward model -> PPO; a finished run folder is reused), then
`tether dpo` from the demo's SFT model on the demo's own preference pairs (`data/preferences.jsonl`, split as the
reward model split them, so DPO trains on exactly the reward model's training pairs), then SFT, DPO and PPO answer
the held-out prompts through `tether.demo.pipeline.evaluate`, as the demo's own table does (gold score, correct
answers, reward-model score, KL to the SFT reference, length). Also reported: how often each learned reward orders
held-out pairs as the gold judge does (the reward model's score; DPO's implicit reward beta * log(pi / pi_ref)), and
training time. Extra arguments are dotted overrides for `tether dpo`. Prints a markdown table and writes
``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from tether.config import build_config
from tether.data import read_jsonl
from tether.demo.pipeline import evaluate, gold_agreement
from tether.models import load_causal_lm, load_reward_model, load_tokenizer, reference_copy
from tether.precision import Placement
from tether.rewards import RewardModelScorer
from tether.tracking import read_metrics
from tether.trainers.dpo import pair_logprobs
from tether.trainers.reward import split_pairs

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
DPO_DEFAULTS = ["dpo.beta=0.5", "dpo.lr=3e-4", "dpo.epochs=2", "dpo.batch_size=32", "dpo.warmup_steps=10"]
ROWS = [
    ("gold score", "gold", "{:+.3f}"),
    ("correct answers", "correct", "{:.1%}"),
    ("filler characters", "filler", "{:.1f}"),
    ("reward-model score", "rm_score", "{:+.3f}"),
    ("KL to reference (nats/response)", "kl", "{:.2f}"),
    ("response length (tokens)", "length", "{:.1f}"),
    ("learned reward agrees with gold", "agreement", "{:.1%}"),
    ("training time (s)", "seconds", "{:.0f}"),
]


def tether(*args: str, log: Path) -> None:
    with open(log, "w") as out:
        subprocess.run(
            [sys.executable, "-m", "tether.cli", *args], check=True, stdout=out, stderr=subprocess.STDOUT, env=ENV
        )


def run_seed(out: Path, seed: int, dpo_overrides: list[str], demo_overrides: list[str]) -> dict:
    """Demo (reused when finished), DPO (rerun when its overrides changed), then the three-way evaluation."""
    demo_dir, dpo_dir = out / f"seed{seed}", out / f"seed{seed}" / "dpo"
    if not (demo_dir / "summary.json").is_file():
        tether("demo", f"seed={seed}", f"output_dir={demo_dir}", *demo_overrides, log=out / f"seed{seed}.log")
    dpo_args = [
        f"model.policy={demo_dir / 'sft' / 'model'}",
        f"dpo.data={demo_dir / 'data' / 'preferences.jsonl'}",
        f"seed={seed}",
        *DPO_DEFAULTS,
        *dpo_overrides,
    ]
    if not (dpo_dir / "summary.json").is_file() or _args(dpo_dir) != dpo_args:
        shutil.rmtree(dpo_dir, ignore_errors=True)  # a run folder's metrics.jsonl is appended to: start afresh
        tether("dpo", *dpo_args, f"output_dir={dpo_dir}", log=out / f"seed{seed}.dpo.log")
        (dpo_dir / "args.json").write_text(json.dumps(dpo_args))
    return evaluate_three(demo_dir, dpo_dir, build_config(overrides=dpo_args).dpo.beta)


def _args(dpo_dir: Path) -> list[str] | None:
    path = dpo_dir / "args.json"
    return json.loads(path.read_text()) if path.is_file() else None


def evaluate_three(demo_dir: Path, dpo_dir: Path, beta: float) -> dict:
    """SFT, DPO and PPO measured on the demo's held-out prompts exactly as the demo's own evaluation measures them."""
    torch.set_num_threads(1)  # as the demo runs: the same numbers as its summary.json
    config = build_config(demo_dir / "config.yaml", ["model.device=cpu"])
    placement = Placement.from_config(config.model)
    sft_dir = demo_dir / "sft" / "model"
    tokenizer = load_tokenizer(str(sft_dir))
    sft = placement.frozen(load_causal_lm(str(sft_dir), placement.frozen_dtype))
    reward_model = placement.frozen(load_reward_model(str(demo_dir / "reward" / "model"), placement.frozen_dtype))
    scorer = RewardModelScorer(reward_model, tokenizer.eos_token_id, placement=placement)
    reference = reference_copy(sft)
    prompts = [r["prompt"] for r in read_jsonl(demo_dir / "data" / "eval_prompts.jsonl", ("prompt",))]
    pairs = read_jsonl(demo_dir / "data" / "preferences.jsonl", ("prompt", "chosen", "rejected"))
    _, held_out = split_pairs(pairs, config.reward.eval_fraction, config.seed)
    results = {}
    for name, folder in (("sft", sft_dir), ("dpo", dpo_dir / "model"), ("ppo", demo_dir / "ppo" / "model")):
        policy = placement.frozen(load_causal_lm(str(folder), placement.frozen_dtype))
        results[name] = evaluate(policy, reference, tokenizer, scorer, prompts, config, placement)
        results[name].pop("examples")
    summary = json.loads((demo_dir / "summary.json").read_text())
    results["reproduced"] = all(results[n][k] == summary[f"{n}.{k}"] for n in ("sft", "ppo") for k in ("gold", "kl"))
    results["dpo"]["agreement"] = implicit_gold_agreement(dpo_dir / "model", sft, tokenizer, held_out, beta)
    results["ppo"]["agreement"] = gold_agreement(reward_model, tokenizer, held_out, config, placement)
    results["dpo"]["seconds"] = max(r.get("time/elapsed", 0.0) for r in read_metrics(dpo_dir / "metrics.jsonl"))
    results["ppo"]["seconds"] = sum(r.get("time/step", 0.0) for r in read_metrics(demo_dir / "ppo" / "metrics.jsonl"))
    results["dpo"]["eval"] = json.loads((dpo_dir / "summary.json").read_text())["eval"]
    return results


@torch.no_grad()
def implicit_gold_agreement(folder: Path, reference, tokenizer, records: list[dict], beta: float) -> float:
    """Fraction of pairs (with different gold scores) that DPO's implicit reward orders as the gold judge does."""
    policy, cpu = load_causal_lm(str(folder)).eval(), Placement(torch.device("cpu"))
    pairs = [r for r in records if r["chosen_gold"] != r["rejected_gold"]]
    agree = 0
    for i in range(0, len(pairs), 128):
        chunk = pairs[i : i + 128]
        chosen, rejected = pair_logprobs(policy, tokenizer, chunk, 128, cpu)
        ref_chosen, ref_rejected = pair_logprobs(reference, tokenizer, chunk, 128, cpu)
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        gold_sign = torch.tensor([1.0 if r["chosen_gold"] > r["rejected_gold"] else -1.0 for r in chunk])
        agree += (margin.sign() == gold_sign).sum().item()
    return agree / max(len(pairs), 1)


def table(results: dict[int, dict]) -> str:
    """One markdown row per measurement, SFT / DPO / PPO for each seed, then their mean over the seeds."""
    seeds = sorted(results)
    head = " | ".join(f"seed {s}: SFT / DPO / PPO" for s in seeds)
    lines = [f"| held-out prompts | {head} | mean: SFT / DPO / PPO |", "|---" * (len(seeds) + 2) + "|"]
    for label, key, fmt in ROWS:
        cells = []
        for s in [*seeds, "mean"]:
            runs = [results[s]] if s != "mean" else [results[x] for x in seeds]
            values = []
            for name in ("sft", "dpo", "ppo"):
                found = [r[name][key] for r in runs if key in r[name]]
                values.append(fmt.format(sum(found) / len(found)) if found else "–")
            cells.append(" / ".join(values))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/dpo_vs_ppo")
    parser.add_argument("--demo", default="", help='dotted overrides for `tether demo`, e.g. "ppo.steps=80"')
    parser.add_argument("overrides", nargs="*", help="dotted overrides for `tether dpo` (dpo.beta=0.5 ...)")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(out, seed, args.overrides, args.demo.split())
        golds = ", ".join(f"{n} gold {results[seed][n]['gold']:+.3f}" for n in ("sft", "dpo", "ppo"))
        same = "" if results[seed]["reproduced"] else " (SFT/PPO differ from the demo's own summary.json!)"
        print(f"seed {seed}: {golds}{same}", flush=True)
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    print(f"\nDPO: {' '.join(DPO_DEFAULTS + args.overrides)}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
