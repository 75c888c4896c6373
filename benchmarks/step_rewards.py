"""Step rewards against outcome-only rewards on the built-in multi-step task (docs/why-ppo.md, "Step rewards").

    OMP_NUM_THREADS=1 python benchmarks/step_rewards.py --seeds 0 1 2 --out runs/step_rewards

For each seed: a tiny GPT-2 learns the steps task (``tether.demo.steps_task``: ``3+4*2-5=`` ->
``4*2=8, 3+8=11, 11-5=6. 6``, slips included) by SFT, then PPO starts from that SFT model twice with the same
settings and seed: once with the outcome-only reward (1 for the right answer, on the last token) and once with
step rewards (the outcome plus ``STEP_WEIGHT`` on the last token of every correct step). The gold judge (the right
final answer) is logged every iteration on the rollout (20,000 PPO prompts, so mostly fresh ones) and measured at
the end on held-out prompts that neither SFT nor PPO saw. Reported per run: the first iteration whose rollout gold,
averaged over the last ``--window`` iterations, reaches each of ``--levels``, and the final held-out gold and step
accuracy. Finished runs are kept: rerunning the script reuses them. Writes ``results.json`` and
``rollout_gold.png`` under ``--out`` and prints a markdown table. About 5 min of SFT and 2 x 1 min of PPO per seed
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch

from tether.config import RunConfig
from tether.data import write_jsonl
from tether.demo import steps_task as task
from tether.evaluate import evaluate_policy
from tether.models import load_causal_lm, load_tokenizer
from tether.precision import Placement
from tether.rollout import Sampling
from tether.tracking import read_metrics
from tether.trainers.common import seed_everything
from tether.trainers.ppo import PPOTrainer
from tether.trainers.sft import train_sft

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REWARDS = {"outcome": f"{task.__name__}:outcome_reward", "steps": f"{task.__name__}:step_reward"}


def base_config(seed: int, args) -> RunConfig:
    """The demo's tiny-model settings, sized for the steps task (longer responses)."""
    config = RunConfig(seed=seed)
    config.model = replace(config.model, device="cpu", gold_reward=f"{task.__name__}:gold_reward")
    config.sampling = replace(config.sampling, max_new_tokens=40, temperature=0.7)
    config.sft = replace(config.sft, steps=args.sft_steps, batch_size=64, lr=5e-3, warmup_steps=100)
    config.ppo = replace(
        config.ppo,
        steps=args.ppo_steps,
        rollout_batch_size=64,
        mini_batch_size=16,
        ppo_epochs=4,
        lr=args.lr,
        kl_coef=args.kl_coef,
        vf_coef=0.1,
        lr_schedule="linear",
    )
    config.logging.print_every = 0
    return config


def sft(seed_dir: Path, config: RunConfig, eval_prompts: list[str], examples: int) -> Path:
    model = seed_dir / "sft" / "model"
    if not (model / "config.json").is_file():
        data = seed_dir / "sft.jsonl"
        write_jsonl(data, task.sft_records(examples, config.seed, exclude=set(eval_prompts)))
        config = replace(config, sft=replace(config.sft, data=str(data)))
        seed_everything(config.seed)
        train_sft(config, seed_dir / "sft", echo=lambda *a: None)
    return model


def ppo(run_dir: Path, config: RunConfig, sft_model: Path, reward: str, prompts: list[str]) -> Path:
    model = run_dir / "model"
    if not (model / "config.json").is_file():
        config.model = replace(config.model, policy=str(sft_model), reward_model=REWARDS[reward])
        seed_everything(config.seed)
        trainer = PPOTrainer.from_config(config)
        start = time.time()
        trainer.train(prompts, run_dir, echo=lambda *a: None)
        trainer.actor_critic.policy.save_pretrained(model)
        trainer.tokenizer.save_pretrained(model)
        (run_dir / "wall.json").write_text(json.dumps({"seconds": time.time() - start}))
    return model


def held_out(model: Path, prompts: list[str], config: RunConfig, samples: int) -> dict:
    """Gold (right answers) and step accuracy (correct steps / written steps) on held-out prompts."""
    policy = load_causal_lm(str(model)).eval()
    tokenizer = load_tokenizer(str(model))
    sampling = Sampling(config.sampling.max_new_tokens, config.sampling.temperature)
    result = evaluate_policy(
        policy,
        None,
        tokenizer,
        prompts,
        sampling,
        placement=Placement(torch.device("cpu")),
        judge=task.gold_reward,
        samples_per_prompt=samples,
        seed=config.seed + 7,
    )
    marks = [c for s in result["samples"] for _, c in task.check_steps(s["prompt"], s["response"])]
    return {"gold": result["gold"], "step_accuracy": sum(marks) / max(len(marks), 1), "length": result["length"]}


