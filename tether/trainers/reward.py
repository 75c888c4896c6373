"""Reward-model training on {"prompt", "chosen", "rejected"} pairs with the Bradley-Terry loss.

``loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))``; the reward is read at the last real token of
prompt + response + EOS. A held-out split reports pairwise accuracy and margin (ppo_details #1-#4), and the Pearson
correlation of the score with response length: a length-biased reward model shows here before PPO exploits it.
``reward.max_length_gap`` trains on length-balanced pairs only (the tutorial's length remedy 3). Under torchrun each
process scores its block of every batch of pairs; the loss and metrics are the whole batch's.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from tether import distributed
from tether.algo import pairwise_reward_loss, pearson_correlation
from tether.config import RunConfig
from tether.data import preference_batch, preference_pairs, read_records
from tether.errors import TetherError
from tether.models import enable_gradient_checkpointing, load_tokenizer, new_scalar_model
from tether.passes import sequence_scores
from tether.precision import Placement
from tether.trainers.common import (
    Shown,
    PairOrder,
    StepCheckpoints,
    lr_factor,
    progress,
    save_model,
    saved_pad_id,
    set_lr,
    stop_requests,
)
from tether.tracking import MetricLogger

SHOWN = (Shown("rm/loss", "loss", "loss", trend=True), Shown("rm/accuracy", "acc", "accuracy"))
"""What the live bar and the summary line of `tether reward` show."""


def pair_scores(model, tokenizer, records, max_length: int, placement: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_scores, rejected_scores), each (B,) float32, from one forward pass (under autocast) over both halves."""
    batch = preference_batch(tokenizer, records, max_length)
    ids, mask = placement.move(batch.input_ids), placement.move(batch.attention_mask)
    with placement.autocast():
        scores = sequence_scores(model, ids, mask, tokenizer.eos_token_id)
    return scores[: batch.num_pairs], scores[batch.num_pairs :]


def response_tokens(tokenizer, response: str) -> int:
    """Length of a response in the tokenizer's tokens (without special tokens and EOS)."""
    return len(tokenizer(response, add_special_tokens=False)["input_ids"])


def length_balanced(tokenizer, records: list[dict], max_gap: int) -> list[dict]:
    """The pairs whose ``|len(chosen) - len(rejected)| < max_gap`` tokens (the tutorial's length remedy 3)."""
    return [
        r
        for r in records
        if abs(response_tokens(tokenizer, r["chosen"]) - response_tokens(tokenizer, r["rejected"])) < max_gap
    ]


@torch.no_grad()
def evaluate_pairs(model, tokenizer, records, max_length: int, placement: Placement, batch_size: int = 64) -> dict:
    """Pairwise accuracy, mean margin and loss of the reward model on ``records``, and ``length_corr``: the Pearson
    correlation between score and response length (tokens) over all chosen and rejected responses."""
    model.eval()
    chosen, rejected = [], []
    with distributed.whole(model):  # FSDP: every process scores with the whole weights
        for i in range(0, len(records), batch_size):
            c, r = pair_scores(model, tokenizer, records[i : i + batch_size], max_length, placement)
            chosen.append(c)
            rejected.append(r)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    loss, stats = pairwise_reward_loss(chosen, rejected)
    lengths = [response_tokens(tokenizer, r[side]) for side in ("chosen", "rejected") for r in records]
    length_corr = pearson_correlation(torch.cat([chosen, rejected]).cpu(), torch.tensor(lengths))
    return {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}, "length_corr": length_corr.item()}


def split_pairs(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, round(len(shuffled) * eval_fraction))
    if len(shuffled) - n_eval < 1:
        raise TetherError(f"reward.data: {len(records)} pairs are too few to hold out {eval_fraction:.0%}")
    return shuffled[n_eval:], shuffled[:n_eval]


