"""TRL's ``AutoModelForCausalLMWithValueHead``: a causal LM with a scalar value head, saved as safetensors."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from tether.errors import TetherError
from tether.models import disable_dropout, load_causal_lm

VALUE_HEAD_FILE = "value_head.safetensors"


class AutoModelForCausalLMWithValueHead(nn.Module):
    """A causal LM (``.pretrained_model``) with a scalar value head (``.v_head``, a Linear on the last hidden state).

    ``forward`` returns ``(lm_logits, loss, values)`` as in TRL (loss is None without ``labels``). The head starts
    at zero (tether's V = 0 convention; TRL drew it at random).

    Args:
        pretrained_model: a Hugging Face causal LM.
    """

    def __init__(self, pretrained_model: nn.Module):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.v_head = nn.Linear(pretrained_model.get_output_embeddings().in_features, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        self.v_head.to(next(pretrained_model.parameters()).dtype)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        v_head_init_strategy: str | None = None,
        v_head_initializer_range: float = 0.2,
    ):
        """Load a local model folder (safetensors) or wrap a loaded causal LM; restore ``value_head.safetensors``.

        Args:
            pretrained_model_name_or_path: a local Hugging Face causal-LM folder, or a causal-LM module.
            dtype: parameter dtype when loading a folder.
            trust_remote_code: allow the folder's own Python code.
            v_head_init_strategy: None (zeros) or "normal" (N(0, v_head_initializer_range), zero bias).
            v_head_initializer_range: standard deviation for the "normal" strategy.
        """
        if isinstance(pretrained_model_name_or_path, nn.Module):
            model = cls(disable_dropout(pretrained_model_name_or_path))
            folder = None
        else:
            folder = Path(pretrained_model_name_or_path)
            model = cls(load_causal_lm(str(folder), dtype, trust_remote_code))
        if v_head_init_strategy == "normal":
            nn.init.normal_(model.v_head.weight, std=v_head_initializer_range)
        elif v_head_init_strategy is not None:
            raise TetherError(f"v_head_init_strategy={v_head_init_strategy!r}: expected None or 'normal'")
        if folder is not None and (folder / VALUE_HEAD_FILE).is_file():
            model.v_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))
        return model

    def forward(
        self, input_ids=None, past_key_values=None, attention_mask=None, return_past_key_values=False, **kwargs
    ):
        """``(lm_logits (B, L, V) float32, loss or None, values (B, L))`` [+ past_key_values]."""
        kwargs["output_hidden_states"] = True
        out = self.pretrained_model(
            input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs
        )
        hidden = out.hidden_states[-1]
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
        result = (out.logits.float(), getattr(out, "loss", None), values)
        return result + (out.past_key_values,) if return_past_key_values else result

    def generate(self, *args, **kwargs):
        """Hugging Face ``generate`` of the wrapped causal LM."""
        return self.pretrained_model.generate(*args, **kwargs)

    @property
    def config(self):
        """The wrapped model's config."""
        return self.pretrained_model.config

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the LM folder (safetensors) and the value head as ``value_head.safetensors`` inside it."""
        self.pretrained_model.save_pretrained(save_directory, **kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in self.v_head.state_dict().items()}
        save_file(state, str(Path(save_directory) / VALUE_HEAD_FILE))
