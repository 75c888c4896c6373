"""What ``PPOTrainer`` checks and derives from its constructor's arguments, as TRL 0.11 did."""

from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling

from tether.config import RunConfig
from tether.legacy.config import PPOConfig
from tether.legacy.errors import LegacyValueError
from tether.legacy.value_head import AutoModelForCausalLMWithValueHead


def check_arguments(config, model, ref_model, tokenizer, optimizer, lr_scheduler) -> None:
    """One-line LegacyValueErrors (ValueErrors, as TRL raised) for arguments PPOTrainer cannot use."""
    if not isinstance(config, PPOConfig):
        raise LegacyValueError(f"PPOTrainer: config must be a tether.legacy.PPOConfig, got {type(config).__name__}")
    if not isinstance(model, AutoModelForCausalLMWithValueHead):
        raise LegacyValueError(
            f"PPOTrainer: model must be an AutoModelForCausalLMWithValueHead, got {type(model).__name__}"
        )
    if tokenizer is None or getattr(tokenizer, "eos_token_id", None) is None:
        raise LegacyValueError("PPOTrainer: a tokenizer with an eos_token is required")
    if ref_model is model:
        raise LegacyValueError("PPOTrainer: ref_model must be a separate copy of the model (or None)")
    is_lm = callable(getattr(ref_model, "get_output_embeddings", None))
    if ref_model is not None and not (is_lm or isinstance(ref_model, AutoModelForCausalLMWithValueHead)):
        raise LegacyValueError(
            f"PPOTrainer: ref_model must be a value-head model or a causal LM, got {type(ref_model).__name__}"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise LegacyValueError(f"PPOTrainer: optimizer must be a torch optimizer, got {type(optimizer).__name__}")
    if lr_scheduler is not None:
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise LegacyValueError("PPOTrainer: lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler")
        if optimizer is None or lr_scheduler.optimizer is not optimizer:
            raise LegacyValueError(
                "PPOTrainer: lr_scheduler must schedule the optimizer given as optimizer= (the default Adam is built "
                "inside the trainer)"
            )


def training_collator(collator, tokenizer):
    """TRL's training collator: a causal-LM ``DataCollatorForLanguageModeling``, the only kind tether's own
    padding reproduces; any other is refused."""
    if collator is None:
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    if isinstance(collator, DataCollatorForLanguageModeling) and not collator.mlm:
        return collator
    raise LegacyValueError(
        "PPOTrainer: training_data_collator is not supported (tether pads queries and responses itself); leave it "
        "out, or pass DataCollatorForLanguageModeling(tokenizer, mlm=False)"
    )


def run_config_for(config: PPOConfig, model: AutoModelForCausalLMWithValueHead) -> RunConfig:
    """``config``'s RunConfig, with the precision of a policy loaded in bfloat16: trained in bfloat16 (as TRL
    trained it), not upcast to float32 master weights."""
    run = config.to_run_config()
    dtype = next(model.pretrained_model.parameters()).dtype
    if dtype == torch.float16:
        raise LegacyValueError(
            "PPOTrainer: the model is in float16, which needs a gradient scaler tether does not have; load it with "
            "torch_dtype=torch.bfloat16 or float32"
        )
    if dtype == torch.bfloat16:
        run.model.dtype, run.model.master_weights = "bfloat16", "dtype"
    return run
