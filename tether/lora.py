"""LoRA (peft): a policy with an adapter, its reference (the same weights with the adapter off, no copy), and the
merged plain model a saved folder holds."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from tether.errors import TetherError
from tether.passes import is_peft_model, trunk


def add_lora(policy: nn.Module, r: int, alpha: float = 16.0, dropout: float = 0.0, target_modules: str = ""):
    """Wrap a causal LM in a fresh LoRA adapter (peft); afterwards only the adapter's weights require gradients.

    The adapter's B matrices start at zero, so the wrapped model computes exactly the same logits as before.

    Args:
        policy: a transformers causal LM (modified in place: LoRA layers are injected into it).
        r: LoRA rank (> 0).
        alpha: LoRA alpha; the adapter's update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter's input.
        target_modules: comma-separated module names (e.g. ``"q_proj,v_proj"``); empty means peft's default for the
            architecture.

    Returns:
        The ``peft.PeftModelForCausalLM`` wrapping ``policy``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TetherError("model.lora_r > 0 needs the peft package (pip install 'tether[lora]')") from None
    if r <= 0:
        raise TetherError(f"model.lora_r must be positive to add an adapter, got {r}")
    if not 0 <= dropout < 1:
        raise TetherError(f"model.lora_dropout must be in [0, 1), got {dropout}")
    targets = [t.strip() for t in target_modules.split(",") if t.strip()] or None
    from transformers.pytorch_utils import Conv1D

    # GPT-2 style Conv1D layers store their weight transposed; telling peft up front avoids its warning.
    conv_names = [name for name, module in policy.named_modules() if isinstance(module, Conv1D)]
    fan_in_fan_out = bool(conv_names) and (targets is None or any(n.split(".")[-1] in targets for n in conv_names))
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated name; nothing for the user to change
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(policy, config)
    except ValueError as e:
        raise TetherError(f"model.lora_target_modules='{target_modules}': {str(e).splitlines()[0]}") from None


class _AdapterOff:
    """Calls a module of a PeftModel with the model's adapter disabled (other attributes pass through)."""

    def __init__(self, peft_model, module):
        self._peft_model, self._module = peft_model, module

    def __call__(self, *args, **kwargs):
        with self._peft_model.disable_adapter():
            return self._module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


class AdapterDisabledReference(nn.Module):
    """The frozen reference of a LoRA policy: the policy's own PeftModel, run with its adapter disabled.

    No weights are copied. The PeftModel is deliberately not registered as a submodule, so ``.to()``, ``.eval()``
    and ``.parameters()`` on the reference never touch the policy (``parameters()`` is empty: the reference owns
    nothing; :func:`parameter_bytes` counts the shared weights). It offers what :func:`response_logits`,
    :func:`hidden_states` and ``generate`` use, each running under ``peft_model.disable_adapter()``.

    Args:
        peft_model: the LoRA-wrapped policy (a peft ``PeftModel``).
    """

    def __init__(self, peft_model):
        super().__init__()
        if not is_peft_model(peft_model):
            raise TypeError("AdapterDisabledReference needs a peft PeftModel")
        self.__dict__["peft_model"] = peft_model  # not a submodule (see the class docstring)

    @property
    def base_model(self):
        """The policy's trunk, called with the adapter disabled (what :func:`trunk` returns for this object)."""
        return _AdapterOff(self.peft_model, trunk(self.peft_model))

    @property
    def config(self):
        return self.peft_model.config

    def get_output_embeddings(self):
        """The policy's LM head, called with the adapter disabled (a no-op unless LoRA targets the head)."""
        return _AdapterOff(self.peft_model, self.peft_model.get_output_embeddings())

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """``generate`` of the base model (adapter disabled)."""
        with self.peft_model.disable_adapter():
            return self.peft_model.generate(*args, **kwargs)


def export_policy(policy: nn.Module, whole: dict | None = None) -> tuple[nn.Module, dict | None]:
    """The policy as a plain transformers model for ``save_pretrained``, and the state dict to give it (None: the
    model's own).

    ``whole`` is the policy's state dict gathered whole when FSDP split the policy
    (:func:`tether.distributed.gathered_state_dict`). A LoRA policy's adapter is merged into the weights, so the saved
    folder loads with ``AutoModelForCausalLM`` alone (the training model keeps its adapter): into a deep copy (which
    briefly doubles the policy's memory), or, for a split policy, into the gathered tensors
    (:func:`merged_lora_state`).
    """
    if not is_peft_model(policy):
        return policy, whole
    if whole is None:
        return copy.deepcopy(policy).merge_and_unload(), None
    return policy.get_base_model(), merged_lora_state(policy, whole)


def merged_lora_state(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict ``merge_and_unload`` would give, computed from the LoRA policy's own state dict ``state``
    without copying the model: each adapted weight becomes base + transpose(B @ A) x scaling (peft's
    ``get_delta_weight``), under the plain model's names."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    prefix = "base_model.model."
    layers = {name.removeprefix(prefix): m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in layers.items():
        if not isinstance(layer, LoraLinear) or layer.use_dora.get(adapter, False):
            raise TetherError(f"LoRA layer '{name}': only plain LoRA on linear layers is merged for export")
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix(prefix)
        module, _, leaf = key.rpartition(".")
        if ".lora_" in key:
            continue
        if module.endswith(".base_layer") and module.removesuffix(".base_layer") in layers:
            module = module.removesuffix(".base_layer")
            layer = layers[module]
            if leaf == "weight":
                a, b = (state[f"{prefix}{module}.lora_{ab}.{adapter}.weight"].float() for ab in "AB")
                delta = (b @ a) * layer.scaling[adapter]
                delta = delta.T if layer.fan_in_fan_out else delta
                tensor = (tensor.float() + delta).to(tensor.dtype)
            key = f"{module}.{leaf}"
        out[key] = tensor
    return out


def parameter_bytes(*models: nn.Module) -> int:
    """Bytes of parameter storage held by ``models`` together, each shared storage counted once.

    An :class:`AdapterDisabledReference` counts the weights it reads (those of its policy), so
    ``parameter_bytes(policy, reference)`` is the memory the pair really holds.
    """
    seen: dict[int, int] = {}
    for model in models:
        if isinstance(model, AdapterDisabledReference):
            model = model.peft_model
        for p in model.parameters():
            storage = p.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
