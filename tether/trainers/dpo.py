"""Direct Preference Optimization (Rafailov et al. 2023) on {"prompt", "chosen", "rejected"} pairs.

DPO is the offline alternative to a reward model plus PPO (the tutorial's 前言): the policy learns straight from
fixed pairs, with no sampling, no reward model and no value model. The loss is ``algo.dpo_loss`` on each response's
log-probs summed over its tokens (EOS included), chosen and rejected in one batch, against a frozen reference: a copy
of the starting policy, ``model.reference`` when given, or with ``model.lora_r > 0`` the same weights with the
adapter switched off (as in PPO). Pairs are read and split exactly as ``tether reward`` does (same held-out pairs for
the same seed and fraction); the held-out split reports DPO's implicit-reward accuracy and margin after each epoch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tether.algo import dpo_loss, logprobs_from_logits, masked_sum
from tether.config import RunConfig
from tether.data import preference_pairs, read_records, sft_batch
from tether.errors import TetherError
from tether.lora import AdapterDisabledReference, add_lora
from tether.models import enable_gradient_checkpointing, load_causal_lm, load_tokenizer, reference_copy
from tether.passes import gather_ids, model_inputs
from tether.precision import Placement
from tether.tracking import MetricLogger
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
    write_summary,
)
from tether.trainers.reward import split_pairs

SHOWN = (Shown("dpo/loss", "loss", "loss", trend=True), Shown("dpo/accuracy", "acc", "accuracy"))
"""What the live bar and the summary line of `tether dpo` show."""

CURVES = ["dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/chosen_reward", "dpo/rejected_reward", "dpo/eval_margin"]
"""The panels of a DPO run's curves.png."""


def policy_and_reference(config: RunConfig, placement: Placement):
    """(policy, reference, tokenizer) as ``config.model`` names them, placed; the reference is frozen."""
    m = config.model
    if m.policy == "tiny":
        raise TetherError(
            "model.policy=tiny is a new, untrained model for `tether sft`; DPO starts from a trained policy folder "
            "(e.g. model.policy=runs/sft-.../model)"
        )
    policy = load_causal_lm(m.policy, placement.trained_dtype, m.trust_remote_code, check_head=False)
    tokenizer = load_tokenizer(m.tokenizer or m.policy, m.trust_remote_code)
    if m.lora_r > 0:
        policy = add_lora(policy, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
    if m.reference:
        reference = load_causal_lm(m.reference, placement.frozen_dtype, m.trust_remote_code, check_head=False)
    elif m.lora_r > 0:  # the same weights with the adapter switched off: no second copy
        reference = AdapterDisabledReference(policy)
    else:
        reference = reference_copy(policy)
    enable_gradient_checkpointing(m.gradient_checkpointing, policy)  # after the reference copy
    return placement.trained(policy, config.dpo.lr).train(), placement.frozen(reference), tokenizer


def pair_logprobs(model, tokenizer, records, max_length: int, placement: Placement):
    """(chosen_logps, rejected_logps), each (B,) float32: log pi(response | prompt) summed over the response's tokens
    and EOS, from one forward pass (under autocast) over chosen rows then rejected rows."""
    rows = [{"prompt": r["prompt"], "response": r[side]} for side in ("chosen", "rejected") for r in records]
    ids, attention_mask, response_mask = (placement.move(t) for t in sft_batch(tokenizer, rows, max_length))
    eos = tokenizer.eos_token_id
    with placement.autocast():
        logits = model(**model_inputs(ids, attention_mask, eos), use_cache=False).logits[:, :-1]  # (2B, L-1, V)
    targets, response_mask = ids[:, 1:], response_mask[:, 1:]  # logits[:, t] predicts ids[:, t + 1]
    logps = masked_sum(logprobs_from_logits(logits, gather_ids(targets, response_mask, eos)), response_mask, dim=-1)
    return logps[: len(records)].float(), logps[len(records) :].float()


def dpo_batch_loss(policy, reference, tokenizer, records, cfg, placement: Placement):
    """(loss, stats) of ``algo.dpo_loss`` on ``records``; the reference's log-probs without gradients."""
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logprobs(reference, tokenizer, records, cfg.max_length, placement)
    chosen, rejected = pair_logprobs(policy, tokenizer, records, cfg.max_length, placement)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.label_smoothing)