def iterations_to(metrics: Path, level: float, window: int) -> int | None:
    """First iteration whose rollout gold/score, averaged over the last ``window`` iterations, reaches ``level``."""
    gold = [row["gold/score"] for row in read_metrics(metrics)]
    for i in range(window, len(gold) + 1):
        if sum(gold[i - window : i]) / window >= level:
            return i
    return None


def run_seed(out: Path, seed: int, args) -> dict:
    config = base_config(seed, args)
    train_prompts, eval_prompts = task.split_prompts(args.train_prompts, args.eval_prompts, seed)
    seed_dir = out / f"seed{seed}"
    sft_model = sft(seed_dir, config, eval_prompts, args.sft_examples)
    results = {"sft": held_out(sft_model, eval_prompts, config, args.eval_samples)}
    for reward in args.rewards:
        run_dir = seed_dir / reward
        model = ppo(run_dir, base_config(seed, args), sft_model, reward, train_prompts)
        results[reward] = held_out(model, eval_prompts, config, args.eval_samples)
        results[reward]["iterations_to"] = {
            str(level): iterations_to(run_dir / "metrics.jsonl", level, args.window) for level in args.levels
        }
        results[reward]["wall_seconds"] = json.loads((run_dir / "wall.json").read_text())["seconds"]
        rows = read_metrics(run_dir / "metrics.jsonl")
        results[reward]["rollout_gold"] = [row["gold/score"] for row in rows]
        results[reward]["kl"] = statistics.mean(row["kl/ref"] for row in rows[-args.window :])
    return results


def table(all_results: dict[int, dict], levels: list[float], window: int, steps: int, rewards: list[str]) -> str:
    reach = " | ".join(f"iterations to {level:.2f}" for level in levels)
    lines = [
        f"| seed | reward | {reach} | held-out gold (SFT -> PPO) | held-out step accuracy (SFT -> PPO) | KL | time |",
        "|---|---|" + "---|" * len(levels) + "---|---|---|---|",
    ]
    for seed, result in sorted(all_results.items()):
        for reward in rewards:
            r, s = result[reward], result["sft"]
            reached = " | ".join(_reached(r["iterations_to"][str(level)], steps) for level in levels)
            lines.append(
                f"| {seed} | {reward} | {reached} | {s['gold']:.1%} -> {r['gold']:.1%} | "
                f"{s['step_accuracy']:.1%} -> {r['step_accuracy']:.1%} | {r['kl']:.2f} | {r['wall_seconds']:.0f} s |"
            )
    for reward in rewards:
        runs = [result[reward] for result in all_results.values()]
        sft = statistics.mean(result["sft"]["gold"] for result in all_results.values())
        reached = " | ".join(
            f"{sum(r['iterations_to'][str(level)] is not None for r in runs)}/{len(runs)} reached" for level in levels
        )
        lines.append(
            f"| mean | {reward} | {reached} | {sft:.1%} -> {statistics.mean(r['gold'] for r in runs):.1%} | "
            f"-> {statistics.mean(r['step_accuracy'] for r in runs):.1%} | "
            f"{statistics.mean(r['kl'] for r in runs):.2f} | |"
        )
    return "\n".join(lines)


def _reached(iteration: int | None, steps: int) -> str:
    return str(iteration) if iteration is not None else f"not in {steps}"


def plot(all_results: dict[int, dict], rewards: list[str], window: int, path: Path) -> None:
    """Rollout gold per iteration (mean of the last ``window`` iterations), one line per seed and reward."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for reward, color in zip(rewards, ("tab:blue", "tab:orange")):
        for i, (_seed, result) in enumerate(sorted(all_results.items())):
            gold = result[reward]["rollout_gold"]
            smooth = [statistics.mean(gold[max(0, t - window + 1) : t + 1]) for t in range(len(gold))]
            label = reward if i == 0 else None
            ax.plot(range(1, len(gold) + 1), smooth, color=color, alpha=0.8, label=label, lw=1.2)
    ax.set(xlabel="PPO iteration", ylabel=f"rollout gold ({window}-iteration mean)", title="steps task, seeds 0-2")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/step_rewards")
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--ppo-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4, help="PPO learning rate")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.85, 0.88], help="rollout gold levels")
    parser.add_argument("--window", type=int, default=10, help="iterations averaged for the level")
    parser.add_argument("--train-prompts", type=int, default=20000, help="PPO prompts (fresh ones, mostly)")
    parser.add_argument("--eval-prompts", type=int, default=500, help="held-out prompts")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt")
    parser.add_argument("--sft-examples", type=int, default=40000)
    parser.add_argument("--sft-steps", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (see tether.demo.pipeline)
    out = Path(args.out)
    all_results = {}
    for seed in args.seeds:
        all_results[seed] = run_seed(out, seed, args)
        print(f"seed {seed} done", flush=True)
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in all_results.items()}, indent=2))
    plot(all_results, args.rewards, args.window, out / "rollout_gold.png")
    print(table(all_results, args.levels, args.window, args.ppo_steps, args.rewards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
