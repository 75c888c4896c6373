"""`tether demo`: the whole RLHF flow on the embedded arithmetic task, from nothing, on a CPU.

a. data        synthetic SFT examples in the assistant's habits; train/held-out prompt split
b. SFT         a tiny GPT-2 learns the task (and the habits) from scratch
c. preferences pairs sampled from the SFT model, labelled by the gold judge with Bradley-Terry noise
d. reward      a reward model (SFT trunk + scalar head) learns those preferences
e. PPO         the SFT policy is trained against the reward model, tethered to itself as reference
f. evaluation  SFT vs PPO on held-out prompts: gold judge, reward model, KL to reference, length
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from tether.config import RunConfig
from tether.data import prompt_batch, read_jsonl, write_jsonl
from tether.demo import task
from tether.evaluate import evaluate_policy
from tether.models import load_causal_lm, load_reward_model, load_tokenizer, reference_copy
from tether.precision import Placement
from tether.plot import PPO_CURVES, plot_metrics
from tether.rewards import RewardModelScorer, decode_responses, decode_texts
from tether.rollout import Sampling, generate
from tether.trainers.common import save_model, seed_everything
from tether.trainers.ppo import PPOTrainer
from tether.trainers.reward import pair_scores, split_pairs, train_reward
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
    config.logging.print_every = 10
    return config


@torch.no_grad()
def preference_records(policy, tokenizer, prompts: list[str], config: RunConfig, placement: Placement) -> list[dict]:
    """Two responses per prompt from the SFT policy, labelled by the noisy gold labeller; identical pairs dropped."""
    rng = random.Random(config.seed + 1)
    sampling = Sampling(config.sampling.max_new_tokens, config.sampling.temperature)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    records = []
    while len(records) < config.demo.preference_pairs:
        batch = [rng.choice(prompts) for _ in range(128)]
        ids, mask = map(placement.move, prompt_batch(tokenizer, batch + batch, config.sampling.max_prompt_length))
        resp, resp_mask = generate(policy, ids, mask, sampling, eos, pad, placement.autocast)
        texts = decode_responses(tokenizer, resp, resp_mask)
        for prompt, a, b in zip(batch, texts[: len(batch)], texts[len(batch) :]):
            if a != b and len(records) < config.demo.preference_pairs:
                records.append(task.label_pair(prompt, a, b, config.demo.label_noise, rng))
    return records


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


def gold_metrics(trainer: PPOTrainer, rollout) -> dict:
    """Demo-only metric: the gold judge's view of the rollout's responses."""
    prompts, responses = decode_texts(
        trainer.tokenizer, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
    )
    return {
        "gold/score": sum(task.gold_reward(prompts, responses)) / len(prompts),
        "gold/correct": sum(task.is_correct(p, r) for p, r in zip(prompts, responses)) / len(prompts),
    }


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
    # a. data
    train_prompts, eval_prompts = task.split_prompts(config.demo.eval_prompts, config.seed)
    write_jsonl(run_dir / "data" / "sft.jsonl", task.sft_records(config.demo.sft_examples, config.seed))
    write_jsonl(run_dir / "data" / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(run_dir / "data" / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    # b. SFT
    detail = _indented(echo)  # the trainers' lines (metrics, summaries) under the phase headers
    echo(f"[1/5] SFT: {config.sft.steps} steps on {config.demo.sft_examples} examples")
    config.sft.data = str(run_dir / "data" / "sft.jsonl")
    sft_dir = train_sft(config, _stage(run_dir, "sft"), detail)
    tokenizer = load_tokenizer(str(sft_dir))
    sft_policy = placement.frozen(load_causal_lm(str(sft_dir), placement.frozen_dtype))
    # c. preferences
    echo(f"[2/5] preferences: {config.demo.preference_pairs} pairs sampled from the SFT model, gold-labelled")
    phase_start = time.time()
    write_jsonl(
        run_dir / "data" / "preferences.jsonl",
        preference_records(sft_policy, tokenizer, train_prompts, config, placement),
    )
    detail(f"preferences: {config.demo.preference_pairs} pairs in {time.time() - phase_start:.1f} s")
    # d. reward model
    echo("[3/5] reward model")
    config.reward.data, config.reward.init = str(run_dir / "data" / "preferences.jsonl"), str(sft_dir)
    rm_dir, rm_eval = train_reward(config, _stage(run_dir, "reward"), detail)
    reward_model = placement.frozen(load_reward_model(str(rm_dir), placement.frozen_dtype))
    _, held_out = split_pairs(
        read_jsonl(config.reward.data, ("prompt", "chosen", "rejected")), config.reward.eval_fraction, config.seed
    )
    rm_accuracy = gold_agreement(reward_model, tokenizer, held_out, config, placement)
    detail(f"agreement with the gold judge on held-out pairs: {rm_accuracy:.3f}")
    # e. PPO
    echo(f"[4/5] PPO: {config.ppo.steps} iterations of {config.ppo.rollout_batch_size} rollouts")
    config.model.policy, config.model.reward_model = str(sft_dir), str(rm_dir)
    config.ppo.prompts = str(run_dir / "data" / "prompts.jsonl")
    trainer = PPOTrainer.from_config(config)
    ppo_dir = _stage(run_dir, "ppo")
    trainer.train(train_prompts, ppo_dir, detail, on_step=gold_metrics)
    save_model(trainer.actor_critic.policy, tokenizer, ppo_dir / "model", placement.dtype)
    # f. evaluation on held-out prompts
    echo(f"[5/5] evaluation on {len(eval_prompts)} held-out prompts x {config.demo.eval_samples} samples")
    scorer = RewardModelScorer(reward_model, tokenizer.eos_token_id, placement=placement)
    reference = reference_copy(sft_policy)
    sft_eval = evaluate(sft_policy, reference, tokenizer, scorer, eval_prompts, config, placement)
    ppo_eval = evaluate(trainer.actor_critic.policy, reference, tokenizer, scorer, eval_prompts, config, placement)
    summary = _summary(sft_eval, ppo_eval, rm_accuracy, rm_eval, time.time() - start, config)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(
        ppo_dir / "metrics.jsonl",
        run_dir / "ppo_curves.png",
        PLOT_KEYS,
        title=f"tether demo: PPO on the arithmetic task (seed {config.seed})",
    )
    echo(format_table(summary))
    return summary


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
    return "\n".join(lines)
