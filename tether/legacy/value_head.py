"""TRL's ``AutoModelForCausalLMWithValueHead``: a causal LM with a scalar value head, in TRL's checkpoint layout.

``state_dict()`` holds the language model's own keys plus ``v_head.summary.weight`` and ``v_head.summary.bias``
(only the head for a PEFT model), and ``save_pretrained`` writes them into the model's safetensors file, so
checkpoints go both ways between TRL 0.11 and tether.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from tether.legacy.errors import LegacyValueError, UnknownArgumentError
from tether.legacy.loading import HEAD_ARGS, VALUE_HEAD_FILE, LoadRequest, load_language_model, saved_value_head
from tether.passes import is_peft_model

INIT_STRATEGIES = (None, "normal", "zero")


def disable_lm_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in the language model (reproducible log-probs), except a LoRA adapter's own ``lora_dropout``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
    return model


class ValueHead(nn.Module):
    """TRL's value head: ``dropout`` then ``summary`` (a Linear to one output); the input is cast to its dtype.

    Args:
        hidden_size: width of the language model's last hidden state.
        summary_dropout_prob: dropout probability on that hidden state (0 or None: none).
    """

    def __init__(self, hidden_size: int, summary_dropout_prob: float | None = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(summary_dropout_prob) if summary_dropout_prob else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)
        self.flatten = nn.Flatten()

    @property
    def weight(self) -> nn.Parameter:
        """``summary.weight`` (the name tether's earlier Linear head had)."""
        return self.summary.weight

    @property
    def bias(self) -> nn.Parameter:
        """``summary.bias``."""
        return self.summary.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., 1) values, computed in the head's dtype."""
        return self.summary(self.dropout(hidden_states).to(self.summary.weight.dtype))


