"""`tether demo`: the whole RLHF flow on the embedded arithmetic task, from nothing, on a CPU.

a. data        synthetic SFT examples in the assistant's habits; train/held-out prompt split
b. SFT         a tiny GPT-2 learns the task (and the habits) from scratch
c. preferences pairs sampled from the SFT model, labelled by the gold judge with Bradley-Terry noise
d. reward      a reward model (SFT trunk + scalar head) learns those preferences
e. PPO         the SFT policy is trained against the reward model, tethered to itself as reference
f. evaluation  SFT vs PPO on held-out prompts: gold judge, reward model, KL to reference, length

``demo.bias`` makes the labeller of step c prefer length or filler (the tutorial's reward-hacking setting), and
``demo.remedy`` applies one of the tutorial's remedies (docs/reward-hacking.md): a length penalty or sqrt-length
normalisation in PPO, balanced preference pairs in c, or iterative RLHF after e (rounds of tether.iterate).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from tether.config import RunConfig
from tether.data import read_jsonl, write_jsonl
from tether.demo import task
from tether.errors import TetherError
from tether.evaluate import evaluate_policy
from tether.iterate import GOLD, Lineage, iterate, sample_pairs
from tether.models import load_causal_lm, load_reward_model, load_tokenizer, reference_copy
from tether.precision import Placement
from tether.plot import PPO_CURVES, plot_metrics
from tether.rewards import RewardModelScorer, decode_texts
from tether.rollout import Sampling
from tether.trainers.common import save_model, seed_everything
from tether.trainers.ppo import PPOTrainer
from tether.trainers.reward import pair_scores, response_tokens, split_pairs, train_reward
from tether.trainers.sft import train_sft

PLOT_KEYS = ["gold/score", *PPO_CURVES]


def demo_config() -> RunConfig:
    """The demo's defaults (every field can still be overridden: `tether demo ppo.steps=80`)."""
    config = RunConfig()
    config.sampling = replace(config.sampling, max_new_tokens=24, temperature=0.7)
    config.sft = replace(config.sft, steps=2500, batch_size=32, lr=5e-3, warmup_steps=100)
    config.reward = replace(config.reward, epochs=2, batch_size=32, lr=5e-4)
    config.ppo = replace(
        config.ppo,
        steps=60,
        rollout_batch_size=64,
        mini_batch_size=16,
        ppo_epochs=4,
        lr=5e-5,
        kl_coef=0.1,
        vf_coef=0.1,
        lr_schedule="linear",
    )
    # demo.remedy=iterate: two rounds of 2400 gold-labelled pairs (PPO policy vs SFT reference), as many as step c
    config.iterate = replace(config.iterate, rounds=2, pairs=config.demo.preference_pairs)
    config.logging.print_every = 10
    config.model.gold_reward = GOLD  # logged as gold/score each iteration, watched by the proxy-vs-gold alarm
    return config


def apply_remedy(config: RunConfig) -> None:
    """The PPO settings of ``demo.bias`` and ``demo.remedy`` (balanced_pairs acts on the pairs, iterate after PPO).

    With a bias the KL guard is off, so the hack plays out and the alarms are what catch it (with the guard on, a
    length-hacking run ends at the guard's restore of the SFT policy instead).
    """
    if config.demo.bias != "none":
        config.ppo.kl_stop = None
    if config.demo.remedy == "sqrt_length":
        config.ppo.length_norm = "sqrt"


def preference_records(policy, tokenizer, prompts: list[str], config: RunConfig, placement: Placement) -> list[dict]:
    """Two different responses per prompt from the SFT policy, labelled by the noisy (and maybe biased) labeller;
    with remedy=balanced_pairs only pairs that leave the bias nothing to prefer."""
    demo = config.demo
    keep = (lambda a, b: task.balanced(demo.bias, a, b)) if demo.remedy == "balanced_pairs" else None
    rng = random.Random(config.seed + 1)  # prompt draws and labels share it, in the order they happen

    def label(prompt: str, a: str, b: str) -> dict:
        return task.label_pair(prompt, a, b, demo.label_noise, rng, demo.bias, demo.bias_strength)

    return sample_pairs(policy, tokenizer, prompts, demo.preference_pairs, config, placement, rng, keep, label)