def dpo_step(policy, reference, optimizer, tokenizer, batch, cfg, placement: Placement, step: int, total: int) -> dict:
    """One optimizer step of the DPO loss; returns its ``dpo/*`` metrics."""
    policy.train()
    set_lr(optimizer, cfg.lr * lr_factor("linear", step, total, cfg.warmup_steps))
    loss, stats = dpo_batch_loss(policy, reference, tokenizer, batch, cfg, placement)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    metrics = {"dpo/loss": loss.item(), **{f"dpo/{k}": v.item() for k, v in stats.items()}}
    return metrics | {"dpo/grad_norm": grad_norm.item(), "dpo/lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate_dpo(policy, reference, tokenizer, records, cfg, placement: Placement, batch_size: int = 64) -> dict:
    """DPO loss, accuracy, margin and mean implicit rewards of ``policy`` on ``records`` (all pairs at once)."""
    policy.eval()
    rows = []  # per chunk: (chosen, rejected, ref_chosen, ref_rejected) log-probs, each (chunk,)
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        rows.append(
            pair_logprobs(policy, tokenizer, chunk, cfg.max_length, placement)
            + pair_logprobs(reference, tokenizer, chunk, cfg.max_length, placement)
        )
    loss, stats = dpo_loss(*(torch.cat(column) for column in zip(*rows)), cfg.beta, cfg.label_smoothing)
    return {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}}


def read_pairs(config: RunConfig) -> tuple[list[dict], list[dict]]:
    """(train, held_out) pairs of ``dpo.data``, split as ``tether reward`` splits them."""
    cfg = config.dpo
    pairs = preference_pairs(read_records(cfg.data, ("prompt", "chosen", "rejected")), cfg.data)
    try:
        return split_pairs(pairs, cfg.eval_fraction, config.seed)
    except TetherError:
        raise TetherError(f"dpo.data: {len(pairs)} pairs are too few to hold out {cfg.eval_fraction:.0%}") from None


def train_dpo(config: RunConfig, run_dir: Path, echo=print, resume_from: Path | None = None) -> Path:
    """Train the policy with DPO on ``config.dpo.data``; returns the saved model folder ``<run_dir>/model``.

    Writes ``metrics.jsonl`` and ``summary.json``; checkpoints every ``dpo.save_every`` steps and on SIGINT/SIGTERM,
    and ``resume_from`` continues from one exactly.
    """
    cfg, run_dir = config.dpo, Path(run_dir)
    placement = Placement.from_config(config.model)
    train, held_out = read_pairs(config)
    policy, reference, tokenizer = policy_and_reference(config, placement)
    trained = [p for p in policy.parameters() if p.requires_grad]  # a LoRA policy trains its adapter only
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    checkpoints = StepCheckpoints("dpo", run_dir, config, policy, optimizer, cfg.save_every)
    order, held = PairOrder(len(train), cfg.batch_size, cfg.epochs, config.seed), None
    first, total = order.start(checkpoints, resume_from), order.total
    bar, start = progress(total, "dpo", initial=first, shown=SHOWN, echo=echo), time.time()
    logger = MetricLogger.from_config(run_dir, config, echo, display=bar)
    with stop_requests() as stop, logger, bar:
        for step in range(first, total):
            batch = [train[i] for i in order.batch(step)]
            stats = dpo_step(policy, reference, optimizer, tokenizer, batch, cfg, placement, step, total)
            bar.update(1)
            if step % 10 == 0 or step == total - 1:
                logger.log(stats | {"time/elapsed": time.time() - start}, step)
            if order.ends_epoch(step):  # the epoch's end: held-out metrics, logged at its last step
                held = evaluate_dpo(policy, reference, tokenizer, held_out, cfg, placement)
                logger.log({f"dpo/eval_{k}": v for k, v in held.items()}, step)
            checkpoints.after_step(step + 1, total, stop, order.state())
    if held is None:  # resumed from a checkpoint written after the last step
        held = evaluate_dpo(policy, reference, tokenizer, held_out, cfg, placement)
    echo(
        f"dpo: held-out accuracy {held['accuracy']:.3f}, margin {held['margin']:.3f}, "
        f"loss {held['loss']:.3f} on {len(held_out)} pairs"
    )
    policy.generation_config.pad_token_id = saved_pad_id(policy, tokenizer)
    path = save_model(policy, tokenizer, run_dir / "model", placement.dtype)
    summary = {"steps": total, "train_pairs": len(train), "eval_pairs": len(held_out), "eval": held}
    write_summary(run_dir, summary | {"model": str(path)})
    return path
