"""The four roles on Hugging Face models: policy, frozen reference, reward model and value model, loaded, checked
and paired (:class:`ActorCritic`); :mod:`tether.passes` runs their forward passes."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    PreTrainedTokenizerFast,
)

from tether.errors import TetherError, first_line
from tether.passes import head_logits, hidden_states, is_peft_model, token_scalars
from tether.precision import DTYPES, resolve_device  # noqa: F401  (resolve_device: kept importable from here)
from tether.sources import resolve

PAD_TOKEN = "<|pad|>"


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
        vocab_size=vocab_size,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **kwargs,
    )


def _check_folder(path: str, what: str, shown: str | None = None) -> None:
    """Raise unless ``path`` is a model folder (with a config.json); messages name ``shown`` (what the user wrote)."""
    shown = shown or path
    if not Path(path).is_dir():
        raise TetherError(f"{what} '{shown}': no such folder")
    if not (Path(path) / "config.json").is_file():
        raise TetherError(f"{what} '{shown}': no config.json (expected a Hugging Face model folder)")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer, padding on the left, with a pad token that is not EOS (added if missing).

    ``path`` is a folder, a ``.gguf`` file or a Hugging Face repo id (see :mod:`tether.sources`).
    """
    source = resolve(path, "tokenizer", weights=False, trust_remote_code=trust_remote_code)
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **gguf)
    except (OSError, ValueError, ImportError) as e:
        raise TetherError(f"tokenizer '{path}': {first_line(e)}") from None
    if tok.eos_token_id is None:
        raise TetherError(f"tokenizer '{path}': has no eos_token; set one in its tokenizer_config.json")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left"
    return tok


def _dtype(name: str | torch.dtype) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else DTYPES[name]


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (RL needs reproducible log-probs; ppo_details #33)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


class TanhGELU(nn.Module):
    """GELU's tanh approximation, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, in PyTorch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


def fuse_activations(model: nn.Module) -> nn.Module:
    """Swap ``transformers``' tanh GELU ("gelu_new": GPT-2, GPT-Neo, Phi), which it writes as eight element-wise
    operations, for :class:`TanhGELU`: the same function to float rounding, one pass over the activations instead of
    eight forward and a dozen backward. The model's config and saved weights are unchanged."""
    from transformers.activations import NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, TanhGELU())
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the reference and reward models never train during PPO."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def enable_gradient_checkpointing(enabled: bool, *models: nn.Module | None) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (model.gradient_checkpointing).

    Non-reentrant checkpointing: it needs no input gradients (LoRA) and works under autocast and for the value head,
    which reads the trunk's hidden states. It acts in train mode only, so generation (eval mode, KV cache) and
    frozen copies run as before; training forwards pass ``use_cache=False`` themselves. ``None`` is skipped.
    """
    if not enabled:
        return
    for model in models:
        if model is None:
            continue
        base = model.get_base_model() if is_peft_model(model) else model
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise TetherError(f"model.gradient_checkpointing: {type(base).__name__} does not support it")
        enable = getattr(base, "activation_checkpointing_enable", None)  # its newer name (transformers >= 5.x)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_pretrained(
    auto_class, path: str, what: str, dtype: str | torch.dtype, trust_remote_code: bool, **kwargs
) -> nn.Module:
    """``auto_class.from_pretrained`` on what ``path`` names, dropout off; errors name ``what``.

    A folder (local, or a Hub repo's snapshot) is read as safetensors only; a ``.gguf`` file is dequantised into
    ``dtype`` (a plain model, saved later as an ordinary safetensors folder).
    """
    source = resolve(path, what, trust_remote_code=trust_remote_code)
    if source.gguf_file:
        kwargs.update(_gguf_kwargs(source.gguf_file))
    else:
        _check_folder(source.folder, what, shown=path)
        kwargs["use_safetensors"] = True
    try:
        with _gguf_progress_on_terminal_only(bool(source.gguf_file)):
            model = auto_class.from_pretrained(
                source.folder, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs
            )
    except (OSError, ValueError, ImportError) as e:
        raise TetherError(f"{what} '{path}': {first_line(e)}") from None
    return fuse_activations(disable_dropout(model))


@contextlib.contextmanager
def _gguf_progress_on_terminal_only(gguf: bool):
    """transformers draws a bar while it unpacks GGUF tensors, whatever its progress-bar switch says: keep it on a
    terminal, where it shows a load of some seconds, and out of logs and pipes."""
    import importlib
    import sys

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils") if gguf else None
    except ImportError:
        module = None
    bar = getattr(module, "tqdm", None)
    if bar is None or sys.stderr.isatty():
        yield
        return
    module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        module.tqdm = bar


def _gguf_kwargs(gguf_file: str) -> dict:
    """``from_pretrained`` arguments that read ``gguf_file`` and unpack every weight into a plain dense model.

    Newer transformers otherwise keep GGUF weights packed (inference only, and ``save_pretrained`` refuses them).
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise GGUF weights
        return {"gguf_file": gguf_file}
    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}