@torch.no_grad()
def gold_agreement(model, tokenizer, records: list[dict], config: RunConfig, placement: Placement) -> float:
    """Fraction of pairs (with different gold scores) that the reward model orders as the gold judge does."""
    pairs = [r for r in records if r["chosen_gold"] != r["rejected_gold"]]
    agree = 0
    for i in range(0, len(pairs), 128):
        chunk = pairs[i : i + 128]
        chosen, rejected = pair_scores(model, tokenizer, chunk, config.reward.max_length, placement)
        gold_sign = torch.tensor([1.0 if r["chosen_gold"] > r["rejected_gold"] else -1.0 for r in chunk])
        agree += ((chosen - rejected).sign().cpu() == gold_sign).sum().item()
    return agree / max(len(pairs), 1)


@torch.no_grad()
def length_slope(model, tokenizer, records: list[dict], config: RunConfig, placement: Placement) -> float:
    """Least-squares slope of the reward model's score against response length (tokens) over the responses of
    ``records``: what a length bias is worth per token."""
    scores, lengths = [], []
    for i in range(0, len(records), 128):
        chunk = records[i : i + 128]
        chosen, rejected = pair_scores(model, tokenizer, chunk, config.reward.max_length, placement)
        scores += chosen.tolist() + rejected.tolist()
        lengths += [response_tokens(tokenizer, r[side]) for side in ("chosen", "rejected") for r in chunk]
    x, y = torch.tensor(lengths, dtype=torch.float64), torch.tensor(scores, dtype=torch.float64)
    x_c = x - x.mean()
    return float((x_c * (y - y.mean())).sum() / (x_c * x_c).sum().clamp(min=1e-12))


def gold_metrics(trainer: PPOTrainer, rollout) -> dict:
    """Demo-only metric: correct answers in the rollout (the gold score itself comes from model.gold_reward)."""
    prompts, responses = decode_texts(
        trainer.tokenizer, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
    )
    return {"gold/correct": sum(task.is_correct(p, r) for p, r in zip(prompts, responses)) / len(prompts)}


