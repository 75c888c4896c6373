"""Reward-model training on {"prompt", "chosen", "rejected"} pairs with the Bradley-Terry loss.

``loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))``; the reward is read at the last real token of
prompt + response + EOS. A held-out split reports pairwise accuracy and margin (ppo_details #1-#4).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from tether.algo import pairwise_reward_loss
from tether.config import RunConfig
from tether.data import preference_batch, read_records
from tether.errors import TetherError
from tether.models import load_tokenizer, new_scalar_model, resolve_device, sequence_scores
from tether.trainers.common import lr_factor, progress, save_model, set_lr
from tether.tracking import MetricLogger


def pair_scores(model, tokenizer, records, max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_scores, rejected_scores), each (B,), from one forward pass over both halves."""
    batch = preference_batch(tokenizer, records, max_length)
    scores = sequence_scores(
        model, batch.input_ids.to(device), batch.attention_mask.to(device), tokenizer.eos_token_id
    )
    return scores[: batch.num_pairs], scores[batch.num_pairs :]


@torch.no_grad()
def evaluate_pairs(model, tokenizer, records, max_length: int, device, batch_size: int = 64) -> dict:
    """Pairwise accuracy, mean margin and loss of the reward model on ``records``."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(records), batch_size):
        c, r = pair_scores(model, tokenizer, records[i : i + batch_size], max_length, device)
        chosen.append(c)
        rejected.append(r)
    loss, stats = pairwise_reward_loss(torch.cat(chosen), torch.cat(rejected))
    return {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}}


def split_pairs(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, round(len(shuffled) * eval_fraction))
    if len(shuffled) - n_eval < 1:
        raise TetherError(f"reward.data: {len(records)} pairs are too few to hold out {eval_fraction:.0%}")
    return shuffled[n_eval:], shuffled[:n_eval]


def train_reward(config: RunConfig, run_dir: Path, echo=print) -> tuple[Path, dict]:
    """Train a reward model on ``config.reward.data``; returns (model folder, held-out metrics)."""
    cfg = config.reward
    records = read_records(cfg.data, ("prompt", "chosen", "rejected"))
    train, held_out = split_pairs(records, cfg.eval_fraction, config.seed)
    init = cfg.init or config.model.policy
    tokenizer = load_tokenizer(config.model.tokenizer or init, config.model.trust_remote_code)
    device = resolve_device(config.model.device)
    model = new_scalar_model(init, config.model.dtype, config.model.trust_remote_code).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    logger = MetricLogger.from_config(run_dir, config, echo)
    rng, bar, start, step = random.Random(config.seed), progress(total, "reward"), time.time(), 0
    for _epoch in range(cfg.epochs):
        rng.shuffle(train)
        for i in range(0, len(train), cfg.batch_size):
            model.train()
            set_lr(optimizer, cfg.lr * lr_factor("linear", step, total))
            chosen, rejected = pair_scores(model, tokenizer, train[i : i + cfg.batch_size], cfg.max_length, device)
            loss, stats = pairwise_reward_loss(chosen, rejected)
            if cfg.center_coef:
                loss = loss + cfg.center_coef * ((chosen + rejected) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            bar.update(1)
            if step % 10 == 0:
                logger.log(
                    {
                        "rm/loss": loss.item(),
                        "rm/accuracy": stats["accuracy"].item(),
                        "rm/margin": stats["margin"].item(),
                        "time/elapsed": time.time() - start,
                    },
                    step,
                )
            step += 1
        held = evaluate_pairs(model, tokenizer, held_out, cfg.max_length, device)
        logger.log({f"rm/eval_{k}": v for k, v in held.items()}, step)
    bar.close()
    logger.close()
    echo(
        f"reward model: held-out accuracy {held['accuracy']:.3f}, margin {held['margin']:.3f} on {len(held_out)} pairs"
    )
    return save_model(model, tokenizer, run_dir / "model"), held