def load_causal_lm(
    path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False, check_head: bool = True
) -> nn.Module:
    """Load a causal LM (a folder of safetensors weights, a ``.gguf`` file or a Hub repo id) with dropout off;
    ``check_head``: one whose logits tether can read from its head (:func:`check_logits`; SFT and DPO, which read
    the model's own ``forward``, need not)."""
    model = load_pretrained(AutoModelForCausalLM, path, "policy", dtype, trust_remote_code)
    return check_logits(model, f"policy '{path}'") if check_head else model


def check_logits(model: nn.Module, what: str) -> nn.Module:
    """``model``, once tether's reading of its logits (the output embedding at the trunk's last hidden state, then
    :func:`tether.passes.family_logits`) has given its own ``forward``'s logits on a probe of four tokens; else a
    one-line error naming ``what`` and the architecture. An encoder turned decoder (BERT, RoBERTa, ELECTRA: a
    transform before the output embedding) is refused here rather than trained as a model it is not. A model whose
    own ``forward`` cannot run on the probe is not judged."""
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.shape[0] < 5:
        return model  # no head to read, or too few tokens for the probe
    ids = torch.arange(1, 5, device=model.device)[None]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        try:
            own = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        except Exception:
            return model
        try:
            mine = head_logits(model, hidden_states(model, ids, mask, fill_id=0), 1.0).float()
            same = mine.shape == own.shape and torch.allclose(mine, own, rtol=1e-3, atol=1e-3 * own.abs().max().item())
            reason = "its logits are not its output embedding applied to its last hidden state"
        except Exception as e:
            same, reason = False, f"its logits cannot be read from its head and trunk ({first_line(e)})"
    if not same:
        kind = type(model).__name__
        raise TetherError(f"{what}: {kind} is not supported for sampling and PPO: {reason}")
    return model


def load_reward_model(path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False) -> nn.Module:
    """Load a sequence-classification model with one output (a reward model): a folder or a Hub repo id."""
    model = load_pretrained(AutoModelForSequenceClassification, path, "reward model", dtype, trust_remote_code)
    if model.config.num_labels != 1:
        raise TetherError(f"reward model '{path}': expected num_labels=1, found {model.config.num_labels}")
    score_head(model, f"reward model '{path}'")
    return model


def score_head(model: nn.Module, what: str) -> nn.Linear:
    """The linear ``score`` head a decoder's sequence-classification model reads at each token, which tether reads
    at the last real one; a one-line error naming ``what`` for a model without one (an encoder such as BERT or
    RoBERTa, which pools its first token through a ``classifier``)."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise TetherError(
            f"{what}: {type(model).__name__} has no linear 'score' head read at the last token (tether reads "
            "decoder reward models and critics: Llama, Qwen, Mistral, Gemma, GPT-2, ...)"
        )
    return head


def new_scalar_model(path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False) -> nn.Module:
    """A sequence-classification model with one output whose trunk is read from ``path`` (RM or critic init).

    ``path`` is a folder, a ``.gguf`` file or a Hub repo id; a causal LM's head is dropped.

    A fresh head is drawn from N(0, 1/sqrt(d_model + 1)) (ppo_details #2).
    """
    model = load_pretrained(
        AutoModelForSequenceClassification, path, "model", dtype, trust_remote_code, num_labels=1,
        ignore_mismatched_sizes=True,  # a classifier folder's head of other labels: drawn anew below all the same
    )  # fmt: skip
    head = score_head(model, f"model '{path}'")
    nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return model


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
        response_hidden = hidden_states(self.policy, sequence_ids, attention_mask, fill_id, prompt_length - 1)[:, :-1]
        logits = head_logits(self.policy, response_hidden, temperature)
        return logits, self.values(sequence_ids, attention_mask, prompt_length, fill_id, response_hidden)

    def values(self, sequence_ids, attention_mask, prompt_length: int, fill_id: int, response_hidden):
        """Values (B, T) of the response positions: the value head on the policy's ``response_hidden`` (B, T, d), or
        the separate critic's own pass over the sequence."""
        if self.value_head is not None:
            return self.value_head(response_hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return token_scalars(self.critic, sequence_ids, attention_mask, fill_id, prompt_length - 1)[:, :-1]


def reference_copy(policy: nn.Module) -> nn.Module:
    """A frozen deep copy of the policy (eval mode, no gradients, no shared tensors)."""
    return freeze(copy.deepcopy(policy))