def evaluate(policy, reference, tokenizer, scorer, prompts, config: RunConfig, placement: Placement) -> dict:
    sampling = Sampling(config.sampling.max_new_tokens, config.sampling.temperature)
    result = evaluate_policy(
        policy,
        reference,
        tokenizer,
        prompts,
        sampling,
        placement=placement,
        scorer=scorer,
        judge=task.gold_reward,
        samples_per_prompt=config.demo.eval_samples,
        seed=config.seed + 7,
    )
    samples = result.pop("samples")
    result["correct"] = sum(task.is_correct(s["prompt"], s["response"]) for s in samples) / len(samples)
    result["filler"] = sum(task.filler_chars(s["prompt"], s["response"]) for s in samples) / len(samples)
    result["examples"] = samples[:: max(1, len(samples) // 8)][:8]
    return result


def run_demo(config: RunConfig, run_dir: Path, echo=print) -> dict:
    """Run stages a-f in ``run_dir`` and return the summary (also written to ``summary.json``)."""
    start = time.time()
    seed_everything(config.seed)
    placement = Placement.from_config(config.model)
    # The demo's models are tiny: their matmuls run fastest on one thread, and one thread does not stall when the
    # machine is busy (two threads were 40x slower on a loaded 2-core machine). Real models keep torch's default.
    torch.set_num_threads(1)
    apply_remedy(config)
    demo, phases = config.demo, 6 if config.demo.remedy == "iterate" else 5
    # a. data
    train_prompts, eval_prompts = task.split_prompts(demo.eval_prompts, config.seed)
    data = run_dir / "data"
    write_jsonl(data / "sft.jsonl", task.sft_records(demo.sft_examples, config.seed))
    write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(data / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    # b. SFT
    detail = _indented(echo)  # the trainers' lines (metrics, summaries) under the phase headers
    config.sft.data = str(data / "sft.jsonl")
    if demo.sft_model:
        echo(f"[1/{phases}] SFT: the model in {demo.sft_model}")
        sft_dir = _sft_model(demo.sft_model)
    else:
        echo(f"[1/{phases}] SFT: {config.sft.steps} steps on {demo.sft_examples} examples")
        sft_dir = train_sft(config, _stage(run_dir, "sft"), detail)
    tokenizer = load_tokenizer(str(sft_dir))
    sft_policy = placement.frozen(load_causal_lm(str(sft_dir), placement.frozen_dtype))
    # c. preferences
    echo(f"[2/{phases}] preferences: {demo.preference_pairs} pairs sampled from the SFT model, {_labeller(demo)}")
    phase_start = time.time()
    pairs = preference_records(sft_policy, tokenizer, train_prompts, config, placement)
    write_jsonl(data / "preferences.jsonl", pairs)
    detail(f"preferences: {demo.preference_pairs} pairs in {time.time() - phase_start:.1f} s")
    # d. reward model
    echo(f"[3/{phases}] reward model")
    config.reward.data, config.reward.init = str(data / "preferences.jsonl"), str(sft_dir)
    rm_dir, rm_eval = train_reward(config, _stage(run_dir, "reward"), detail)
    reward_model = placement.frozen(load_reward_model(str(rm_dir), placement.frozen_dtype))
    _, held_out = split_pairs(
        read_jsonl(config.reward.data, ("prompt", "chosen", "rejected")), config.reward.eval_fraction, config.seed
    )
    rm_accuracy = gold_agreement(reward_model, tokenizer, held_out, config, placement)
    detail(f"agreement with the gold judge on held-out pairs: {rm_accuracy:.3f}")
    if demo.remedy == "length_penalty":  # the tutorial's remedy 1, sized to cancel the measured length slope
        config.ppo.length_penalty = max(0.0, length_slope(reward_model, tokenizer, held_out, config, placement))
        detail(f"ppo.length_penalty={config.ppo.length_penalty:.3f} (the reward model's score per response token)")
    # e. PPO
    echo(f"[4/{phases}] PPO: {config.ppo.steps} iterations of {config.ppo.rollout_batch_size} rollouts")
    config.model.policy, config.model.reward_model = str(sft_dir), str(rm_dir)
    config.ppo.prompts = str(data / "prompts.jsonl")
    trainer = PPOTrainer.from_config(config)
    ppo_dir = _stage(run_dir, "ppo")
    trainer.train(train_prompts, ppo_dir, detail, on_step=gold_metrics)
    save_model(trainer.actor_critic.policy, tokenizer, ppo_dir / "model", placement.dtype)
    alarms, final = list(trainer.alarms.fired), trainer.actor_critic.policy
    # e'. iterative RLHF: gold-labelled pairs from the PPO policy, a retrained reward model, more PPO
    rounds = []
    if demo.remedy == "iterate":
        echo(f"[5/{phases}] iterative RLHF: {config.iterate.rounds} round(s), new pairs labelled by the gold judge")
        config.iterate.labeller = "gold"
        sft, pairs = str(sft_dir), str(data / "preferences.jsonl")
        lineage = Lineage(str(ppo_dir / "model"), sft, str(rm_dir), pairs, config.ppo.prompts, sft)
        result = iterate(config, lineage, _stage(run_dir, "iterate"), run_dir, detail)
        rounds = result["rounds"]
        alarms += [a for r in rounds for a in r["alarms"]]
        final = placement.frozen(load_causal_lm(result["policy"], placement.frozen_dtype))
    # f. evaluation on held-out prompts
    echo(f"[{phases}/{phases}] evaluation on {len(eval_prompts)} held-out prompts x {demo.eval_samples} samples")
    scorer = RewardModelScorer(reward_model, tokenizer.eos_token_id, placement=placement)
    reference = reference_copy(sft_policy)
    sft_eval = evaluate(sft_policy, reference, tokenizer, scorer, eval_prompts, config, placement)
    ppo_eval = evaluate(final, reference, tokenizer, scorer, eval_prompts, config, placement)
    summary = _summary(sft_eval, ppo_eval, rm_accuracy, rm_eval, time.time() - start, config)
    summary |= {"alarms": alarms, "iterate": rounds}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(
        ppo_dir / "metrics.jsonl",
        run_dir / "ppo_curves.png",
        PLOT_KEYS,
        title=f"tether demo: PPO on the arithmetic task (seed {config.seed}{_setting(demo)})",
    )
    echo(format_table(summary))
    return summary


def _sft_model(path: str) -> Path:
    if not (Path(path) / "config.json").is_file():
        raise TetherError(f"demo.sft_model={path}: not a model folder (no config.json)")
    return Path(path)


def _labeller(demo) -> str:
    bias = "gold-labelled" if demo.bias == "none" else f"labelled with a {demo.bias} bias ({demo.bias_strength:g})"
    return bias + (", balanced pairs only" if demo.remedy == "balanced_pairs" else "")


def _setting(demo) -> str:
    parts = [f"bias={demo.bias}"] * (demo.bias != "none") + [f"remedy={demo.remedy}"] * (demo.remedy != "none")
    return "".join(", " + p for p in parts)


def _indented(echo):
    """``echo`` with each line indented under the phase headers."""

    def indented(text: str) -> None:
        echo("\n".join("      " + line for line in str(text).splitlines()))

    return indented


def _stage(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _summary(sft: dict, ppo: dict, rm_accuracy: float, rm_eval: dict, wall: float, config: RunConfig) -> dict:
    flat = {
        "rm.accuracy": rm_accuracy,
        "rm.label_accuracy": rm_eval["accuracy"],
        "wall_seconds": wall,
        "seed": config.seed,
        "bias": config.demo.bias,
        "bias_strength": config.demo.bias_strength,
        "remedy": config.demo.remedy,
    }
    for name, result in (("sft", sft), ("ppo", ppo)):
        for key in ("gold", "correct", "filler", "rm_score", "kl", "length", "ended"):
            flat[f"{name}.{key}"] = result[key]
        flat[f"{name}.examples"] = result["examples"]
    return flat


def format_table(summary: dict) -> str:
    """The before/after table printed at the end of the demo."""
    rows = [
        ("gold score (1 = correct, -0.01/filler char)", "gold", "{:+.3f}"),
        ("correct answers", "correct", "{:.1%}"),
        ("filler characters", "filler", "{:.1f}"),
        ("reward-model score", "rm_score", "{:+.3f}"),
        ("KL to reference (nats/response)", "kl", "{:.3f}"),
        ("response length (tokens)", "length", "{:.1f}"),
    ]
    lines = [f"{'held-out prompts':<46}{'SFT':>10}{'PPO':>10}", "-" * 66]
    for label, key, fmt in rows:
        lines.append(f"{label:<46}{fmt.format(summary[f'sft.{key}']):>10}{fmt.format(summary[f'ppo.{key}']):>10}")
    lines.append("-" * 66)
    lines.append(
        f"reward model agrees with gold on held-out pairs: {summary['rm.accuracy']:.1%}; "
        f"wall time {summary['wall_seconds']:.0f} s"
    )
    for alarm in summary.get("alarms", []):
        lines.append(f"alarm at PPO iteration {alarm['iteration']}: {alarm['kind']} ({alarm['evidence']})")
    if not summary.get("alarms"):
        lines.append("alarms: none")
    return "\n".join(lines)
