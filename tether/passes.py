"""How tether runs a Hugging Face model: its trunk's hidden states, a causal LM's logits at the response, a scalar
head's values and scores.

Conventions used by every forward pass in tether (ppo_details #10-#12):
- prompts are left-padded, responses right-padded; ``attention_mask`` is 1 on real tokens;
- ``position_ids = cumsum(attention_mask) - 1`` so padding never shifts positions;
- pad ids are replaced by a real id before embedding, so a tokenizer may carry a pad token the model has no row for
  (pad stays distinct from EOS without resizing embeddings);
- response token t is predicted at position ``prompt_length - 1 + t``: logits and values are sliced ``[P-1:-1]``.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


def model_inputs(ids: torch.Tensor, attention_mask: torch.Tensor, fill_id: int) -> dict[str, torch.Tensor]:
    """Forward kwargs for a padded batch: pad ids replaced by ``fill_id``, exclusive-cumsum position ids."""
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.masked_fill(attention_mask == 0, fill_id),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def is_peft_model(model) -> bool:
    """True for a peft ``PeftModel`` (transformers models have no ``get_base_model``)."""
    return callable(getattr(type(model), "get_base_model", None)) and hasattr(model, "disable_adapter")


def trunk(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face model (``model.transformer`` for GPT-2, ``model.model`` for Llama);
    ``model.model`` too where the class's ``base_model_prefix`` names no attribute (Llama 4's text model)."""
    if is_peft_model(model):  # a PeftModel's own base_model is its LoRA wrapper, which returns logits
        model = model.get_base_model()
    body = model.base_model
    return model.model if body is model and isinstance(getattr(model, "model", None), nn.Module) else body


def decoder_layers(body: nn.Module) -> nn.ModuleList | None:
    """A trunk's decoder layers, where it keeps them in one ModuleList (GPT-2, Llama, Qwen, Mistral, GPT-NeoX, Phi,
    Gemma); None for other layouts."""
    lists = [m for m in body.children() if isinstance(m, nn.ModuleList)]
    return lists[0] if len(lists) == 1 and len(lists[0]) else None


@contextlib.contextmanager
def compiled_trunks(models, cache: dict):
    """Inside the block the trunks of ``models`` (None entries skipped) run through ``torch.compile``
    (``model.compile``); outside it they run eagerly, so the sampler's cached decoding and the no-gradient passes
    never trigger a compile. The compiled forwards are kept in ``cache`` (by module) for the next block.

    Where a trunk keeps its layers in one ModuleList each layer's forward is compiled (regional compilation): the
    layers share one class and one graph, so the compiler traces one layer where it would trace them all (SmolLM2
    with a critic, an empty compiler cache: a first iteration of 49 s, where compiling the whole trunks made it 96 s);
    the embedding, masks and final norm between them stay eager. Other trunks are compiled whole."""
    bodies = [trunk(m) for m in models if m is not None]
    compiled = [module for body in bodies for module in (decoder_layers(body) or [body])]
    try:
        for module in compiled:
            if module not in cache:
                cache[module] = torch.compile(module.forward)
            module.forward = cache[module]
        yield
    finally:
        for module in compiled:
            vars(module).pop("forward", None)


def hidden_states(model: nn.Module, ids, attention_mask, fill_id: int, first: int = 0) -> torch.Tensor:
    """Final hidden states (B, L - first, d) of a causal-LM or sequence-classification model, from position
    ``first`` on. The last layer's feed-forward runs at those positions only (:func:`feed_forward_from`)."""
    with feed_forward_from(model, first):
        out = trunk(model)(**model_inputs(ids, attention_mask, fill_id), use_cache=False)
    return out.last_hidden_state[:, first:]


def last_feed_forward(model: nn.Module) -> nn.Module | None:
    """The dense feed-forward (``mlp``, a ``...MLP`` class) of the last decoder layer, where the trunk keeps its
    layers in one ModuleList (:func:`decoder_layers`); None for other layouts, mixtures of experts, a feed-forward
    whose ``forward`` something else already replaced (hooks, offloading), a layer that recomputes its forward in the
    backward pass (gradient checkpointing: the recomputation must match), or a trunk run through ``torch.compile``
    (``model.compile``: its graphs would be specialised on each prompt length)."""
    body = trunk(model)
    layers = decoder_layers(body)
    layer = layers[-1] if layers is not None else None
    if "forward" in vars(body) or "forward" in vars(layer or body):  # compiled_trunks put a compiled forward there
        return None
    ff = getattr(layer, "mlp", None)
    if not isinstance(ff, nn.Module) or not type(ff).__name__.endswith("MLP") or "forward" in vars(ff):
        return None
    return None if getattr(layer, "gradient_checkpointing", False) else ff


