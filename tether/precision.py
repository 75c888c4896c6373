"""Where every role lives and in which precision: one :class:`Placement`, built once from ``config.model``.

The PPO trainer, the reward scorer, the SFT and reward-model trainers, the demo, the evaluation and the legacy API
all take their device, dtypes and autocast from it; none of them calls ``.to(device)`` or casts on its own.

``model.dtype=bfloat16`` means what accelerate's and TRL's ``bf16=True`` mean: the trained models (policy, value
head or critic) keep float32 master weights and float32 Adam state, forward passes run under bf16 autocast (on CUDA
and on the CPU), and the PPO maths (log-softmax, ratios, KL, GAE, losses) stays in float32. Frozen roles (reference,
reward model) never update, so they are held in bf16 outright, which halves their memory. Saved models are written
in ``model.dtype``. ``model.master_weights=dtype`` opts into bf16 trained weights (less memory); an Adam step moves a
weight by about ``lr``, and bf16 keeps 8 significant bits, so updates below about ``|w| / 512`` round away: it warns
when that is true of the median trained weight. float16 would need a gradient scaler and is refused.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from tether.distributed import launched_processes, local_rank
from tether.errors import TetherError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far, GiB: what torch allocated on a CUDA device, else its peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory for the next allocation instead of giving it back to the system at once.

    By default glibc serves every allocation above 32 MiB (a vocabulary-sized logits or gradient tensor, an embedding
    gradient) with a fresh ``mmap`` and unmaps it when freed, so the kernel zero-fills and page-faults it in again at
    every step: a fifth to a quarter of a SmolLM2 update on a 2-core CPU. Here large blocks come from the heap and
    stay mapped; the process keeps its high-water mark (about 10% more resident memory). Linux with glibc only;
    returns whether it applied. ``model.cpu_memory=release`` leaves glibc's settings as they are.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    most = 2**31 - 1  # mallopt takes an int
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        libc.mallopt(option, value) == 1
        for option, value in ((m_mmap_threshold, most), (m_trim_threshold, most), (m_top_pad, 512 * 2**20))
    )


def cpu_has_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 in hardware: on x86, AVX-512 BF16 or AMX (whose tiles come with bf16). None
    where torch cannot tell (other architectures, PyTorch without the probes)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() not in ("x86_64", "amd64") or None in probes:
        return None
    return any(probe() for probe in probes)


def resolve_device(name: str = "auto", field: str = "model.device") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device. Under torchrun, 'auto' and
    'cuda' mean this process's GPU, ``cuda:LOCAL_RANK``. Errors name the setting as ``field``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched_processes() > 1:
        name = f"cuda:{local_rank()}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TetherError(f"{field} '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TetherError(f"{field} '{name}': torch finds no CUDA device here (use auto or cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TetherError(f"{field} '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass(frozen=True)
class Placement:
    """The device and precision of every role.

    Args:
        device: where every model and tensor lives.
        dtype: the precision asked for: autocast's dtype, the frozen roles' dtype and the saved models' dtype.
        master_weights: "float32" (trained weights and Adam state in float32) or "dtype" (held in ``dtype``).
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    master_weights: str = "float32"

    @classmethod
    def from_config(cls, model) -> Placement:
        """The placement ``config.model`` (a :class:`tether.config.ModelConfig`) asks for."""
        if model.dtype == "float16":
            raise TetherError(
                "model.dtype=float16 needs a gradient scaler, which tether does not have; use model.dtype=bfloat16"
            )
        device = resolve_device(model.device)
        if device.type == "cpu" and model.cpu_memory == "reuse":
            reuse_freed_memory()
        if device.type == "cpu" and model.dtype == "bfloat16" and cpu_has_bf16() is False:
            warnings.warn(
                "model.dtype=bfloat16: this CPU has no bf16 instructions (AVX-512 BF16 or AMX), so bf16 is emulated "
                "and runs slower than float32 (2.4x slower with AVX-512, 20x with AVX2 only, docs/real-models.md); "
                "use model.dtype=float32",
                stacklevel=2,
            )
        return cls(device, DTYPES[model.dtype], model.master_weights)

    @property
    def trained_dtype(self) -> torch.dtype:
        """Dtype of the weights that train: float32 master weights unless ``master_weights='dtype'``."""
        return self.dtype if self.master_weights == "dtype" else torch.float32

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Dtype of the frozen roles (reference, reward model): ``dtype``, since they never update."""
        return self.dtype

    def trained(self, module: nn.Module, lr: float | None = None) -> nn.Module:
        """``module`` (in place) on the device in :attr:`trained_dtype`; warns if ``lr`` is too small for it."""
        module = module.to(device=self.device, dtype=self.trained_dtype)
        if lr is not None and self.trained_dtype != torch.float32:
            stuck = frozen_fraction(module, lr)
            if stuck > 0.5:
                warnings.warn(
                    f"model.master_weights=dtype: at lr {lr:g}, updates round away for {stuck:.0%} of the trained "
                    f"weights in {str(self.trained_dtype).removeprefix('torch.')} (a step below about |w|/512 is "
                    "lost); use model.master_weights=float32",
                    stacklevel=2,
                )
        return module

    def frozen(self, module: nn.Module) -> nn.Module:
        """``module`` (in place) on the device in :attr:`frozen_dtype`, in eval mode, without gradients."""
        return module.to(device=self.device, dtype=self.frozen_dtype).eval().requires_grad_(False)

    def autocast(self):
        """The context forward passes run in: bf16 autocast on the device, or nothing for float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def move(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device."""
        return tensor.to(self.device)


def frozen_fraction(module: nn.Module, lr: float, sample: int = 1_000_000) -> float:
    """Fraction of the trainable weights an update of size ``lr`` cannot move in their own dtype.

    An update rounds away when it is below half a unit in the last place: between ``|w| * eps / 4`` and
    ``|w| * eps / 2``, taken here as ``|w| * eps / 4`` (``|w| / 512`` in bf16, where eps = 2**-7). Measured on an
    evenly strided sample of at most ``sample`` weights.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if not total:
        return 0.0
    stride = max(1, total // sample)
    weights = torch.cat([p.detach().flatten()[::stride].abs().float().cpu() for p in params])
    return (weights * torch.finfo(params[0].dtype).eps / 4 > lr).float().mean().item()


def state_dict_in(module: nn.Module, dtype: torch.dtype, state: dict | None = None) -> dict[str, torch.Tensor] | None:
    """``state`` (default: ``module``'s state dict) with its floating tensors cast to ``dtype`` on the CPU; when all
    already are, ``state`` as given (None by default: the module's own).

    Tied weights (one storage under two names) are cast once and stay tied, so ``save_pretrained`` still sees them.
    """
    given = state
    state = module.state_dict() if state is None else state
    if all(not t.is_floating_point() or t.dtype == dtype for t in state.values()):
        return given
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.detach().to(device="cpu", dtype=dtype)
        out[name] = copies[key]
    return out
