"""Checkpoints: safetensors and JSON only (no pickle), written to a temporary folder and renamed into place.

Layout of ``<run>/checkpoints/step_000100/``:
- ``policy/`` (PPO): ``save_pretrained`` folder (config, model.safetensors, tokenizer) loadable by transformers
  (a LoRA policy is merged; its adapter is in ``trainable.safetensors``);
- ``trainable.safetensors``: every trained tensor (PPO: policy and value model; SFT: the policy; reward: the reward
  model), exactly as trained (resume and rollback load it in place, whatever the architecture), except the policy's
  tensors that ``policy/`` holds bit for bit (a full fine-tune's: they are read from there, so the policy is on disk
  once; a LoRA adapter and the value model stay here);
- ``optimizer.safetensors``: optimizer moments plus every RNG state (torch, CUDA, the data-order generator);
- ``trainer_state.json``: iteration, optimizer step, KL controller, score normaliser, data position, python RNG,
  the resolved config. Written last; a folder is a checkpoint only once renamed from ``*.tmp`` to ``step_*``.
The reference and reward models are never saved again: the run config points at their folders.

Under torchrun every process calls :func:`save_checkpoint` and :func:`load_training_state`: rank 0 writes, and with
``distributed.strategy=fsdp`` the split weights and moments are gathered for it and split again on loading.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tether import distributed
from tether.errors import TetherError
from tether.lora import export_policy

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
    """Split an optimizer state dict into flat tensors (for safetensors) and JSON metadata. Moments FSDP split are
    gathered whole (every rank calls this; only rank 0 keeps the tensors)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                value = distributed.full_tensor(value)
                if distributed.is_main():
                    tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of :func:`optimizer_to_tensors` (``load_state_dict`` moves the moments onto the parameters' device;
    a moment of a parameter FSDP split is split like it first)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        param = params[int(pid)] if int(pid) < len(params) else None
        if param is not None and torch.is_tensor(value) and value.shape == param.shape:
            value = distributed.place_like(param, value)
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
    """Every parameter that requires grad (tied weights once), as contiguous CPU tensors. FSDP's split ones are
    gathered whole (every rank calls this; only rank 0 keeps them)."""
    out = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            param = distributed.full_tensor(param.detach())
            if distributed.is_main():
                out[name] = param.cpu().contiguous()
    return out


def save_checkpoint(
    path: Path, trained: torch.nn.Module, optimizer, state: dict, generator=None, policy=None, tokenizer=None
) -> Path:
    """Write a complete checkpoint of ``trained`` (its trained tensors), ``optimizer``, the RNGs and ``state``
    atomically: a crash at any moment never leaves a folder that loads as one. With ``policy`` and ``tokenizer``,
    also a transformers folder ``policy/`` one can sample from. Every process calls it; rank 0 writes, and the
    others return once the checkpoint is complete. Under FSDP each part is gathered whole for rank 0, written and
    freed before the next, so rank 0 holds one part at a time."""
    path, main = Path(path), distributed.is_main()
    tmp = path.with_name(path.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if policy is not None:
        policy_state = distributed.gathered_state_dict(policy)
        if main:
            exported, exported_state = export_policy(policy, policy_state)
            exported.save_pretrained(tmp / "policy", safe_serialization=True, state_dict=exported_state)
            tokenizer.save_pretrained(tmp / "policy")
        del policy_state
    weights = trainable_tensors(trained)
    if main:
        prefix = policy_prefix(trained, policy)
        weights = without_saved(weights, tmp / "policy", prefix) if prefix is not None else weights
        save_file(weights, tmp / TRAINABLE_FILE, metadata={"policy_prefix": prefix} if prefix is not None else None)
    del weights
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    if main:
        rng_tensors, rng_meta = rng_state(generator)
        save_file({**opt_tensors, **rng_tensors}, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": opt_meta, "rng": rng_meta}, default=list))
        publish(tmp, path)
    distributed.barrier()
    return path


def policy_prefix(trained: torch.nn.Module, policy: torch.nn.Module | None) -> str | None:
    """The prefix of the policy's parameter names inside ``trained`` (``"policy."`` in the actor-critic), or None."""
    if policy is None:
        return None
    return next((f"{name}." if name else "" for name, module in trained.named_modules() if module is policy), None)


def saved_tensors(folder: Path):
    """``(name, tensor)`` for each tensor of a saved model folder's safetensors files (memory-mapped, read as used)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def without_saved(weights: dict[str, torch.Tensor], folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """``weights`` less those named ``prefix + key`` that ``folder`` holds as ``key``, equal bit for bit."""
    kept = dict(weights)
    for key, saved in saved_tensors(folder):
        tensor = kept.get(prefix + key)
        if tensor is not None and saved.dtype == tensor.dtype and torch.equal(saved, tensor):
            del kept[prefix + key]
    return kept


def trained_weights(path: Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's trained tensors: ``trainable.safetensors``, and those of ``names`` (default: any) it lacks from
    ``policy/`` where :func:`save_checkpoint` left the policy's there."""
    with safe_open(path / TRAINABLE_FILE, framework="pt") as f:
        prefix = (f.metadata() or {}).get("policy_prefix")
    weights = load_file(path / TRAINABLE_FILE)
    if prefix is not None:
        for key, saved in saved_tensors(path / "policy"):
            name = prefix + key
            if name not in weights and (names is None or name in names):
                weights[name] = saved
    return weights


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing an earlier ``path`` (the same step written again,
    e.g. by the end-of-run save)."""
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def load_training_state(path: Path, trained, optimizer, generator=None, restore_rng: bool = True) -> dict:
    """Restore trained weights (in place, on their device), optimizer moments and RNG; returns trainer_state.json."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    weights = trained_weights(path, names)
    if set(weights) != names:
        missing, extra = sorted(names - set(weights))[:3], sorted(set(weights) - names)[:3]
        raise TetherError(
            f"checkpoint '{path}': trained weights do not match this model (missing {missing}, extra {extra})"
        )
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(distributed.place_like(params[name], value))
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
