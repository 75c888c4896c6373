"""Sampling on the CPU with the linear layers' weights prepacked by oneDNN.

PyTorch's default CPU matrix multiply packs a weight into its blocked layout again at every call; at a decoding
step's few rows (the batch) that costs more than the multiply itself. oneDNN can pack each weight once and reuse the
packed copy: on SmolLM2-135M at batch 16 on two cores the linear layers of one step take 31 ms packed against 71 ms
unpacked, and packing all of them takes 0.1 s (BENCHMARKS.md).

:func:`prepacked_linears` packs a model's float32 ``nn.Linear`` and GPT-2 ``Conv1D`` weights on entry and routes
their forward through the packed copy until it exits, when the copies are freed and the layers are as they were. It
is for no-gradient passes (the sampler) over weights that do not change inside it; the outputs are the plain
layers' to float rounding (tested). Under bf16 CPU autocast (``model.dtype=bfloat16``) the copies are packed in bf16
once, where autocast would cast every float32 master weight to bf16 at every call, and the outputs are bf16 as
autocast's. Where it cannot apply (another device, another dtype, gradients, a sharded weight, a PyTorch without
oneDNN, a CPU without bf16 support in oneDNN) the layer runs as usual.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def available() -> bool:
    """Whether this PyTorch has oneDNN's packed linear operators."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def pack(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """oneDNN's packed copy of an (out, in) float32 weight in ``dtype`` (float32 or bfloat16), for :func:`linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None)


def compute_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a linear layer on ``device`` computes in here: autocast's dtype inside autocast for that device
    type, else float32."""
    kind = torch.device(device).type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32
    except TypeError:  # PyTorch before 2.4: per-device functions without an argument
        if kind == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else torch.float32
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else torch.float32


def packs(dtype: torch.dtype) -> bool:
    """Whether weights can be packed to compute in ``dtype`` here: float32, or bfloat16 where oneDNN runs it on this
    CPU."""
    if not available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x @ weight.T + bias`` from the packed weight, for ``x`` of any leading shape. Under ``torch.compile`` it
    runs as :func:`opaque_linear`."""
    flat = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        return opaque_linear(flat, packed, bias, out_features).view(*x.shape[:-1], out_features)
    return torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "").view(*x.shape[:-1], out_features)


def compilable() -> bool:
    """Whether this PyTorch can compile code that calls :func:`linear` (operator fakes: PyTorch 2.4 and later)."""
    return available() and hasattr(torch.library, "register_fake")


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    return x.new_empty(x.shape[0], out_features)


if compilable():  # a plain library operator: a custom_op's Python wrappers cost ~0.1 ms a call, more than the work
    _LIBRARY = torch.library.Library("tether", "DEF")
    _LIBRARY.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor")
    _LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
    torch.library.register_fake("tether::packed_linear", _packed_linear_shape, lib=_LIBRARY)


def opaque_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """The packed multiply as an operator ``torch.compile`` calls as it is (``tether::packed_linear``): inductor
    lowers oneDNN's linear only for weights it can fold in as constants, and these change with every optimizer
    step."""
    return torch.ops.tether.packed_linear(x, packed, bias, out_features)


def packable(weight: torch.Tensor) -> bool:
    """A plain float32 CPU tensor (not a DTensor shard, not a quantised or meta weight)."""
    return type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype == torch.float32


def _packed_forward(layer: nn.Module, packed: torch.Tensor, bias, out_features: int, x: torch.Tensor) -> torch.Tensor:
    """The layer's output from the packed weight, or its own forward where the packed path does not apply."""
    dtype = packed.dtype
    plain = torch.is_grad_enabled() or x.device.type != "cpu" or compute_dtype() != dtype
    if plain or (dtype == torch.float32 and x.dtype != dtype):  # bf16 copies (autocast) take any float input
        return type(layer).forward(layer, x)
    return linear(x.to(dtype), packed, bias, out_features)


def _weight_as_linear(layer: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a linear layer or GPT-2 Conv1D (which stores (in, out)), or None for other layers,
    subclasses whose ``forward`` is their own included (Llama 4's router returns its scores and logits)."""
    if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
        return layer.weight.detach()
    if isinstance(layer, Conv1D) and type(layer).forward is Conv1D.forward:
        return layer.weight.detach().t().contiguous()
    return None


@contextlib.contextmanager
def prepacked_linears(model: nn.Module, enabled: bool = True, dtype: torch.dtype = torch.float32):
    """Run ``model``'s float32 CPU linear layers from oneDNN-packed copies of their weights inside the block, packed
    to compute in ``dtype`` (bfloat16: for use under bf16 CPU autocast)."""
    patched = []
    try:
        if enabled and packs(dtype):
            for layer in model.modules():
                weight = _weight_as_linear(layer)
                if weight is None or not packable(layer.weight) or "forward" in vars(layer):
                    continue
                bias = layer.bias.detach().to(dtype) if layer.bias is not None else None
                layer.forward = partial(_packed_forward, layer, pack(weight, dtype), bias, weight.shape[0])
                patched.append(layer)
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward
