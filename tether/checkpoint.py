"""Checkpoints: safetensors and JSON only (no pickle), written to a temporary folder and renamed into place.

Layout of ``<run>/checkpoints/step_000100/``:
- ``policy/``: ``save_pretrained`` folder (config, model.safetensors, tokenizer) loadable by transformers;
- ``value_head.safetensors`` or ``critic/``: the value model;
- ``optimizer.safetensors`` + ``trainer_state.json``: optimizer moments, step, KL coefficient, RNG state.
The reference and reward models are never saved again: the run config points at their folders.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tether.models import export_policy, is_peft_model

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


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
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, {"python": random.getstate()}


def save_checkpoint(path: Path, actor_critic, tokenizer, optimizer, state: dict) -> Path:
    """Write a complete PPO checkpoint atomically (a crash never leaves a half-written ``path``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_policy(actor_critic.policy).save_pretrained(tmp / "policy", safe_serialization=True)
    if is_peft_model(actor_critic.policy):  # the optimizer state belongs to the adapter: keep it for resuming
        actor_critic.policy.save_pretrained(tmp / "adapter", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "policy")
    if actor_critic.value_head is not None:
        save_file({k: v.contiguous() for k, v in actor_critic.value_head.state_dict().items()}, tmp / VALUE_HEAD_FILE)
    else:
        actor_critic.critic.save_pretrained(tmp / "critic", safe_serialization=True)
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    save_file({**opt_tensors, **rng_tensors}, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": opt_meta, "rng": rng_meta}, default=list))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_training_state(path: Path, actor_critic, optimizer) -> dict:
    """Restore value head, optimizer and RNG from a checkpoint (the policy weights load with from_pretrained)."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    if actor_critic.value_head is not None:
        actor_critic.value_head.load_state_dict(load_file(path / VALUE_HEAD_FILE))
    tensors = load_file(path / OPTIMIZER_FILE)
    opt_tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    optimizer_from_tensors(optimizer, opt_tensors, state["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    py_state = state["rng"]["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return state
