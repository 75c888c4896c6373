"""Frozen roles off the device between their uses (``model.offload_frozen``).

PPO needs the reference and the reward model only while a rollout is scored; sampling and the update, where the
memory peaks, never read them. With ``model.offload_frozen`` their weights leave the device for the rest of the
iteration (OpenRLHF's ``--ref_reward_offload`` does the same on GPUs):

- on a GPU, to pinned CPU memory, copied back (asynchronously, on the current stream) before each scoring;
- on a CPU, to a scratch file in the temporary directory (``TMPDIR``), read back before each scoring: while the
  weights are away they are in the operating system's file cache at most, which the kernel can drop under memory
  pressure. Keep ``TMPDIR`` on a disk: a tmpfs (RAM) ``/tmp`` saves the process nothing.

Frozen weights never change, so their copy is made once, at the first eviction. Parameters a trained model shares (a
LoRA policy's base weights, which its reference reuses with the adapter off) are never moved.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref

import torch
from torch import nn

from tether.errors import TetherError


class Offloaded:
    """The parameters of frozen ``modules``, which :meth:`evict` takes off the device and :meth:`restore` brings back.

    Args:
        modules: frozen models (None entries skipped).
        keep: a module whose parameters must stay (the trained actor-critic: weights it shares are not moved).
    """

    def __init__(self, modules, keep: nn.Module | None = None):
        kept = {id(p) for p in keep.parameters()} if keep is not None else set()
        seen: dict[int, nn.Parameter] = {}
        for module in modules:
            for p in module.parameters() if module is not None else ():
                if id(p) not in kept:
                    seen.setdefault(id(p), p)  # a tied weight is one Parameter: moved once, stays tied
        self.params = list(seen.values())
        self.resident = True
        self.home: _PinnedCopy | _FileCopy | None = None

    def evict(self) -> None:
        """Free the parameters' device memory (the copy elsewhere is made the first time)."""
        if not self.resident or not self.params:
            return
        if self.home is None:
            cpu = self.params[0].device.type == "cpu"
            self.home = _FileCopy(self.params) if cpu else _PinnedCopy(self.params)
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.resident = False

    def restore(self) -> None:
        """The parameters back on their device, as they were."""
        if self.resident:
            return
        for p, tensor in zip(self.params, self.home.load(self.params)):
            p.data = tensor
        self.resident = True


@contextlib.contextmanager
def present(*offloaded: Offloaded | None):
    """Inside the block the evicted ones of ``offloaded`` (None skipped) are restored; they leave again after it."""
    away = [o for o in offloaded if o is not None and not o.resident]
    for o in away:
        o.restore()
    try:
        yield
    finally:
        for o in away:
            o.evict()


@contextlib.contextmanager
def evicted(*offloaded: Offloaded | None):
    """Inside the block ``offloaded`` (None skipped) are off the device, except where :func:`present` brings them
    back; afterwards they are restored."""
    here = [o for o in offloaded if o is not None and o.resident]
    for o in here:
        o.evict()
    try:
        yield
    finally:
        for o in here:
            o.restore()


class _PinnedCopy:
    """A GPU's parameters in pinned CPU memory (page-locked, so the copy back is asynchronous)."""

    def __init__(self, params: list[nn.Parameter]):
        self.tensors = [p.detach().to("cpu", copy=True) for p in params]
        if torch.cuda.is_available():
            self.tensors = [t.pin_memory() for t in self.tensors]

    def load(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        return [t.to(p.device, non_blocking=True) for t, p in zip(self.tensors, params)]


class _FileCopy:
    """A CPU's parameters as raw bytes in a scratch file, deleted when this object goes (or the process ends).

    Read back with ``readinto`` into freshly allocated tensors, not memory-mapped: the allocator hands the update's
    freed memory to the restored weights, where mapped file pages would add to the process's high-water mark."""

    def __init__(self, params: list[nn.Parameter]):
        self.shapes = [(p.shape, p.dtype) for p in params]
        try:
            fd, self.path = tempfile.mkstemp(prefix="tether-frozen-", suffix=".bin")
            self._remove = weakref.finalize(self, _unlink, self.path)
            with os.fdopen(fd, "wb") as f:
                for p in params:
                    f.write(_bytes(p.detach().contiguous()))
        except OSError as error:
            raise TetherError(
                f"model.offload_frozen: cannot write the frozen roles to {tempfile.gettempdir()} ({error.strerror}); "
                "set TMPDIR to a folder on a disk with room for them"
            ) from None

    def load(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in self.shapes]
        with open(self.path, "rb", buffering=0) as f:
            for tensor in tensors:
                view, done = _bytes(tensor), 0
                while done < len(view):
                    done += f.readinto(view[done:])
        return tensors


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable view (no copy)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
