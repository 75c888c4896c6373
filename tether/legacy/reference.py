"""TRL's ``create_reference_model``: a frozen copy of the policy, optionally with its first layers frozen in both."""

from __future__ import annotations

import copy

from torch import nn

from tether.legacy.errors import LegacyValueError

# Where decoder layer N's parameters live in common architectures (GPT-2, OPT, GPT-NeoX, Llama-style)
LAYER_PATTERNS = (
    "transformer.h.{layer}",
    "model.decoder.layers.{layer}",
    "gpt_neox.layers.{layer}",
    "model.layers.{layer}",
)


def create_reference_model(model: nn.Module, num_shared_layers: int | None = None, pattern: str | None = None):
    """A frozen (eval mode, no gradients) deep copy of ``model``, as TRL made it.

    With ``num_shared_layers=N`` the parameters before decoder layer N (the embeddings and layers 0..N-1) are
    also frozen in ``model`` itself, so they stay equal in both and train in neither (as in TRL, each model keeps
    its own copy of them). Call it before building the optimizer (``PPOTrainer`` does), so the frozen ones are left
    out of it.

    Args:
        model: the policy (an ``AutoModelForCausalLMWithValueHead`` or any module).
        num_shared_layers: how many leading decoder layers to freeze in both; None freezes none in ``model``.
        pattern: the name of layer N's parameters with ``{layer}`` for N (e.g. ``"transformer.h.{layer}"``);
            default: the first of :data:`LAYER_PATTERNS` found in the model.
    """
    reference = copy.deepcopy(model)
    for param in reference.parameters():
        param.requires_grad_(False)
    reference.eval()
    if num_shared_layers is None:
        return reference
    if not isinstance(num_shared_layers, int) or isinstance(num_shared_layers, bool) or num_shared_layers < 0:
        raise LegacyValueError(f"num_shared_layers must be a whole number >= 0, got {num_shared_layers!r}")
    names = [name for name, _ in model.named_parameters()]
    candidates = [pattern] if pattern is not None else list(LAYER_PATTERNS)
    found = next((_prefix(c, num_shared_layers) for c in candidates if _matches(c, num_shared_layers, names)), None)
    if found is None:
        raise LegacyValueError(
            f"create_reference_model: no parameter matches layer {num_shared_layers} of "
            f"{pattern or ', '.join(LAYER_PATTERNS)}; pass pattern= with your model's layer names"
        )
    for name, param in model.named_parameters():
        if found in name:
            break
        param.requires_grad_(False)
    return reference


def _prefix(candidate: str, layer: int) -> str:
    """The name part of layer ``layer``'s parameters (``transformer.h.1.``: a trailing dot, so not ``h.10``)."""
    return candidate.format(layer=layer) + "."


def _matches(candidate: str, layer: int, names: list[str]) -> bool:
    """True when some parameter lives in layer ``layer`` of ``candidate``'s naming."""
    return any(_prefix(candidate, layer) in name for name in names)