class PreTrainedModelWrapper(nn.Module):
    """TRL's base of the value-head models: ``.pretrained_model`` and what is delegated to it."""

    transformers_parent_class = None
    supported_args: tuple = ()
    supported_modules = ("v_head",)
    supported_rm_modules = ("score",)

    @property
    def config(self):
        """The wrapped model's config."""
        return self.pretrained_model.config

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """The wrapped model's ``prepare_inputs_for_generation``."""
        return self.pretrained_model.prepare_inputs_for_generation(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        """The wrapped model's ``gradient_checkpointing_enable`` (``activation_checkpointing_enable`` in newer
        transformers; a PEFT model forwards it to its base model)."""
        enable = getattr(self.pretrained_model, "activation_checkpointing_enable", None)
        if enable is not None:
            return enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        return self.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        """The wrapped model's ``gradient_checkpointing_disable`` (``activation_checkpointing_disable``)."""
        disable = getattr(self.pretrained_model, "activation_checkpointing_disable", None)
        return disable() if disable is not None else self.pretrained_model.gradient_checkpointing_disable()

    def enable_input_require_grads(self, *args, **kwargs):
        """The wrapped model's ``enable_input_require_grads``."""
        return self.pretrained_model.enable_input_require_grads(*args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """Not offered: tether never uploads. Save with ``save_pretrained`` and upload the folder yourself."""
        raise LegacyValueError(
            "push_to_hub is not supported by tether: save_pretrained(folder), then upload the folder "
            "(huggingface_hub's upload_folder)"
        )

    def compute_reward_score(self, *args, **kwargs):
        """Not offered (TRL's multi-adapter reward); see ``reward_adapter`` in docs/migration.md."""
        raise LegacyValueError("compute_reward_score needs a reward_adapter, which tether does not support")


class AutoModelForCausalLMWithValueHead(PreTrainedModelWrapper):
    """A causal LM (``.pretrained_model``) with TRL's value head (``.v_head``: dropout, then ``summary``).

    ``forward`` returns ``(lm_logits, loss, values)`` as in TRL (loss is None without ``labels``). As in TRL the
    head is drawn at random (PyTorch's Linear init) unless ``v_head_init_strategy`` says otherwise, and its
    dropout is ``summary_dropout_prob`` (default 0.1). Dropout in the language model itself is switched off.

    Args:
        pretrained_model: a Hugging Face causal LM, or a peft model wrapping one.
        summary_dropout_prob: the head's dropout (default: the config's ``summary_dropout_prob``, else 0.1).
        v_head_init_strategy: None (random, TRL's default), "normal" (N(0, v_head_initializer_range), zero bias)
            or "zero" (tether's: V = 0 before training).
        v_head_initializer_range: standard deviation for "normal" (default 0.2).
    """

    transformers_parent_class = AutoModelForCausalLM
    lm_head_namings = ["lm_head", "embed_out"]
    supported_args = HEAD_ARGS

    def __init__(self, pretrained_model: nn.Module, **kwargs):
        super().__init__()
        extra = set(kwargs) - set(HEAD_ARGS) - {"score_module", "supports_rm_adapter", "rm_adapter_name"}
        if extra:
            raise UnknownArgumentError(f"AutoModelForCausalLMWithValueHead: unknown argument(s) {', '.join(extra)}")
        head = _lm_head(pretrained_model)
        self.pretrained_model = disable_lm_dropout(pretrained_model)
        self.is_peft_model = is_peft_model(pretrained_model)
        self.is_encoder_decoder = False
        self.is_sequential_parallel = False
        self.is_loaded_in_8bit = self.is_loaded_in_4bit = False
        self.supports_rm_adapter, self.rm_adapter_name, self.policy_adapter_name = False, None, "default"
        dropout = kwargs.get("summary_dropout_prob", getattr(pretrained_model.config, "summary_dropout_prob", 0.1))
        self.v_head = ValueHead(head.in_features, dropout).to(head.weight.device)
        self._init_head(kwargs.get("v_head_init_strategy"), kwargs.get("v_head_initializer_range", 0.2))
        self.current_device = head.weight.device

    def _init_head(self, strategy: str | None, initializer_range: float) -> None:
        if strategy not in INIT_STRATEGIES:
            raise LegacyValueError(f"v_head_init_strategy={strategy!r}: expected None, 'normal' or 'zero'")
        if strategy == "normal":
            nn.init.normal_(self.v_head.summary.weight, std=initializer_range)
            nn.init.zeros_(self.v_head.summary.bias)
        elif strategy == "zero":
            nn.init.zeros_(self.v_head.summary.weight)
            nn.init.zeros_(self.v_head.summary.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a causal LM and restore the value head saved with it (TRL's or tether's layout).

        Args:
            pretrained_model_name_or_path: a local model folder, a ``.gguf`` file, a Hub repo id, a trained adapter
                folder (its base model is loaded first), or a loaded causal-LM module (or peft model).
            **kwargs: the value head's ``summary_dropout_prob``, ``v_head_init_strategy`` and
                ``v_head_initializer_range``; ``peft_config`` (add a new adapter) and ``is_trainable`` (a loaded
                adapter trains, default False as in TRL); ``torch_dtype`` (default float32, or "auto");
                ``trust_remote_code``; ``device_map`` (None or one device: tether places the model itself); any
                other keyword goes to transformers' ``from_pretrained``. docs/migration.md lists what is refused.
        """
        if model_args:
            raise UnknownArgumentError(
                "from_pretrained: positional arguments after the model are not supported; pass them by keyword"
            )
        request = LoadRequest.split(kwargs)
        lm, folder = load_language_model(pretrained_model_name_or_path, request)
        model = cls(lm, **request.head)
        state = saved_value_head(folder) if folder is not None else None
        if state is not None:
            _load_head(model.v_head, state, folder)
        return model

    def forward(
        self, input_ids=None, past_key_values=None, attention_mask=None, return_past_key_values=False, **kwargs
    ):
        """``(lm_logits (B, L, V) float32, loss or None, values (B, L))`` [+ past_key_values]."""
        kwargs["output_hidden_states"] = True
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.hidden_states[-1].to(self.v_head.summary.weight.device)
        values = self.v_head(hidden).squeeze(-1)
        result = (out.logits.float(), getattr(out, "loss", None), values)
        return result + (out.past_key_values,) if return_past_key_values else result

    def generate(self, *args, **kwargs):
        """Hugging Face ``generate`` of the wrapped causal LM."""
        return self.pretrained_model.generate(*args, **kwargs)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """TRL's layout: the language model's own keys, then ``v_head.summary.weight`` and ``.bias`` (only those
        two for a PEFT model, whose adapter ``save_pretrained`` writes itself)."""
        out = destination if destination is not None else OrderedDict()
        if not self.is_peft_model:
            out.update(self.pretrained_model.state_dict(prefix=prefix, keep_vars=keep_vars))
        out.update(self.v_head.state_dict(prefix=prefix + "v_head.", keep_vars=keep_vars))
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load TRL's layout (as :meth:`state_dict` gives it) or PyTorch's own (``pretrained_model.*`` keys)."""
        if any(k.startswith("pretrained_model.") for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        head = {k[len("v_head.") :]: v for k, v in state_dict.items() if k.startswith("v_head.")}
        lm = {k: v for k, v in state_dict.items() if not k.startswith("v_head.")}
        missing, unexpected = [], []
        result = self.v_head.load_state_dict(head, strict=False, assign=assign)
        missing += [f"v_head.{k}" for k in result.missing_keys]
        unexpected += [f"v_head.{k}" for k in result.unexpected_keys]
        if lm or not self.is_peft_model:
            result = self.pretrained_model.load_state_dict(lm, strict=False, assign=assign)
            missing += result.missing_keys
            unexpected += result.unexpected_keys
        if strict and (missing or unexpected):
            raise RuntimeError(f"load_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        return _IncompatibleKeys(missing, unexpected)

    def post_init(self, state_dict: dict) -> None:
        """Load the value head from a full state dict's ``v_head.*`` entries (others are ignored), as TRL's did."""
        head = {k.split("v_head.", 1)[1]: v for k, v in state_dict.items() if "v_head." in k}
        self.v_head.load_state_dict(head, strict=False)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Write the model in TRL's layout (safetensors): the value head inside the model's weights file; for a
        PEFT model the adapter and ``value_head.safetensors`` (TRL wrote a pickle ``pytorch_model.bin``).
        ``push_to_hub=True`` saves, then raises: tether never uploads."""
        state = kwargs.pop("state_dict", None) or self.state_dict()
        kwargs.pop("safe_serialization", None)
        push = kwargs.pop("push_to_hub", False)
        if not self.is_peft_model:
            self.pretrained_model.save_pretrained(save_directory, *args, state_dict=dict(state), **kwargs)
        else:
            self.pretrained_model.save_pretrained(save_directory, *args, **kwargs)
            head = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("v_head.")}
            save_file(head, str(Path(save_directory) / VALUE_HEAD_FILE), metadata={"format": "pt"})
        if push:
            raise LegacyValueError(
                f"save_pretrained: saved to {save_directory}, but push_to_hub is not supported by tether; upload the "
                "folder with huggingface_hub's upload_folder"
            )


class AutoModelForSeq2SeqLMWithValueHead(PreTrainedModelWrapper):
    """TRL's encoder-decoder value-head model: not offered by tether (decoder-only models only)."""

    transformers_parent_class = AutoModelForSeq2SeqLM

    def __init__(self, *args, **kwargs):
        raise LegacyValueError(
            "AutoModelForSeq2SeqLMWithValueHead: encoder-decoder models are not supported by tether; use a "
            "decoder-only model with AutoModelForCausalLMWithValueHead"
        )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Refused, as the constructor is: tether trains decoder-only models."""
        return cls()


SUPPORTED_ARCHITECTURES = (AutoModelForCausalLMWithValueHead,)


def _lm_head(model: nn.Module) -> nn.Module:
    """The language-model head of ``model``; a one-line error when ``model`` is not a causal LM."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or not hasattr(head, "in_features"):
        raise LegacyValueError(
            f"AutoModelForCausalLMWithValueHead: {type(model).__name__} is not a causal language model (it has no "
            "language-model head); pass a model AutoModelForCausalLM loads"
        )
    return head


def _load_head(v_head: ValueHead, state: dict, folder: Path) -> None:
    """Copy a saved head into ``v_head``; a one-line error when it does not fit this model."""
    try:
        v_head.load_state_dict(state)
    except RuntimeError as e:
        raise LegacyValueError(
            f"value head in {folder} does not fit this model: {str(e).splitlines()[-1].strip()}"
        ) from None