def _forward_from(self: nn.Module, x, *args, **kwargs):
    """A feed-forward's forward at positions ``self.tether_first`` on; zeros before them (read nowhere). One that
    takes more than the hidden states (Bloom's residual), or returns more than a tensor, runs whole."""
    whole, first = type(self).forward, self.tether_first
    if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() != 3 or not 0 < first < x.shape[1]:
        return whole(self, x, *args, **kwargs)
    out = whole(self, x[:, first:].contiguous())
    return nn.functional.pad(out, (0, 0, first, 0)) if isinstance(out, torch.Tensor) else whole(self, x)


@contextlib.contextmanager
def feed_forward_from(model: nn.Module, first: int):
    """Inside the block the last layer's feed-forward (:func:`last_feed_forward`) computes positions ``first`` on.

    The output at a position depends on the last layer's feed-forward at that position alone (it is position-wise,
    and no later layer mixes positions), so hidden states from ``first`` on are unchanged. Callers that read only
    the response (policy log-probs, values, a reward model's last token) skip that work over the prompt: for a
    4-layer model and a prompt as long as its response, about 8% of the forward's and backward's multiplies."""
    ff = last_feed_forward(model) if first > 0 else None
    if ff is None:
        yield
        return
    ff.tether_first, ff.forward = first, types.MethodType(_forward_from, ff)
    try:
        yield
    finally:
        del ff.forward, ff.tether_first


def token_scalars(model: nn.Module, ids, attention_mask, fill_id: int, first: int = 0) -> torch.Tensor:
    """Per-token scalar outputs (B, L - first) of a one-output sequence-classification model (its ``score`` head),
    from position ``first`` on."""
    hidden = hidden_states(model, ids, attention_mask, fill_id, first)
    return model.score(hidden.to(model.score.weight.dtype)).squeeze(-1).float()


def sequence_scores(model: nn.Module, ids, attention_mask, fill_id: int, first: int = 0) -> torch.Tensor:
    """Reward-model scores (B,) read at the last real token of each row (works for left or right padding).
    ``first``: a position at or before every row's last real token (the last prompt token of left-padded prompts);
    the last layer's feed-forward skips the positions before it."""
    per_token = token_scalars(model, ids, attention_mask, fill_id, first)
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = (positions * attention_mask.long()).argmax(-1)
    return per_token.gather(1, (last - first).clamp(min=0)[:, None]).squeeze(1)


def gather_ids(response_ids: torch.Tensor, response_mask: torch.Tensor, fill_id: int) -> torch.Tensor:
    """Response ids safe to index logits with: padding (which may have no embedding row) replaced by ``fill_id``."""
    return response_ids.masked_fill(response_mask == 0, fill_id)


def response_logits(model: nn.Module, sequence_ids, attention_mask, prompt_length: int, temperature: float, fill_id):
    """Temperature-scaled logits (B, T, V) of a causal LM at the positions that predict the response tokens
    (:func:`head_logits`: float32, or bf16 under bf16 autocast at temperature 1)."""
    hidden = hidden_states(model, sequence_ids, attention_mask, fill_id, prompt_length - 1)[:, :-1]
    return head_logits(model, hidden, temperature)


def head_logits(model: nn.Module, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """A causal LM head's logits at ``hidden`` (B, T, d): at temperature 1 as the head computes them (bf16 under bf16
    autocast: :mod:`tether.algo.logprobs` upcasts them a block at a time, to the numbers of a float32 copy bit for bit,
    so no (B, T, V) float32 copy is made or kept for the backward), else in float32 divided by ``temperature``.

    ``hidden`` is made contiguous first: given a strided slice, a frozen head's multiply broadcasts its weight into a
    batched one (the reference's head at half the speed)."""
    logits = family_logits(model, model.get_output_embeddings()(hidden.contiguous()))
    return logits if temperature == 1 else logits.float() / temperature


# model types whose forward multiplies its logits by logits_scaling (Granite's and MiniCPM3's divide by it)
MULTIPLY_BY_LOGITS_SCALING = ("hyperclovax",)


def logit_multiplier(config) -> float:
    """The factor a family's ``forward`` multiplies the LM head's logits by, read from its (text) config as
    ``transformers`` does: Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier`` and Muse's
    ``output_multiplier``, and ``logits_scaling``, which Granite and MiniCPM3 divide by and HyperCLOVA X multiplies
    by."""
    factor = 1.0
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            factor *= value
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling:
        multiplies = str(getattr(config, "model_type", "")).startswith(MULTIPLY_BY_LOGITS_SCALING)
        factor = factor * scaling if multiplies else factor / scaling
    return factor


def family_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The LM head's ``logits`` after the step some families' ``forward`` takes next: a scale
    (:func:`logit_multiplier`), then Gemma's final soft-capping, ``cap * tanh(logits / cap)`` (Muse scales, then
    caps). Without it the sampler and the update would train a distribution the model never gives. ``logits`` itself
    where the family takes no step."""
    config = getattr(model, "config", None)
    if config is None:
        return logits
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    factor = logit_multiplier(text)
    if factor != 1:
        logits = logits * factor
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
