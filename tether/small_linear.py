"""A float32 multiply for a decoding step's few rows on AVX-512 CPUs, built from C++ on first use.

At 16 rows a linear layer's weight is used for 16 multiply-adds per value read, and the time should be the time to
read the weight. oneDNN's packed multiply reads and computes in turn: on a 2-core Xeon (AMX, AVX-512) a SmolLM2
gate/up projection (3072 x 576) takes 560-650 µs at 16 rows and 325-375 µs at one. ``csrc/small_linear.cpp`` packs
each weight in panels of 16 output columns and prefetches ahead as it streams one: 420 µs (BENCHMARKS.md). It serves
up to :data:`ROWS` rows; above that oneDNN's blocked multiply is faster (16 rows at a time re-read each panel).

It is built by ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``, as ``torch.compile`` on the CPU needs a
compiler; 15-30 s on two cores, once per machine: torch keeps the build) where ``sampling.compile`` asks for it.
Where it cannot be built, or this CPU lacks AVX-512, :func:`available` says False (with one warning for a failed
build) and the decoder keeps oneDNN's multiply.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

ROWS = 16  # the most rows a step sends through the kernel
LANES = 16  # a packed panel's output columns: a weight's rows must be a multiple of this
SOURCE = Path(__file__).parent / "csrc" / "small_linear.cpp"

_BUILT: dict[str, bool] = {}


def available() -> bool:
    """Whether the kernel runs here: an AVX-512 CPU and the extension built and loaded (built once per process,
    on the first call)."""
    if "ok" not in _BUILT:
        _BUILT["ok"] = _build()
    return _BUILT["ok"]


def _build() -> bool:
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-mavx512f", "-fopenmp"]  # OpenMP: torch's own runtime, for at::parallel_for's threads
        load("tether_small_linear", [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
             is_python_module=False)  # fmt: skip
    except Exception as error:  # no compiler, no ninja, a failed build: oneDNN's multiply instead
        lines = str(error).strip().splitlines() or [""]
        reason = next((line for line in lines if "error:" in line), lines[0])[:200]
        warnings.warn(f"sampling.compile: the small-batch multiply was not built ({type(error).__name__}: {reason}); "
                      "sampling uses oneDNN's", stacklevel=3)  # fmt: skip
        return False
    torch.library.register_fake("tether_small_linear::linear", _linear_shape)
    return True


def _linear_shape(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * LANES)


def packable(weight: torch.Tensor) -> bool:
    """A float32 (N, K) weight with N a multiple of :data:`LANES`."""
    return weight.dtype == torch.float32 and weight.dim() == 2 and weight.shape[0] % LANES == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The (N/16, K, 16) panels of an (N, K) float32 weight, for :func:`linear` (a copy: as much memory again)."""
    return torch.ops.tether_small_linear.pack(weight.detach())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for float32 ``x`` (M, K) from the packed weight (any M; fastest up to :data:`ROWS`)."""
    return torch.ops.tether_small_linear.linear(x, packed, bias)