def train_reward(config: RunConfig, run_dir: Path, echo=print, resume_from: Path | None = None) -> tuple[Path, dict]:
    """Train a reward model on ``config.reward.data``; returns (model folder, held-out metrics).

    Checkpoints every ``reward.save_every`` steps and on SIGINT/SIGTERM; ``resume_from`` continues from one exactly.
    """
    cfg = config.reward
    init = cfg.init or config.model.policy
    if init == "tiny":
        raise TetherError(
            "model.policy=tiny is a new, untrained model for `tether sft`; a reward model starts from a trained "
            "folder (set reward.init or model.policy, e.g. to runs/sft-.../model)"
        )
    placement = Placement.from_config(config.model)
    train, held_out = split_pairs(
        preference_pairs(read_records(cfg.data, ("prompt", "chosen", "rejected")), cfg.data),
        cfg.eval_fraction,
        config.seed,
    )
    tokenizer = load_tokenizer(config.model.tokenizer or init, config.model.trust_remote_code)
    train, pair_counts = balance_pairs(tokenizer, train, cfg.max_length_gap, echo)
    model = new_scalar_model(init, placement.trained_dtype, config.model.trust_remote_code)
    enable_gradient_checkpointing(config.model.gradient_checkpointing, model)
    model = placement.trained(model, cfg.lr)
    model.config.pad_token_id = saved_pad_id(model, tokenizer)
    distributed.check_divisible("reward.batch_size", cfg.batch_size)
    scorer = distributed.data_parallel(model, config.distributed.strategy, sequence_scores)  # forward and backward
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    checkpoints = StepCheckpoints("reward", run_dir, config, model, optimizer, cfg.save_every)
    order, held = PairOrder(len(train), cfg.batch_size, cfg.epochs, config.seed), None
    first, total = order.start(checkpoints, resume_from), order.total
    bar, start = progress(total, "reward", initial=first, shown=SHOWN, echo=echo), time.time()
    logger = MetricLogger.from_config(run_dir, config, echo, display=bar)
    with stop_requests() as stop, logger, bar:
        for step in range(first, total):
            batch = [train[i] for i in order.batch(step)]
            stats = reward_step(scorer, optimizer, tokenizer, batch, cfg, placement, step, total)
            bar.update(1)
            if step % 10 == 0:
                logger.log(stats | {"time/elapsed": time.time() - start}, step)
            if order.ends_epoch(step):  # the epoch's end: held-out metrics, logged at its last step
                held = evaluate_pairs(model, tokenizer, held_out, cfg.max_length, placement)
                logger.log({**{f"rm/eval_{k}": v for k, v in held.items()}, **pair_counts}, step)
            checkpoints.after_step(step + 1, total, stop, order.state())
    if held is None:  # resumed from a checkpoint written after the last step
        held = evaluate_pairs(model, tokenizer, held_out, cfg.max_length, placement)
    echo(
        f"reward model: held-out accuracy {held['accuracy']:.3f}, margin {held['margin']:.3f}, "
        f"score-length correlation {held['length_corr']:+.2f} on {len(held_out)} pairs"
    )
    return save_model(model, tokenizer, run_dir / "model", placement.dtype), held


def balance_pairs(tokenizer, train: list[dict], max_gap: int | None, echo=print) -> tuple[list[dict], dict]:
    """The training pairs ``reward.max_length_gap`` keeps (all when it is None), and the ``rm/pairs_*`` counts."""
    total = len(train)
    if max_gap is not None:  # only training pairs: the held-out set stays the same for comparison
        rule = f"|len(chosen) - len(rejected)| < {max_gap} tokens"
        train = length_balanced(tokenizer, train, max_gap)
        if not train:
            raise TetherError(
                f"reward.max_length_gap={max_gap}: none of the {total} training pairs has {rule}; "
                "raise it or set it to none"
            )
        echo(f"reward.max_length_gap={max_gap}: kept {len(train)} of {total} training pairs ({rule})")
    return train, {"rm/pairs_kept": len(train), "rm/pairs_total": total}


def reward_step(scorer, optimizer, tokenizer, batch, cfg, placement: Placement, step: int, total: int) -> dict:
    """One optimizer step of the pairwise loss (plus the centring term); returns its ``rm/*`` metrics.

    ``scorer(ids, mask, fill_id)`` gives a reward model's (B,) scores (:func:`tether.passes.sequence_scores`, under
    DDP on several processes); each process scores its block of the pairs, weighted by its share of the batch.
    """
    scorer.train()
    set_lr(optimizer, cfg.lr * lr_factor("linear", step, total))
    pairs = preference_batch(tokenizer, batch, cfg.max_length)  # the whole batch: the same padding on every rank
    part, share = distributed.block(pairs.num_pairs)  # share 0: no pairs here, one scored for the collectives
    mine = torch.arange(pairs.num_pairs)[part]
    rows = torch.cat([mine, mine + pairs.num_pairs])  # this rank's chosen rows, then its rejected rows
    ids, mask = placement.move(pairs.input_ids[rows]), placement.move(pairs.attention_mask[rows])
    with placement.autocast():
        scores = scorer(ids, mask, tokenizer.eos_token_id)
    chosen, rejected = scores[: len(mine)], scores[len(mine) :]
    loss, stats = pairwise_reward_loss(chosen, rejected)
    if cfg.center_coef:
        loss = loss + cfg.center_coef * ((chosen + rejected) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    (loss * (share * distributed.world_size())).backward()  # DDP averages over the processes
    params = [p for p in scorer.parameters() if p.grad is not None]
    distributed.clip_grad_norm(params, 1.0)
    optimizer.step()
    local = {"rm/loss": loss.item(), "rm/accuracy": stats["accuracy"].item(), "rm/margin": stats["margin"].item()}
    return distributed.sum_floats({k: v * share for k, v in local.items()})
