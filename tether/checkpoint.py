"""Checkpoints: safetensors and JSON only (no pickle), written to a temporary folder and renamed into place.

Layout of ``<run>/checkpoints/step_000100/``:
- ``policy/`` (PPO): ``save_pretrained`` folder (config, model.safetensors, tokenizer) loadable by transformers
  (a LoRA policy is merged; its adapter is in ``trainable.safetensors``);
- ``trainable.safetensors``: every trained tensor (PPO: policy and value model; SFT: the policy; reward: the reward
  model), exactly as trained (resume and rollback load it in place, whatever the architecture);
- ``optimizer.safetensors``: optimizer moments plus every RNG state (torch, CUDA, the data-order generator);
- ``trainer_state.json``: iteration, optimizer step, KL controller, score normaliser, data position, python RNG,
  the resolved config. Written last; a folder is a checkpoint only once renamed from ``*.tmp`` to ``step_*``.
The reference and reward models are never saved again: the run config points at their folders.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tether.errors import TetherError
from tether.models import export_policy

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
STEP_PATTERN = re.compile(r"step_(\d{6})")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``*.tmp`` folders of an interrupted write are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_PATTERN.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_step(path: Path) -> int:
    return int(STEP_PATTERN.fullmatch(Path(path).name).group(1))


def checkpoint_command(path: Path) -> str:
    """The command that wrote a checkpoint: ``ppo``, ``sft`` or ``reward``."""
    return json.loads((Path(path) / STATE_FILE).read_text()).get("command", "ppo")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (for safetensors) and JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of :func:`optimizer_to_tensors` (``load_state_dict`` moves the moments onto the parameters' device)."""
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG a run draws from: torch (CPU and each CUDA device), python's ``random``, the data-order generator."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    if generator is not None:
        tensors["rng.data"] = generator.get_state()
    return tensors, {"python": random.getstate()}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if generator is not None and "rng.data" in tensors:
        generator.set_state(tensors["rng.data"])
    random.setstate(python_rng_state(meta["python"]))


def python_rng_state(saved: list) -> tuple:
    """A ``random.getstate()`` tuple back from its JSON form (lists instead of tuples)."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def trainable_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad (tied weights once), as contiguous CPU tensors."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path, trained: torch.nn.Module, optimizer, state: dict, generator=None, policy=None, tokenizer=None
) -> Path:
    """Write a complete checkpoint of ``trained`` (its trained tensors), ``optimizer``, the RNGs and ``state``
    atomically: a crash at any moment never leaves a folder that loads as one. With ``policy`` and ``tokenizer``,
    also a transformers folder ``policy/`` one can sample from."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if policy is not None:
        export_policy(policy).save_pretrained(tmp / "policy", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
    save_file(trainable_tensors(trained), tmp / TRAINABLE_FILE)
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    rng_tensors, rng_meta = rng_state(generator)
    save_file({**opt_tensors, **rng_tensors}, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": opt_meta, "rng": rng_meta}, default=list))
    if path.exists():  # the same step written again (e.g. the end-of-run save): replace it
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def load_training_state(path: Path, trained, optimizer, generator=None, restore_rng: bool = True) -> dict:
    """Restore trained weights (in place, on their device), optimizer moments and RNG; returns trainer_state.json."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    weights = load_file(path / TRAINABLE_FILE)
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    if set(weights) != names:
        missing, extra = sorted(names - set(weights))[:3], sorted(set(weights) - names)[:3]
        raise TetherError(
            f"checkpoint '{path}': trained weights do not match this model (missing {missing}, extra {extra})"
        )
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    tensors = load_file(path / OPTIMIZER_FILE)
    optimizer_from_tensors(
        optimizer, {k: v for k, v in tensors.items() if not k.startswith("rng.")}, state["optimizer"]
    )
    if restore_rng:
        set_rng_state(tensors, state["rng"], generator)
    return state


def prune_checkpoints(root: str | Path, keep: int, protect: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints and the one at step ``protect``; returns what was deleted."""
    if keep <= 0:
        return []
    found = list_checkpoints(root)
    doomed = [p for p in found[:-keep] if checkpoint_step(p) != protect]
    for p in doomed:  # renamed first, so a crash mid-delete never leaves a half-deleted folder named step_*
        trash = p.with_name(p.name + ".trash")
        p.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def clean_partial(root: str | Path) -> None:
    """Remove what an interrupted write or delete left behind (``*.tmp``, ``*.old``, ``*.trash`` folders)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.suffix in (".tmp", ".old", ".trash"):
                shutil.rmtree(p, ignore_errors=True)
