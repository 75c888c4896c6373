"""Data parallelism on torch.distributed: the process group, this process's place in it, and the few collectives the
trainers need (docs/scaling.md).

``torchrun --nproc_per_node N -m tether ppo ...`` starts N processes and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init` joins them into a process group (gloo on the CPU, NCCL on CUDA). Each process holds a
full copy of every role and works on its share of every global batch: its block of rows (:func:`shard`). The trained
model runs under ``DistributedDataParallel``, which averages gradients over the processes; the trainers normalise
each rank's loss by the whole batch's count and multiply it by the world size, so the averaged gradient is the
one-process gradient. Everything here is a no-op on one process started without torchrun, so single-process runs
take exactly the code path they always took.

``tether/algo`` never sees a process group: the trainers gather or sum what a global statistic needs first.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tether.errors import TetherError

_collective_device = torch.device("cpu")  # where tensors for collectives live: the rank's GPU under NCCL


def launched_processes() -> int:
    """How many processes torchrun started (``WORLD_SIZE``; 1 without torchrun), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(backend: str = "auto", device_type: str = "cpu", timeout_minutes: float = 30.0) -> None:
    """Join torchrun's process group (once); nothing on a single process. ``backend='auto'``: NCCL when the models
    live on CUDA, gloo on the CPU."""
    global _collective_device
    if launched_processes() == 1 or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        if device_type != "cuda":
            raise TetherError("distributed.backend=nccl needs the models on CUDA (model.device); use gloo or auto")
        torch.cuda.set_device(local_rank())
        _collective_device = torch.device("cuda", local_rank())
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes: metrics, checkpoints, plots, summary.json, the saved model (rank 0)."""
    return rank() == 0


def check_divisible(name: str, value: int) -> None:
    """A global batch size must split evenly over the processes."""
    if value % world_size():
        raise TetherError(f"{name}={value} must be divisible by the number of processes ({world_size()})")


def shard(n: int) -> slice:
    """This rank's block of rows of a global batch of ``n``: contiguous, in rank order, sizes differ by 1 at most."""
    r, w = rank(), world_size()
    return slice(r * n // w, (r + 1) * n // w)


def barrier() -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a checkpoint the others will read)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_floats(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (one all-reduce; every rank must pass the same keys in the same order)."""
    if world_size() == 1:
        return values
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device)
    dist.all_reduce(total)
    return dict(zip(values, total.tolist()))


def max_int(value: int) -> int:
    """The largest ``value`` of any rank."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def agree_stop(received: list[int]) -> list[int]:
    """The stop signal as every rank sees it: ``[signum]`` if any rank caught SIGINT/SIGTERM, else ``[]``, so all
    ranks finish the same iteration, checkpoint together and stop together. On one process: ``received`` itself,
    which a signal arriving later still fills."""
    if world_size() == 1:
        return received
    signum = max_int(received[0] if received else 0)
    return [signum] if signum else []


def gather_rows(tensor: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
    """Every rank's (B, ...) ``tensor`` concatenated along dim 0 in rank order (each rank's B must be equal); a
    2-D tensor's dim 1 is first padded with ``fill`` to the longest on any rank (responses of different lengths)."""
    if world_size() == 1:
        return tensor
    flag = tensor.dtype == torch.bool  # gloo and NCCL gather no bools
    local = tensor.to(device=_collective_device, dtype=torch.uint8 if flag else tensor.dtype)
    if local.dim() == 2:
        local = F.pad(local, (0, max_int(local.shape[1]) - local.shape[1]), value=fill)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    out = torch.cat(parts).to(tensor.device)
    return out.bool() if flag else out


class Forward(nn.Module):
    """``fn(module, *args)`` as a module's forward: DDP synchronises gradients only of passes through its own
    forward, and some passes (a reward model's score at the last token) are functions of the model, not its
    forward."""

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)


def check_strategy(strategy: str) -> None:
    """``distributed.strategy``: 'ddp'; 'fsdp' is a one-line error until tether can gather sharded weights."""
    if strategy == "fsdp":
        raise TetherError(
            "distributed.strategy=fsdp is not implemented yet (checkpoints and the sampler need whole weights); use "
            "distributed.strategy=ddp, with model.lora_r and model.dtype=bfloat16 to save memory (docs/scaling.md)"
        )


def data_parallel(module: nn.Module, strategy: str = "ddp", fn=None) -> nn.Module:
    """What the trainers run forward and backward: ``module`` (or ``Forward(module, fn)``), under DDP when there
    are several processes. The trainers keep ``module`` itself for checkpoints, sampling and evaluation (under DDP
    its weights are the same tensors, identical on every rank).

    ``strategy='fsdp'`` is refused: ``fully_shard`` itself trains on gloo and the CPU, but tether's checkpoints, model
    export and sampler read whole parameters, and gathering sharded ones for them is not written yet (docs/scaling.md).
    """
    check_strategy(strategy)
    model = module if fn is None else Forward(module, fn)
    if world_size() == 1:
        return model
    device_ids = [local_rank()] if _collective_device.type == "cuda" else None
    # buffers (causal masks, rotary tables) are constants: nothing to sync at each forward
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def gradient_sync(model: nn.Module, sync: bool):
    """A context in which backward passes synchronise gradients (``sync``) or only accumulate them locally (DDP's
    ``no_sync``: every micro-batch of a minibatch but the last)."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
