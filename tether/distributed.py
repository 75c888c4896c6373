"""Data parallelism on torch.distributed: the process group, this process's place in it, and the few collectives the
trainers need (docs/scaling.md).

``torchrun --nproc_per_node N -m tether ppo ...`` starts N processes and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init` joins them into a process group (gloo on the CPU, NCCL on CUDA). Each process holds a
full copy of every role and works on its share of every global batch: its block of rows (:func:`shard`). The trained
model runs under ``DistributedDataParallel``, which averages gradients over the processes; the trainers normalise
each rank's loss by the whole batch's count and multiply it by the world size, so the averaged gradient is the
one-process gradient. With ``distributed.strategy=fsdp`` the trained model is split over the processes instead
(:func:`shard_model`); what needs its whole weights (sampling, evaluation, checkpoints, the saved model) gathers them
first (:func:`whole`, :func:`gathered_state_dict`, :func:`full_tensor`). Everything here is a no-op on one process
started without torchrun, so single-process runs take exactly the code path they always took.

``tether/algo`` never sees a process group: the trainers gather or sum what a global statistic needs first.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import warnings
import weakref
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


def shutdown(sync: bool = False) -> None:
    """Leave the process group (at the end of a command). ``sync`` (a command that ended normally, on every process)
    waits for all of them first, so that none tears its connections down while another is still using them."""
    if dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End a process that torchrun started, with ``code``, skipping Python's own teardown. Gloo's worker threads
    outlive ``destroy_process_group``; one that touches a Python object while the interpreter is being finalized
    aborts the process ('terminate called without an active exception', SIGABRT), which failed about one finished
    run in 70 with 2 processes. Everything tether writes is closed by now; the standard streams and logging are
    flushed here. Nothing on a single process."""
    if launched_processes() == 1:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


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


def block(n: int) -> tuple[slice, float]:
    """This rank's rows of a global batch of ``n`` (:func:`shard`) and their share of the batch. A rank whose block is
    empty (fewer rows than processes, e.g. an epoch's last batch) gets row 0 with share 0: it still runs the same
    forward and backward, so DDP's and FSDP's collectives never wait on it, and weighs it by 0."""
    rows = shard(n)
    if rows.start == rows.stop:
        return slice(0, 1), 0.0
    return rows, (rows.stop - rows.start) / n


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
    """``distributed.strategy``: 'ddp' or 'fsdp'; FSDP needs torch's public ``fully_shard`` (2.6 on)."""
    if strategy == "fsdp" and not hasattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard"):
        raise TetherError(f"distributed.strategy=fsdp needs torch>=2.6 (fully_shard), not {torch.__version__}")


def data_parallel(module: nn.Module, strategy: str = "ddp", fn=None) -> nn.Module:
    """What the trainers run forward and backward: ``module`` (or ``Forward(module, fn)``), under DDP or FSDP when
    there are several processes. The trainers keep ``module`` itself for checkpoints, sampling and evaluation: under
    DDP its weights are the same tensors, identical on every rank; under FSDP (:func:`shard_model`) each rank holds a
    shard, and those uses run inside :func:`whole`."""
    model = module if fn is None else Forward(module, fn)
    if world_size() == 1:
        return model
    if strategy == "fsdp":
        return shard_model(model)
    device_ids = [local_rank()] if _collective_device.type == "cuda" else None
    # buffers (causal masks, rotary tables) are constants: nothing to sync at each forward
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


_sharded: weakref.WeakSet = weakref.WeakSet()  # the roots of the models shard_model split
_whole: set[int] = set()  # ids of those roots gathered whole now (by an enclosing `whole`)


def shard_model(model: nn.Module) -> nn.Module:
    """``model`` split over the processes with PyTorch's ``fully_shard`` (FSDP2), in place: each transformer block
    (a Hugging Face model's ``_no_split_modules``) is one unit, gathered for its own forward and backward only; the
    rest (embeddings, final norm, heads) is the root unit. Parameters, gradients and optimizer moments then exist once
    over all processes (1/N each). Gradients are reduce-scattered as means over the processes, as under DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # tether never writes into a model's outputs in place, the one misuse this warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    mesh = init_device_mesh(_collective_device.type, (world_size(),))
    blocks = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    for unit in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # Settle which unit is the root now: the sampler calls the trunk, not the root, and FSDP otherwise takes the
    # first unit to run forward for the root.
    model._get_fsdp_state()._lazy_init()
    _sharded.add(model)
    return model


@contextlib.contextmanager
def whole(module: nn.Module):
    """A context in which ``module``, if FSDP split it (or split a model holding it), has its whole parameters on
    every process: gathered once on entry (a collective: every rank enters), kept through any number of forwards
    (sampling, scoring, evaluation, export), and split again on exit. Nothing otherwise."""
    roots = [r for r in _sharded if id(r) not in _whole and any(m is module for m in r.modules())]
    if not roots:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for r in roots for m in r.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    for root in roots:
        root.set_reshard_after_forward(False)
        _whole.add(id(root))
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for root in roots:
            root.set_reshard_after_forward(True)  # FSDP's defaults: blocks free their weights after forward,
            root.set_reshard_after_forward(False, recurse=False)  # the root keeps its own until backward
            _whole.discard(id(root))


def is_split(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a shard of a parameter (or its gradient or moment) FSDP split (a DTensor)."""
    if not _sharded:  # torch.distributed.tensor takes 0.6 s to import: only once FSDP has been used
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor FSDP split over the processes (a DTensor) gathered whole (a collective: every rank calls it in the
    same order); any other tensor as it is."""
    return tensor.full_tensor() if is_split(tensor) else tensor


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """``module``'s state dict with the tensors FSDP split gathered whole onto the CPU (a collective: every rank
    calls it; rank 0 gets the dict, the others ``{}``); tied weights stay one tensor. None when nothing of
    ``module`` is split: its own ``state_dict()`` is whole."""
    state = module.state_dict()
    if not any(is_split(t) for t in state.values()):
        return None
    whole: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        local = tensor.to_local() if is_split(tensor) else tensor
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(tensor.shape))  # tied: one key
        if key not in whole:
            gathered = full_tensor(tensor)  # every rank takes part in the gather
            whole[key] = gathered.detach().cpu() if is_main() else None
        out[name] = whole[key]
    return out if is_main() else {}


def place_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A whole ``value`` (e.g. read from a checkpoint) laid out like ``param``: this rank's shard if FSDP split
    ``param``, else ``value`` itself."""
    if not is_split(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)


def clip_grad_norm(params, max_norm: float) -> float:
    """``clip_grad_norm_`` over every process's gradients; returns the global norm before clipping."""
    return full_tensor(torch.nn.utils.clip_grad_norm_(list(params), max_norm)).item()


def gradient_sync(model: nn.Module, sync: bool):
    """A context in which backward passes synchronise gradients (``sync``) or only accumulate them locally (DDP's
    ``no_sync``: every micro-batch of a minibatch but the last). FSDP reduce-scatters every micro-batch's gradients
    into the shards (accumulating whole gradients locally would undo its memory saving)."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
