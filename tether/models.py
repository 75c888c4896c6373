"""The four roles on Hugging Face models: policy, frozen reference, reward model and value model.

Conventions used by every forward pass in tether (ppo_details #10-#12):
- prompts are left-padded, responses right-padded; ``attention_mask`` is 1 on real tokens;
- ``position_ids = cumsum(attention_mask) - 1`` so padding never shifts positions;
- pad ids are replaced by a real id before embedding, so a tokenizer may carry a pad token the model has no row for
  (pad stays distinct from EOS without resizing embeddings);
- response token t is predicted at position ``prompt_length - 1 + t``: logits and values are sliced ``[P-1:-1]``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from tether.errors import TetherError

PAD_TOKEN = "<|pad|>"


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character) with distinct <pad>, <eos> and <unk> tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def tiny_config(vocab_size: int, pad_token_id: int, eos_token_id: int, **overrides) -> GPT2Config:
    """The built-in 'tiny' policy: a small GPT-2 that trains from scratch on a CPU in minutes."""
    kwargs = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kwargs.update(overrides)
    return GPT2Config(
        vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs
    )


def _check_folder(path: str, what: str) -> None:
    if not Path(path).is_dir():
        raise TetherError(f"{what} '{path}': no such folder")
    if not (Path(path) / "config.json").is_file():
        raise TetherError(f"{what} '{path}': no config.json (expected a Hugging Face model folder)")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer, padding on the left, with a pad token that is not EOS (added if missing)."""
    if not Path(path).is_dir():
        raise TetherError(f"tokenizer '{path}': no such folder")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TetherError(f"tokenizer '{path}': {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise TetherError(f"tokenizer '{path}': has no eos_token; set one in its tokenizer_config.json")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left"
    return tok


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (RL needs reproducible log-probs; ppo_details #33)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the reference and reward models never train during PPO."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """Load a local causal-LM folder (safetensors weights) with dropout off."""
    _check_folder(path, "policy")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise TetherError(f"policy '{path}': {str(e).splitlines()[0]}") from None
    return disable_dropout(model)


def load_reward_model(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """Load a sequence-classification folder with one output (a reward model), frozen."""
    _check_folder(path, "reward model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise TetherError(f"reward model '{path}': {str(e).splitlines()[0]}") from None
    if model.config.num_labels != 1:
        raise TetherError(f"reward model '{path}': expected num_labels=1, found {model.config.num_labels}")
    return disable_dropout(model)


def new_scalar_model(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """A sequence-classification model with one output whose trunk is read from ``path`` (RM or critic init).

    A fresh head is drawn from N(0, 1/sqrt(d_model + 1)) (ppo_details #2).
    """
    _check_folder(path, "model")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    head = model.score
    nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return disable_dropout(model)


def model_inputs(ids: torch.Tensor, attention_mask: torch.Tensor, fill_id: int) -> dict[str, torch.Tensor]:
    """Forward kwargs for a padded batch: pad ids replaced by ``fill_id``, exclusive-cumsum position ids."""
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.masked_fill(attention_mask == 0, fill_id),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def trunk(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face model (``model.transformer`` for GPT-2, ``model.model`` for Llama)."""
    return model.base_model


def hidden_states(model: nn.Module, ids, attention_mask, fill_id: int) -> torch.Tensor:
    """Final hidden states (B, L, d) of a causal-LM or sequence-classification model."""
    out = trunk(model)(**model_inputs(ids, attention_mask, fill_id), use_cache=False)
    return out.last_hidden_state


def token_scalars(model: nn.Module, ids, attention_mask, fill_id: int) -> torch.Tensor:
    """Per-token scalar outputs (B, L) of a one-output sequence-classification model (its ``score`` head)."""
    hidden = hidden_states(model, ids, attention_mask, fill_id)
    return model.score(hidden.to(model.score.weight.dtype)).squeeze(-1).float()


def sequence_scores(model: nn.Module, ids, attention_mask, fill_id: int) -> torch.Tensor:
    """Reward-model scores (B,) read at the last real token of each row (works for left or right padding)."""
    per_token = token_scalars(model, ids, attention_mask, fill_id)
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = (positions * attention_mask.long()).argmax(-1)
    return per_token.gather(1, last[:, None]).squeeze(1)


class ActorCritic(nn.Module):
    """The trained pair: a causal-LM policy and a value model (a head on its trunk, or a separate critic).

    ``forward`` returns temperature-scaled response logits (B, T, V) and values (B, T), both aligned so that index t
    belongs to response token t (ppo_details #9, #10).
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        if critic is None:
            width = policy.get_output_embeddings().in_features
            self.value_head = nn.Linear(width, 1)
            nn.init.zeros_(self.value_head.weight)  # V = 0 at the start (ppo_details #27)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(next(policy.parameters()).dtype)
        else:
            self.value_head = None

    def forward(self, sequence_ids, attention_mask, prompt_length: int, temperature: float, fill_id: int):
        hidden = hidden_states(self.policy, sequence_ids, attention_mask, fill_id)
        response_hidden = hidden[:, prompt_length - 1 : -1]
        logits = self.policy.get_output_embeddings()(response_hidden).float() / temperature
        if self.value_head is not None:
            values = self.value_head(response_hidden).squeeze(-1).float()
        else:
            values = token_scalars(self.critic, sequence_ids, attention_mask, fill_id)[:, prompt_length - 1 : -1]
        return logits, values


def reference_copy(policy: nn.Module) -> nn.Module:
    """A frozen deep copy of the policy (eval mode, no gradients, no shared tensors)."""
    return freeze(copy.deepcopy(policy))


def response_logits(model: nn.Module, sequence_ids, attention_mask, prompt_length: int, temperature: float, fill_id):
    """Temperature-scaled logits (B, T, V) of a causal LM at the positions that predict the response tokens."""
    hidden = hidden_states(model, sequence_ids, attention_mask, fill_id)[:, prompt_length - 1 : -1]
    return model.get_output_embeddings()(hidden).float() / temperature
