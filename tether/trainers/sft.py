"""Supervised fine-tuning on {"prompt", "response"} records (or {"messages"} conversations): the starting point (and
reference) of PPO.

The loss is the mean next-token cross-entropy over response tokens (and EOS); prompt tokens are not learned. Under
torchrun each process takes its block of every batch and divides its summed loss by the whole batch's token count.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from tether import distributed
from tether.algo import masked_sum
from tether.checkpoint import python_rng_state
from tether.config import RunConfig
from tether.data import prompt_label, read_records, sft_batch, sft_examples
from tether.models import (
    char_tokenizer,
    enable_gradient_checkpointing,
    fuse_activations,
    load_causal_lm,
    load_tokenizer,
    tiny_config,
)
from tether.passes import model_inputs
from tether.precision import Placement
from tether.trainers.common import (
    Shown,
    StepCheckpoints,
    lr_factor,
    progress,
    save_model,
    saved_pad_id,
    set_lr,
    stop_requests,
)
from tether.tracking import MetricLogger

SHOWN = (Shown("sft/loss", "loss", "loss", trend=True), Shown("sft/token_accuracy", "acc", "token accuracy"))
"""What the live bar and the summary line of `tether sft` show."""


def initial_policy(config: RunConfig, texts: list[str], dtype: str | torch.dtype = "float32"):
    """(policy, tokenizer): a local model folder (loaded in ``dtype``), or for 'tiny' a fresh small GPT-2 with a
    character tokenizer."""
    model_cfg = config.model
    if model_cfg.policy == "tiny":
        tokenizer = load_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer else char_tokenizer("".join(texts))
        shape = tiny_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        policy = fuse_activations(GPT2LMHeadModel(shape))
        return policy, tokenizer
    tokenizer = load_tokenizer(model_cfg.tokenizer or model_cfg.policy, model_cfg.trust_remote_code)
    return load_causal_lm(model_cfg.policy, dtype, model_cfg.trust_remote_code, check_head=False), tokenizer


def sft_loss(policy, ids, attention_mask, loss_mask, fill_id: int, num_tokens: float | None = None):
    """(loss, token_accuracy): cross-entropy of each response token given everything before it, summed and divided
    by ``num_tokens`` (default: the batch's own response tokens, a mean; a process of a data-parallel run gives the
    whole batch's)."""
    logits = policy(**model_inputs(ids, attention_mask, fill_id), use_cache=False).logits[:, :-1].float()
    targets, mask = ids[:, 1:], loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(mask == 0, 0), reduction="none")
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    accuracy = masked_sum((logits.argmax(-1) == targets).float(), mask) / num_tokens
    return masked_sum(nll, mask) / num_tokens, accuracy


def train_sft(config: RunConfig, run_dir: Path, echo=print, resume_from: Path | None = None) -> Path:
    """Fine-tune the policy on ``config.sft.data``; returns the saved model folder ``<run_dir>/model``.

    Checkpoints every ``sft.save_every`` steps and on SIGINT/SIGTERM; ``resume_from`` continues from one exactly.
    """
    cfg = config.sft
    placement = Placement.from_config(config.model)
    records = sft_examples(read_records(cfg.data, ()), cfg.data)
    texts = [prompt_label(r["prompt"]) + r["response"] for r in records]
    policy, tokenizer = initial_policy(config, texts, placement.trained_dtype)
    enable_gradient_checkpointing(config.model.gradient_checkpointing, policy)
    policy = placement.trained(policy, cfg.lr).train()
    distributed.check_divisible("sft.batch_size", cfg.batch_size)
    model = distributed.data_parallel(policy, config.distributed.strategy)  # what runs forward and backward
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    checkpoints = StepCheckpoints("sft", run_dir, config, policy, optimizer, cfg.save_every)
    rng, first = random.Random(config.seed), 0
    if resume_from is not None:
        state = checkpoints.resume(resume_from)
        first = state["step"]
        rng.setstate(python_rng_state(state["sample_rng"]))
    bar, start = progress(cfg.steps, "sft", initial=first, shown=SHOWN, echo=echo), time.time()
    logger = MetricLogger.from_config(run_dir, config, echo, display=bar)
    with stop_requests() as stop, logger, bar:
        for step in range(first, cfg.steps):
            set_lr(optimizer, cfg.lr * lr_factor("cosine", step, cfg.steps, cfg.warmup_steps))
            examples = rng.sample(records, min(cfg.batch_size, len(records)))
            loss, accuracy = sft_step(model, optimizer, tokenizer, examples, cfg.max_length, placement)
            grad_norm = distributed.clip_grad_norm(policy.parameters(), 1.0)
            optimizer.step()
            bar.update(1)
            if step % 10 == 0 or step == cfg.steps - 1:
                stats = {"sft/loss": loss, "sft/token_accuracy": accuracy, "sft/grad_norm": grad_norm}
                stats |= {"sft/lr": optimizer.param_groups[0]["lr"], "time/elapsed": time.time() - start}
                logger.log({k: float(v) for k, v in stats.items()}, step)
            checkpoints.after_step(step + 1, cfg.steps, stop, {"sample_rng": rng.getstate()})
    policy.generation_config.pad_token_id = saved_pad_id(policy, tokenizer)
    return save_model(policy, tokenizer, run_dir / "model", placement.dtype)


def sft_step(model, optimizer, tokenizer, examples: list[dict], max_length: int, placement: Placement):
    """Forward and backward of this process's block of a batch (the whole batch on one process): gradients
    in ``model``, and the batch's (loss, token_accuracy) over every process's tokens."""
    ids, attention_mask, loss_mask = sft_batch(tokenizer, examples, max_length)  # the same padding on every rank
    num_tokens = loss_mask[:, 1:].sum().float().clamp(min=1).item()
    rows, share = distributed.block(len(examples))
    weight = 1.0 if share else 0.0  # 0: no examples here, one run for the collectives (the loss is normalised already)
    batch = [placement.move(t[rows]) for t in (ids, attention_mask, loss_mask)]
    with placement.autocast():  # bf16 forward; sft_loss takes float32 logits
        loss, accuracy = sft_loss(model, *batch, fill_id=tokenizer.eos_token_id, num_tokens=num_tokens)
    optimizer.zero_grad(set_to_none=True)
    (loss * (weight * distributed.world_size())).backward()  # DDP averages over the processes: the sum is the batch's
    totals = distributed.sum_floats({"loss": loss.item() * weight, "accuracy": accuracy.item() * weight})
    return totals["loss"], totals["accuracy"]
