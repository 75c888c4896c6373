"""What every trainer shares: seeding, the run folder, learning-rate schedules, progress bars, model saving."""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from tether.config import RunConfig, to_dict
from tether.models import export_policy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(config: RunConfig, command: str) -> Path:
    """Create the run folder and write the resolved config into it as ``config.yaml``."""
    run_dir = Path(config.output_dir or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return run_dir


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def progress(total: int, desc: str):
    """A progress bar on stderr (quiet when stderr is not a terminal, e.g. in CI logs)."""
    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def save_model(model, tokenizer, path: Path) -> Path:
    """save_pretrained (safetensors) of a model and its tokenizer, written atomically."""
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_policy(model).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of a fresh random permutation of range(n), cut into ``batch_size`` pieces."""
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]
