"""The sampler: a lean KV-cached decoding loop, with randomness that belongs to each row, not to the batch.

Hugging Face ``generate`` runs logits processors, stopping criteria and input preparation around every decoding
step; this loop does only what tether's sampling needs: one forward of the new token through the trunk with the
cache, the LM head on the last position only, temperature, top-k, top-p and min-new-tokens on float32 logits, and
stop tokens handled in the loop (finished rows are filled with the first stop id;
:func:`tether.rollout.mask_after_eos` turns them into padding). What it records (:class:`Sampled`) saves the
policy's forward pass over the rollout. With ``fast_decoding`` Llama-family models decode through
:class:`tether.decoding.LeanDecoder` with a static KV cache (on CUDA its step replayed as a CUDA graph), and on the CPU
in float32 or bf16 autocast the linear layers of other models run from oneDNN-packed weights (:mod:`tether.prepack`);
elsewhere each step is the model's own ``transformers`` forward (:class:`TransformersSteps`). On a GPU the loop asks
whether every row has stopped only every :data:`STOP_CHECK_EVERY` steps, since each asking waits for the card. On the
CPU the decoder (a LeanDecoder stepping eagerly, or a model's own forward whose cache is keys and values only) drops
the rows that have stopped from its batch as they go, a quarter or more at a time, so responses of varied length cost
the steps of the rows still going (SmolLM2, 16 responses of 2 to 64 tokens: 3.1 s against 4.2 s; the tiny GPT-2, 64
responses of 1 to 64: 0.39 s against 0.72 s; ``benchmarks/stopped_rows.py``).

Each row draws its tokens by inverting the softmax's cumulative distribution at one uniform number that is a hash of
``(row key, step)``: the token whose interval of the cumulative sum (float64) holds ``u`` times the total. A row's
key comes from ``(seed, iteration, row index in the rollout batch)`` (:func:`row_keys`), so a row samples the same
tokens whatever else is in its batch: on one process or split over several, in any chunking (up to float rounding of
the logits, which may move a boundary past ``u``). The hash is integer arithmetic (splitmix64), so the noise itself
is identical on every device, and it costs one number per row and step, not one per token of the vocabulary.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from tether.decoding import lean_decoder
from tether.passes import family_logits, model_inputs, trunk
from tether.prepack import compute_dtype, prepacked_linears

try:  # the cache layers whose rows TransformersSteps.keep_rows may select (transformers 4.56 on)
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    SELECTABLE_LAYERS: tuple[type, ...] = (DynamicLayer, DynamicSlidingWindowLayer)
except ImportError:
    SELECTABLE_LAYERS = ()

MASK64 = (1 << 64) - 1
STOP_CHECK_EVERY = 8  # decoding steps between two checks for stopped rows on a GPU (every step on a CPU)
GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class Sampling:
    """How responses are drawn (the fields of SamplingConfig the sampler reads)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0  # stop tokens are masked out before this many response tokens (0: off)
    fast_decoding: bool = True  # CPU: oneDNN-packed weights; LeanDecoder where it applies (graphed on CUDA)
    compile: bool = False  # the LeanDecoder's one-token step through torch.compile

    @classmethod
    def from_config(cls, config) -> Sampling:
        """The settings of a :class:`tether.config.SamplingConfig`."""
        fields = ("max_new_tokens", "temperature", "top_p", "top_k", "min_new_tokens", "fast_decoding", "compile")
        return cls(*(getattr(config, name) for name in fields))


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int (64-bit wraparound)."""
    x = (x + GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on an int64 tensor (multiplication wraps around, as in C)."""
    x = x + _signed(GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def row_keys(seed: int, iteration: int, rows, device=None) -> torch.Tensor:
    """(B,) int64 keys of the rows with these indices in iteration ``iteration``'s rollout batch of run ``seed``."""
    base = _mix_int(_mix_int(seed) ^ iteration)
    return torch.tensor([_signed(_mix_int(base ^ int(r))) for r in rows], dtype=torch.int64, device=device)


def random_keys(batch: int, device=None) -> torch.Tensor:
    """(B,) keys drawn from torch's global generator (so ``torch.manual_seed`` still decides the samples)."""
    return torch.randint(-(1 << 62), 1 << 62, (batch,), dtype=torch.int64).to(device)


def uniform_noise(keys: torch.Tensor, step: int) -> torch.Tensor:
    """(B,) float64 uniforms in (0, 1): a hash of (row key, step), the same on every device."""
    bits = _shr(_mix(keys ^ _signed(_mix_int(step + 1))), 12)  # the top 52 bits: u < 1 exactly in float64
    return (bits.double() + 0.5) * (1.0 / (1 << 52))


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature-scaled float32 logits with everything outside top-k and the top-p nucleus set to -inf."""
    return keep_top(logits.float() / sampling.temperature, sampling)


def keep_top(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """``logits`` (already scaled) with everything outside top-k and the top-p nucleus set to -inf."""
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(weights: torch.Tensor, keys: torch.Tensor, step: int, block: int = 256) -> torch.Tensor:
    """(B,) token ids drawn in proportion to the non-negative ``weights`` (B, V), by inverting each row's cumulative
    sum (float64) at its uniform times the row's total: the weights need not sum to one. The sum runs in two levels,
    over blocks of ``block`` ids and then inside the one block the target falls in: a step reads the vocabulary
    once, not a whole float64 running sum of it (SmolLM2's 49,152 ids x 16 rows: 0.6 against 6.9 ms)."""
    rows, vocab = weights.shape
    blocks = -(-vocab // block)
    padded = torch.nn.functional.pad(weights, (0, blocks * block - vocab)).view(rows, blocks, block)
    ends = padded.sum(-1, dtype=torch.float64).cumsum(-1)  # (B, blocks): the running sum at each block's end
    target = uniform_noise(keys, step)[:, None] * ends[:, -1:]
    chosen = torch.searchsorted(ends, target).clamp_(max=blocks - 1)  # (B, 1)
    start = torch.where(chosen > 0, ends.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    inside = padded.gather(1, chosen[:, :, None].expand(rows, 1, block))[:, 0].double().cumsum(-1) + start
    offset = torch.searchsorted(inside, target).clamp_(max=block - 1)
    return (chosen * block + offset)[:, 0].clamp_(max=vocab - 1)


def decode_step(logits, sampling: Sampling, keys, step: int, banned=None, record: bool = False):
    """One decoding step's ``(tokens, log_softmax, entropy)`` from the (B, V) logits at the last position.

    The tokens are drawn from the temperature-scaled softmax after top-k and top-p, never one of the ``banned`` ids
    (the stop tokens before ``min_new_tokens``). With ``record``, the (B, V) log-softmax and (B,) entropy of the
    temperature-scaled logits before the filters (as PPO's update computes them); else None. Without filters the
    draw and the entropy share one softmax: the vocabulary is read a handful of times per step, not a dozen.
    """
    scaled = logits.float() if sampling.temperature == 1.0 else logits.float() / sampling.temperature
    filtered = 0 < sampling.top_k < logits.shape[-1] or sampling.top_p < 1.0
    probs = scaled.softmax(-1) if record or not filtered else None
    if filtered:
        allowed = scaled if banned is None else scaled.index_fill(-1, banned, float("-inf"))
        weights = keep_top(allowed, sampling).softmax(-1)
    else:
        weights = probs if banned is None else probs.index_fill(-1, banned, 0.0)
    tokens = draw(weights, keys, step)
    if not record:
        return tokens, None, None
    logp = scaled.log_softmax(-1)
    entropy = -(probs * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)  # -inf logits: p = 0, adds 0
    return tokens, logp, entropy


def cache_argument(body) -> str:
    """The name a transformers trunk gives its KV-cache argument (``cache`` from transformers 5.2x on)."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


class TransformersSteps:
    """Decoding through the model's own ``transformers`` forward and cache (the interface of LeanDecoder)."""

    def __init__(self, model):
        self.model, self.body = model, trunk(model)
        self.cache_name = cache_argument(self.body)  # looked up once, not at every step
        self.cache, self.attention = None, None

    def forward(self, ids, positions, key_mask=None):
        """Logits (B, V) and hidden state (B, d) after ``ids`` at ``positions``; ``key_mask`` for the prompt."""
        ones = torch.ones_like(ids)
        self.attention = key_mask if self.attention is None else torch.cat([self.attention, ones], dim=1)
        cache = {self.cache_name: self.cache}
        out = self.body(input_ids=ids, attention_mask=self.attention, position_ids=positions, use_cache=True, **cache)
        self.cache, hidden = out[self.cache_name], out.last_hidden_state[:, -1]
        return family_logits(self.model, self.model.get_output_embeddings()(hidden)), hidden

    @property
    def can_keep_rows(self) -> bool:
        """Whether :meth:`keep_rows` may shrink the batch: on the CPU, with a cache whose every layer holds keys and
        values only (a layer with recurrent or static state is not known to follow a row selection)."""
        layers = getattr(self.cache, "layers", None)
        return (
            self.attention.device.type == "cpu"
            and bool(layers)
            and all(type(layer) in SELECTABLE_LAYERS for layer in layers)
        )

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Go on with the batch rows ``rows`` (indices into the current batch) only: their cache and attention mask."""
        self.cache.batch_select_indices(rows)
        self.attention = self.attention.index_select(0, rows)


@dataclass
class Sampled:
    """What :func:`sample` drew: tokens, and (``record=True``) what the policy said about them on the way.

    ``logprobs`` and ``entropy`` come from the temperature-scaled logits before top-k/top-p (as PPO's update computes
    them); ``hidden`` is the trunk's last hidden state at the position that predicted each token (a value head reads
    it). All are (B, T) or (B, T, d), T <= max_new_tokens; after a row's stop token they are 0 (its tokens there are
    the filler).
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @classmethod
    def of_responses(cls, responses: list[list[int]], fill_id: int, device=None) -> Sampled:
        """Responses as lists of token ids (an engine's output), each ending at its stop id or at the length limit,
        as (B, T) ``tokens`` filled with ``fill_id`` after each row's end; nothing recorded."""
        width = max([1, *map(len, responses)])
        tokens = torch.full((len(responses), width), fill_id, dtype=torch.long)
        for row, ids in enumerate(responses):
            tokens[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return cls(tokens.to(device))

    @property
    def recorded(self) -> bool:
        """Whether it holds the policy's log-probs, entropy and hidden states (then no policy pass recomputes them)."""
        return self.logprobs is not None and self.entropy is not None and self.hidden is not None


class Sampler(Protocol):
    """What draws a rollout's responses: :func:`sample`, or another engine put in its place (``PPOTrainer.sampler``).

    Called as :func:`sample` is, with (B, P) left-padded prompts on the policy's device (``prompt_mask`` is 1 on real
    tokens; the padding's id may lie outside the vocabulary); returns a :class:`Sampled` whose ``tokens`` are (B, T),
    T <= ``sampling.max_new_tokens``, a row that ends before T ending with one of ``stops`` (what follows is
    padding). It should honour ``sampling`` (temperature, top-p, top-k, lengths) and draw with the policy's current
    weights. Unless it records all of log-probs, entropy and hidden states the way :func:`sample` does, the policy's
    forward pass computes them from the tokens, so PPO's ratio starts at 1.
    """

    def __call__(
        self, model, prompt_ids, prompt_mask, sampling: Sampling, stops: list[int], keys, autocast, record: bool
    ) -> Sampled: ...


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: Sampling,
    stops: list[int],
    keys: torch.Tensor | None = None,
    autocast=nullcontext,
    record: bool = False,
) -> Sampled:
    """Sample up to ``max_new_tokens`` per row; after a row's stop token come copies of ``stops[0]``.

    ``prompt_ids`` are left-padded; ``keys`` (B,) are the rows' noise keys (:func:`row_keys`; default
    :func:`random_keys`). The loop ends when every row has stopped.
    """
    batch, device = prompt_ids.shape[0], prompt_ids.device
    keys = random_keys(batch, device) if keys is None else keys.to(device)
    was_training = model.training
    model.eval()
    with autocast():  # float32, or bf16 under bf16 autocast: the dtype the decoder's weights are cast (or packed) to
        dtype = compute_dtype(device)
    fast = sampling.fast_decoding
    length = prompt_ids.shape[1] + sampling.max_new_tokens
    decoder = lean_decoder(model, batch, length, sampling.compile, dtype) if fast else None
    with prepacked_linears(model, fast and decoder is None, dtype):
        inputs = model_inputs(prompt_ids, prompt_mask, stops[0])
        steps = _decode(decoder or TransformersSteps(model), inputs, sampling, stops, keys, autocast, record)
    model.train(was_training)
    return Sampled(**{k: torch.stack(v, dim=1) if v else None for k, v in steps.items()})


def stop_check_every(device: torch.device) -> int:
    """How many steps the sampler goes between asking whether every row has stopped: each asking waits for the
    device, which on a CPU costs nothing and on a GPU empties its queue of work."""
    return 1 if device.type == "cpu" else STOP_CHECK_EVERY


def _decode(decoder, inputs, sampling, stops, keys, autocast, record) -> dict[str, list[torch.Tensor]]:
    """The decoding loop of :func:`sample` on a LeanDecoder or TransformersSteps: each step's token (and, ``record``,
    what the policy said of it), up to the step at which every row had stopped.

    A decoder that can drop rows (``keep_rows``; ``can_keep_rows`` says when: on the CPU) decodes only the rows still
    going once a quarter of its batch has stopped: a step's cost falls with its rows (SmolLM2 on 2 cores: 68 ms for
    16 rows, 53 for 8). A stopped row's later steps are its first stop id, with log-prob, entropy and hidden state 0
    (padding, which the rollout masks)."""
    stop_ids = torch.tensor(stops, device=keys.device)
    position = inputs["position_ids"][:, -1:]
    done = torch.zeros(len(keys), dtype=torch.bool, device=keys.device)
    live = None  # the rows the decoder holds, in its order, once it has dropped some (None: every row)
    every, finished = stop_check_every(keys.device), []
    steps: dict[str, list[torch.Tensor]] = {"tokens": [], "logprobs": [], "entropy": [], "hidden": []}
    with autocast():
        logits, hidden = decoder.forward(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"])
    droppable = getattr(decoder, "can_keep_rows", False)  # asked once, after the prompt (its cache now exists)
    for step in range(sampling.max_new_tokens):
        banned = stop_ids if step < sampling.min_new_tokens else None
        drawn, logp, entropy = decode_step(logits, sampling, _rows(keys, live), step, banned, record)
        token = _every_row(drawn, live, done, stops[0])
        steps["tokens"].append(token)
        if record:
            steps["logprobs"].append(_every_row(logp.gather(-1, drawn[:, None])[:, 0], live, done))
            steps["entropy"].append(_every_row(entropy, live, done))
            steps["hidden"].append(_every_row(hidden, live, done))
        done |= torch.isin(token, stop_ids)
        finished.append(done.all())
        if step + 1 == sampling.max_new_tokens or ((step + 1) % every == 0 and bool(finished[-1])):
            break
        position = position + 1
        if droppable:
            live, position = _drop_stopped(decoder, live, position, done)
        with autocast():
            logits, hidden = decoder.forward(_rows(token, live)[:, None], position)
    if every > 1:  # the steps decoded after every row had stopped, between two checks
        flags = torch.stack(finished).tolist()
        for kept in steps.values():
            del kept[flags.index(True) + 1 if True in flags else len(flags) :]
    return steps


def _rows(values: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    """The decoder's rows of a (B, ...) tensor over the whole batch."""
    return values if live is None else values[live]


def _drop_stopped(decoder, live: torch.Tensor | None, position: torch.Tensor, done: torch.Tensor):
    """``(live, position)`` without the stopped rows, and the decoder keeping only the others, once a quarter or more
    of its rows have stopped, and not all of them."""
    held = torch.arange(len(done), device=done.device) if live is None else live
    going = ~done[held]
    left = int(going.sum())
    if left == 0 or 4 * left > 3 * len(held):
        return live, position
    decoder.keep_rows(going.nonzero()[:, 0])
    return held[going], position[going]


def _every_row(values: torch.Tensor, live: torch.Tensor | None, done: torch.Tensor, fill=0) -> torch.Tensor:
    """A step's ``values`` for the decoder's rows ``live`` as one per row of the batch: ``fill`` for the rows that
    had stopped."""
    if live is not None:
        values = values.new_full((len(done), *values.shape[1:]), fill).index_copy_(0, live, values)
    return values.masked_fill(done.view(-1, *[1] * (values.dim() - 1)), fill)
