"""Iterative RLHF (the tutorial's fix for a reward model that no longer fits the policy): each round samples pairs
from the current policy, has them labelled, retrains the reward model on old plus new pairs, and continues PPO from
the current policy with the new reward model, tethered to the same reference.

An orchestrator over the trainers (``train_reward``, :class:`PPOTrainer`), like the demo pipeline. Labellers:
``gold`` (the built-in task's judge), ``review`` (ratings stored by ``tether review``) or ``module:function``: any
reward-function-shaped ``fn(prompts, responses) -> scores``; the higher score is chosen and ties are dropped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tether.config import RunConfig
from tether.data import prompt_batch, read_jsonl, read_records, write_jsonl
from tether.errors import TetherError
from tether.models import load_causal_lm, load_reward_model, load_tokenizer
from tether.precision import Placement
from tether.rewards import decode_responses, load_reward_function
from tether.rollout import Sampling, generate, stop_ids
from tether.trainers.common import save_model
from tether.trainers.ppo import PPOTrainer
from tether.trainers.reward import evaluate_pairs, split_pairs, train_reward

GOLD = "tether.demo.task:gold_reward"


@dataclass
class Lineage:
    """Where a round starts: the policy to continue, its fixed reference, the reward model and its training data."""

    policy: str
    reference: str
    reward_model: str
    pairs: str  # the reward model's {"prompt", "chosen", "rejected"} JSONL
    prompts: str  # {"prompt"} JSONL that PPO samples from
    reward_init: str  # the folder every retrained reward model starts from

    @classmethod
    def of_run(cls, run_dir: Path, config: RunConfig) -> Lineage:
        """A demo run folder (sft/, reward/, ppo/, data/) or a `tether ppo` run (its config names the rest)."""
        if (run_dir / "ppo" / "model").is_dir() and (run_dir / "data" / "preferences.jsonl").is_file():
            sft, data = config.demo.sft_model or str(run_dir / "sft" / "model"), run_dir / "data"
            return cls(
                str(run_dir / "ppo" / "model"),
                sft,
                str(run_dir / "reward" / "model"),
                str(data / "preferences.jsonl"),
                str(data / "prompts.jsonl"),
                sft,
            )
        if not (run_dir / "model").is_dir():
            raise TetherError(f"{run_dir}: no trained policy (model/ or ppo/model/); is it a finished run?")
        m = config.model
        if not Path(m.reward_model).is_dir():
            raise TetherError(f"{run_dir}: model.reward_model={m.reward_model!r} is no reward-model folder to retrain")
        if not config.reward.data:
            raise TetherError("reward.data: give the reward model's preference pairs (old pairs are kept in training)")
        init = config.reward.init or m.reference or m.policy
        return cls(
            str(run_dir / "model"),
            m.reference or m.policy,
            m.reward_model,
            config.reward.data,
            config.ppo.prompts,
            init,
        )


@torch.no_grad()
def sample_pairs(
    policy,
    tokenizer,
    prompts: list,
    count: int,
    config: RunConfig,
    placement: Placement,
    rng: random.Random,
    keep=None,
    make=None,
    other=None,
) -> list:
    """``count`` pairs of two different responses to one prompt drawn with ``rng``: both from ``policy``, or the
    second from ``other`` (sampling uses the global torch RNG). ``keep(a, b)`` may refuse a pair; ``make(prompt, a,
    b)`` (default: the tuple) is called as each pair is accepted, so a labeller that shares ``rng`` interleaves with
    the draws."""
    sampling = Sampling(config.sampling.max_new_tokens, config.sampling.temperature)
    stops, width = stop_ids(tokenizer, policy), config.sampling.max_prompt_length
    pairs, tries = [], 0
    while len(pairs) < count:
        tries += 1
        if tries > 50 + 20 * count // 128:
            raise TetherError(f"only {len(pairs)} of {count} usable response pairs after {tries - 1} batches")
        batch = [rng.choice(prompts) for _ in range(128)]
        first = batch if other is not None else batch + batch
        texts = _responses(policy, tokenizer, first, sampling, stops, width, placement)
        if other is not None:
            texts += _responses(other, tokenizer, batch, sampling, stops, width, placement)
        for prompt, a, b in zip(batch, texts[: len(batch)], texts[len(batch) :]):
            if a != b and (keep is None or keep(a, b)) and len(pairs) < count:
                pairs.append((prompt, a, b) if make is None else make(prompt, a, b))
    return pairs


def _responses(policy, tokenizer, prompts: list, sampling: Sampling, stops: list[int], width: int, placement) -> list:
    """One sampled response text per prompt (prompts cut to ``width`` tokens)."""
    ids, mask = map(placement.move, prompt_batch(tokenizer, prompts, width))
    resp, resp_mask = generate(policy, ids, mask, sampling, stops, tokenizer.pad_token_id, placement.autocast)
    return decode_responses(tokenizer, resp, resp_mask)


def label_by_scores(triples: list[tuple], score_fn) -> list[dict]:
    """Preference records from a scoring function: the higher-scored response is chosen; ties are dropped."""
    prompts = [p for p, _, _ in triples]
    a_scores = score_fn(prompts, [a for _, a, _ in triples])
    b_scores = score_fn(prompts, [b for _, _, b in triples])
    records = []
    for (prompt, a, b), sa, sb in zip(triples, a_scores, b_scores):
        if float(sa) != float(sb):
            chosen, rejected = (a, b) if float(sa) > float(sb) else (b, a)
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def review_pairs(run_dir: Path) -> list[dict]:
    """Pairs from ``tether review`` ratings of RUN: two responses to one prompt with different ratings."""
    from tether.review.store import rated_samples

    by_prompt: dict[str, list[dict]] = {}
    for sample in rated_samples(run_dir):
        by_prompt.setdefault(json.dumps(sample["prompt"]), []).append(sample)
    records = []
    for samples in by_prompt.values():
        for i, a in enumerate(samples):
            for b in samples[i + 1 :]:
                if a["rating"] != b["rating"] and a["response"] != b["response"]:
                    chosen, rejected = (a, b) if a["rating"] > b["rating"] else (b, a)
                    pair = {"chosen": chosen["response"], "rejected": rejected["response"]}
                    records.append({"prompt": a["prompt"], **pair})
    if not records:
        raise TetherError(f"{run_dir}: no two reviewed responses to one prompt with different ratings; review more")
    return records


def run_round(
    config: RunConfig, lineage: Lineage, round_dir: Path, labeller: str, source_run: Path, index: int, echo=print
) -> tuple[Lineage, dict]:
    """One round of iterative RLHF in ``round_dir``; returns the next round's lineage and this round's report."""
    placement = Placement.from_config(config.model)
    tokenizer = load_tokenizer(lineage.policy)
    prompts = [r["prompt"] for r in read_records(lineage.prompts, ("prompt",))]
    # 1. new pairs from the current policy, labelled
    new = label_new_pairs(config, lineage, tokenizer, prompts, placement, labeller, source_run, index)
    new_train, new_held = split_pairs(new, 0.25, config.seed + index)
    write_jsonl(round_dir / "data" / "new_pairs.jsonl", new_train)
    write_jsonl(round_dir / "data" / "new_held_out.jsonl", new_held)
    pairs = read_jsonl(lineage.pairs, ("prompt", "chosen", "rejected")) + new_train
    write_jsonl(round_dir / "data" / "pairs.jsonl", pairs)
    # 2. the old reward model on the new samples, retrain on old + new, the new one on the same samples
    before = rm_accuracy(lineage.reward_model, tokenizer, new_held, config, placement)
    cfg = replace(
        config, reward=replace(config.reward, data=str(round_dir / "data" / "pairs.jsonl"), init=lineage.reward_init)
    )
    rm_dir, _ = train_reward(cfg, _mkdir(round_dir / "reward"), echo)
    after = rm_accuracy(str(rm_dir), tokenizer, new_held, config, placement)
    echo(f"round {index}: {len(new)} new pairs; RM accuracy on held-out new pairs {before:.1%} -> {after:.1%}")
    # 3. PPO from the current policy, with the new reward model, tethered to the same reference
    ppo_cfg = replace(
        config,
        model=replace(config.model, policy=lineage.policy, reference=lineage.reference, reward_model=str(rm_dir)),
        ppo=replace(config.ppo, steps=config.iterate.steps, prompts=lineage.prompts),
        stages=[],
    ).finalize()
    trainer = PPOTrainer.from_config(ppo_cfg)
    ppo_dir = _mkdir(round_dir / "ppo")
    stats = trainer.train(prompts, ppo_dir, echo)
    policy_dir = save_model(trainer.actor_critic.policy, trainer.tokenizer, ppo_dir / "model", placement.dtype)
    report = {
        "round": index,
        "new_pairs": len(new),
        "rm_accuracy_before": before,
        "rm_accuracy_after": after,
        "alarms": trainer.alarms.fired,
        "final": stats,
    }
    return replace(lineage, policy=str(policy_dir), reward_model=str(rm_dir), pairs=cfg.reward.data), report


def label_new_pairs(config, lineage, tokenizer, prompts, placement, labeller: str, source_run: Path, index: int):
    """This round's labelled pairs: from review ratings, or sampled from the current policy and scored."""
    if labeller == "review":
        if index > 1:
            raise TetherError("iterate.labeller=review: ratings exist for one policy only; review each round's policy")
        return review_pairs(source_run)
    score_fn = load_reward_function(GOLD if labeller == "gold" else labeller)
    policy = placement.frozen(load_causal_lm(lineage.policy, placement.frozen_dtype))
    other = None
    if config.iterate.compare == "reference":
        other = placement.frozen(load_causal_lm(lineage.reference, placement.frozen_dtype))
    torch.manual_seed(config.seed + index)
    rng = random.Random(config.seed + index)
    triples = sample_pairs(policy, tokenizer, prompts, config.iterate.pairs, config, placement, rng, other=other)
    return label_by_scores(triples, score_fn)


def rm_accuracy(rm_path: str, tokenizer, records: list[dict], config: RunConfig, placement: Placement) -> float:
    """Pairwise accuracy of the reward model at ``rm_path`` on ``records``."""
    model = placement.frozen(load_reward_model(rm_path, placement.frozen_dtype))
    return evaluate_pairs(model, tokenizer, records, config.reward.max_length, placement)["accuracy"]


def iterate(config: RunConfig, lineage: Lineage, run_dir: Path, source_run: Path, echo=print) -> dict:
    """``config.iterate.rounds`` rounds in ``run_dir/round-N``; writes and returns ``summary.json``."""
    rounds, run_dir = [], Path(run_dir).resolve()  # summary.json names folders that work from anywhere
    for index in range(1, config.iterate.rounds + 1):
        echo(f"[round {index}/{config.iterate.rounds}] label {config.iterate.labeller}, retrain, PPO")
        lineage, report = run_round(
            config, lineage, _mkdir(run_dir / f"round-{index}"), config.iterate.labeller, source_run, index, echo
        )
        rounds.append(report)
    summary = {"rounds": rounds, "policy": lineage.policy, "reward_model": lineage.reward_model}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
