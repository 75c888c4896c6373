"""A lean forward pass for sampling from Llama-family models (Llama, Mistral, Qwen2; SmolLM2 is a Llama).

At batch 16 a SmolLM2 decoding step on two CPU cores spends about 31 ms in its linear layers (oneDNN-packed, see
:mod:`tether.prepack`) and 20 more around them in ``transformers``: the cache growing its tensors by concatenation,
the attention mask rebuilt at every step, a dozen module calls per layer. :class:`LeanDecoder` runs the same maths
with the model's own weights, norms' epsilons and rotary embedding: a static KV cache written in place, q/k/v and
gate/up each one multiply, an additive key mask, and only the last position's hidden state and logits. The numbers
are ``transformers``' to float rounding (tested against its forward for each family, with left padding).

On the CPU its multiplies use oneDNN-packed copies of the weights, or with a compiled step on an AVX-512 CPU and
at most 16 rows the panels of :mod:`tether.small_linear`; on other devices plain ones (q/k/v and gate/up
concatenated, each weight cast once to the dtype autocast computes in). On CUDA its one-token step, whose tensors
have the same shapes at every position, is captured once per sampling pass as a CUDA graph (:class:`GraphedStep`)
and replayed at every later token: one launch per step, where ``transformers`` launches a few hundred kernels from
Python and the step's time is the launches', not the card's.

It applies to the trunk classes named in ``FAMILIES`` whose linear layers are plain float32 ``nn.Linear`` (not
LoRA-wrapped) and whose attention sees the whole sequence (no sliding window shorter than it), on PyTorch 2.5 or later
(grouped-query attention in ``scaled_dot_product_attention``); for every other model :func:`lean_decoder` returns
None and the sampler uses ``transformers``' own forward.

Under bf16 autocast (``model.dtype=bfloat16``) it runs in autocast's dtypes, as ``transformers`` does there: the
weights cast (CPU: packed) in bf16 once per sampling pass, the linear layers' outputs in bf16, the residual stream,
norms and rotated keys in float32, attention's products in bf16 (to bf16 rounding of ``transformers`` under autocast,
tested).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tether import prepack, small_linear
from tether.passes import family_logits, trunk

FAMILIES = ("LlamaModel", "MistralModel", "Qwen2Model")


@dataclass
class Projection:
    """Linear layers side by side as one multiply (their outputs concatenated)."""

    weight: torch.Tensor  # oneDNN-packed (``packed``), panels (``plain``) or a plain (out, in) matrix, in its dtype
    bias: torch.Tensor | None
    width: int
    packed: bool = True
    plain: tuple[torch.Tensor, ...] = ()  # with panels: the layers' own weights, for blocks of more rows

    @classmethod
    def of(cls, *layers: nn.Linear, dtype=torch.float32, packed: bool = True, panels: bool = False) -> Projection:
        """The layers as one multiply in ``dtype``: from oneDNN-packed weights (``packed``), else plain ones; with
        ``panels`` (float32 on the CPU), from :mod:`tether.small_linear`'s panels for up to its ``ROWS`` rows and from
        the layers' own weights for more, where the width allows."""
        weights = [layer.weight.detach() for layer in layers]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # one layer: no copy unless cast or packed
        bias = None
        if any(layer.bias is not None for layer in layers):
            bias = torch.cat([layer.bias.detach() if layer.bias is not None else weight.new_zeros(layer.out_features)
                              for layer in layers]).to(dtype)  # fmt: skip
        if panels and small_linear.packable(weight):
            return cls(small_linear.pack(weight), bias, weight.shape[0], packed=False, plain=tuple(weights))
        if packed:
            return cls(prepack.pack(weight, dtype), bias, weight.shape[0])
        return cls(weight.to(dtype), bias, weight.shape[0], packed=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain:
            return self.from_panels(x)
        if self.packed:
            return prepack.linear(x.to(self.weight.dtype), self.weight, self.bias, self.width)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def from_panels(self, x: torch.Tensor) -> torch.Tensor:
        """A decoding step's few rows through the small-batch kernel; a prompt's many through the plain multiply,
        layer by layer (at 512 rows as fast as oneDNN's packed one, and no second copy of the weights)."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= small_linear.ROWS:
            return small_linear.linear(flat, self.weight, self.bias).view(*x.shape[:-1], self.width)
        out = torch.cat([F.linear(x, weight) for weight in self.plain], dim=-1)
        return out if self.bias is None else out + self.bias


@dataclass
class Block:
    """One decoder layer's weights: packed projections (q, k, v as one; gate, up as one) and its two norms."""

    norms: tuple[nn.Module, nn.Module]
    qkv: Projection
    out: Projection
    gate_up: Projection
    down: Projection
    split: tuple[int, int, int]  # query, key and value heads
    head_dim: int
    scaling: float

    @classmethod
    def of(cls, layer: nn.Module, dtype=torch.float32, packed: bool = True, panels: bool = False) -> Block:
        attention, mlp = layer.self_attn, layer.mlp
        head_dim = attention.head_dim
        heads = [attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim]
        how = dict(dtype=dtype, packed=packed, panels=panels)
        return cls(
            (layer.input_layernorm, layer.post_attention_layernorm),
            Projection.of(attention.q_proj, attention.k_proj, attention.v_proj, **how),
            Projection.of(attention.o_proj, **how),
            Projection.of(mlp.gate_proj, mlp.up_proj, **how),
            Projection.of(mlp.down_proj, **how),
            (heads[0], heads[1], heads[1]),
            head_dim,
            attention.scaling,
        )


def _sdpa_has_gqa() -> bool:
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def _window(attention: nn.Module) -> int | None:
    """The attention's sliding window in tokens (None: it sees the whole sequence)."""
    if hasattr(attention, "sliding_window"):  # Qwen2: per layer
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)  # Mistral: the config's


def _plain_linear(layer, packed: bool) -> bool:
    """A plain ``nn.Linear`` (not LoRA-wrapped) with a plain float32 weight (``packed``: on the CPU)."""
    if type(layer) is not nn.Linear:
        return False
    weight = layer.weight
    return prepack.packable(weight) if packed else type(weight.data) is torch.Tensor and weight.dtype == torch.float32


def _plain_layer(layer: nn.Module, length: int, packed: bool) -> bool:
    """A decoder layer of plain float32 linears and RMS norms, with full attention over ``length`` tokens."""
    attention, mlp = layer.self_attn, layer.mlp
    linears = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    window = _window(attention)
    return (
        all(_plain_linear(m, packed) for m in linears)
        and hasattr(attention, "scaling")
        and all(hasattr(n, "variance_epsilon") for n in norms)
        and (window is None or window >= length)
    )


def _supported(model: nn.Module, length: int, dtype: torch.dtype, packed: bool) -> bool:
    """Whether ``model`` is one this module reproduces, for sequences of up to ``length`` tokens, computing its linear
    layers in ``dtype`` (``packed``: from oneDNN-packed weights)."""
    body = trunk(model)
    if type(body).__name__ not in FAMILIES or not _sdpa_has_gqa() or (packed and not prepack.packs(dtype)):
        return False
    if getattr(body.config, "hidden_act", None) != "silu" or not hasattr(body, "rotary_emb"):
        return False
    probe = torch.ones(1)
    if family_logits(model, probe) is not probe:  # a step after the head (soft-capping, a scale): the model's own
        return False
    head = model.get_output_embeddings()
    return _plain_linear(head, packed) and all(_plain_layer(layer, length, packed) for layer in body.layers)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """A Llama RMS norm's output for float32 ``x``: ``weight * x / sqrt(mean(x^2) + eps)`` (one fused kernel)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the half-split form of Llama): ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class LeanDecoder:
    """A Llama-family trunk and LM head with a static KV cache for ``batch`` rows of up to ``length`` tokens.

    It holds copies of the linear weights in ``dtype`` (``packed``: oneDNN-packed, on the CPU; bfloat16: for bf16
    autocast, under which it must then run), so it is built for one sampling pass (the weights must not change while it
    lives). :meth:`forward` takes the next block of positions (the left-padded prompt, then one token at a time) and
    returns the logits and final hidden state at the block's last position. One token's step has the same shapes at
    every position (it attends over the whole cache, the positions not yet written masked), so with ``compiled`` it
    runs through ``torch.compile`` (``sampling.compile``): one compile per batch size and cache length, the length
    rounded up to a multiple of :data:`LENGTH_BUCKET` so that prompts of other lengths reuse it; with ``graphed``
    (CUDA) it is captured as a CUDA graph at the first token and replayed after.
    """

    def __init__(self, model: nn.Module, batch: int, length: int, compiled: bool = False, dtype=torch.float32,
                 packed: bool = True, graphed: bool = False, panels: bool = False):  # fmt: skip
        self.body = trunk(model)
        self.blocks = [Block.of(layer, dtype, packed, panels) for layer in self.body.layers]
        self.head = Projection.of(model.get_output_embeddings(), dtype=dtype, packed=packed, panels=panels)
        weight, first = self.body.embed_tokens.weight, self.blocks[0]
        length = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET if compiled else length
        shape = (batch, first.split[1], length, first.head_dim)
        # keys are rotated in float32 (the rotary tables are); values are the projection's output, in ``dtype``
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.blocks]
        self.values = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in self.blocks]
        self.allowed = torch.zeros(batch, length, dtype=torch.bool, device=weight.device)  # keys later tokens see
        self.filled = 0
        self.one_token = compiled_one_token() if compiled else one_token
        self.graphed = GraphedStep(self.one_token) if graphed else None  # the step replayed as a CUDA graph

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None = None):
        """Logits (B, V) and hidden state (B, d) after ``ids`` (B, S) at ``positions`` (B, S).

        ``key_mask`` (B, S) marks which of these positions later tokens may attend to (0 on left padding); without
        it every position may be."""
        start, end = self.filled, self.filled + ids.shape[1]
        self.filled = end
        if ids.shape[1] == 1 and key_mask is None:  # one new token: the static step
            return self.next_token(ids, positions, start)
        self.allowed[:, start:end] = True if key_mask is None else key_mask.bool()
        x = self.body.embed_tokens(ids)
        cos, sin = (t.unsqueeze(1) for t in self.body.rotary_emb(x, positions))
        mask = self.mask(start, end)
        for i, block in enumerate(self.blocks):
            x = x + self.attention(i, block, rms_norm(x, block.norms[0]), cos, sin, mask, start, end)
            x = x + feed_forward(block, x)
        hidden = rms_norm(x[:, -1], self.body.norm)
        return self.head(hidden), hidden

    @property
    def can_keep_rows(self) -> bool:
        """Whether :meth:`keep_rows` may shrink the batch: on the CPU, stepping eagerly (a compiled step or a CUDA
        graph has the batch size built in)."""
        return self.allowed.device.type == "cpu" and self.graphed is None and self.one_token is one_token

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Go on with the batch rows ``rows`` (indices into the current batch) only: their cache, nothing else."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.allowed = self.allowed.index_select(0, rows)

    def next_token(self, ids: torch.Tensor, positions: torch.Tensor, start: int):
        """:func:`one_token` at cache slot ``start``, compiled, graphed or neither; where the compiler or the graph
        capture fails, a warning and this decoder steps eagerly from then on (the step only writes slot ``start``, so
        running it again is safe)."""
        try:
            if self.graphed is not None:
                return self.graphed(self, ids, positions, start)
            return self.one_token(self, ids, positions, torch.tensor([start], device=ids.device))
        except Exception as error:
            if self.graphed is None and self.one_token is one_token:
                raise
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            what = "sampling.fast_decoding: CUDA graph capture" if self.graphed else "sampling.compile: torch.compile"
            warnings.warn(f"{what} failed ({type(error).__name__}: {reason}); sampling without it", stacklevel=2)
            if self.graphed is None:
                _COMPILED["step"] = one_token  # later samplers in this process go straight to the eager step
            self.one_token, self.graphed = one_token, None
            return one_token(self, ids, positions, torch.tensor([start], device=ids.device))

    def mask(self, start: int, end: int) -> torch.Tensor:
        """(B, 1, S, end) additive mask: a position sees the allowed keys up to itself, and always itself (so a
        padding position's output stays finite; no real position ever sees it)."""
        queries = torch.arange(start, end, device=self.allowed.device)[:, None]
        keys = torch.arange(end, device=self.allowed.device)[None, :]
        seen = ((keys <= queries) & self.allowed[:, None, None, :end]) | (keys == queries)
        return torch.zeros(seen.shape, dtype=self.keys[0].dtype, device=seen.device).masked_fill_(~seen, float("-inf"))

    def attention(self, i: int, block: Block, x, cos, sin, mask, start: int, end: int) -> torch.Tensor:
        """A block of positions' attention: projections, rotary embedding, the cache written in place, attention over
        the keys so far, output projection."""
        batch, length, _ = x.shape
        queries, kv_heads = block.split[0], block.split[1]
        heads = block.qkv(x).view(batch, length, -1, block.head_dim).transpose(1, 2)
        rotated = rotate(heads[:, : queries + kv_heads], cos, sin)  # queries and keys in one pass
        self.keys[i][:, :, start:end] = rotated[:, queries:]
        self.values[i][:, :, start:end] = heads[:, queries + kv_heads :]
        keys, values = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        q = rotated[:, :queries]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=block.scaling, enable_gqa=True)
        return block.out(out.transpose(1, 2).reshape(batch, length, -1))


LENGTH_BUCKET = 64  # a compiled step's cache length is a multiple of this


def feed_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP on the normed residual stream: ``down(silu(gate) * up)``."""
    gate, up = block.gate_up(rms_norm(x, block.norms[1])).chunk(2, dim=-1)
    return block.down(F.silu(gate) * up)


def one_token(decoder: LeanDecoder, ids: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, layer=None):
    """One new token per row (``ids``, ``positions``: (B, 1)) written at cache slot ``index`` (a (1,) tensor):
    logits (B, V) and hidden state (B, d). Every tensor has the same shape at every step: attention covers the
    whole cache, the slots after ``index`` masked out. Each block runs through ``layer`` (:func:`layer_step`, or its
    compiled form)."""
    layer = layer or layer_step
    decoder.allowed.index_fill_(1, index, True)
    bias = torch.zeros(decoder.allowed.shape, dtype=decoder.keys[0].dtype, device=ids.device)
    bias = bias.masked_fill_(~decoder.allowed, float("-inf"))[:, None, None, :]
    x = decoder.body.embed_tokens(ids)
    cos, sin = (t.unsqueeze(1) for t in decoder.body.rotary_emb(x, positions))
    for block, keys, values in zip(decoder.blocks, decoder.keys, decoder.values):
        x = layer(block, keys, values, x, cos, sin, bias, index)
    hidden = rms_norm(x[:, -1], decoder.body.norm)
    return decoder.head(hidden), hidden


def layer_step(block: Block, keys, values, x, cos, sin, bias, index) -> torch.Tensor:
    """One decoder layer for one new token per row: the residual stream ``x`` (B, 1, d) after it, its key and value
    written into the layer's cache ``keys``, ``values`` at slot ``index``. The attention is :func:`attend`'s, not the
    fused attention kernel, whose set-up costs more than one query's work."""
    batch = x.shape[0]
    queries, kv_heads = block.split[0], block.split[1]
    heads = block.qkv(rms_norm(x, block.norms[0])).view(batch, 1, -1, block.head_dim).transpose(1, 2)
    rotated = rotate(heads[:, : queries + kv_heads], cos, sin)
    keys.index_copy_(2, index, rotated[:, queries:])
    values.index_copy_(2, index, heads[:, queries + kv_heads :])
    grouped = rotated[:, :queries].reshape(batch, kv_heads, -1, block.head_dim)  # query heads sharing a key head
    out = attend(grouped, keys, values, block.scaling, bias).view(batch, 1, -1)
    x = x + block.out(out)
    return x + feed_forward(block, x)


def attend(queries, keys, values, scaling: float, bias) -> torch.Tensor:
    """Attention of ``queries`` (B, H, Q, D) over ``keys``, ``values`` (B, H, L, D) with the additive ``bias``
    (B, 1, 1, L). Two batched multiplies; compiled for the CPU the same sums as products summed, which inductor fuses
    with the softmax into a few loops, where its batched multiplies would be oneDNN calls of a few kFLOP each at
    ~70 µs (SmolLM2: 60 a step, 4 ms)."""
    if not torch.compiler.is_compiling() or queries.device.type != "cpu":
        weights = ((queries @ keys.transpose(-1, -2)) * scaling + bias).softmax(-1)
        return weights @ values
    scores = (queries[:, :, :, None, :] * keys[:, :, None, :, :]).sum(-1)  # (B, H, Q, L)
    weights = (scores * scaling + bias).softmax(-1)
    return (weights[..., None] * values[:, :, None, :, :]).sum(-2)


_COMPILED = {}  # "step": the compiled one_token (one_token itself after a failed compile)


def compiled_one_token():
    """:func:`one_token` with its :func:`layer_step` through ``torch.compile`` (made once per process; it compiles per
    batch size and cache length). The layers share one graph, so the compiler traces one layer, not every one: on
    SmolLM2 (30 layers, 2 CPU cores, an empty compiler cache) the first sampling pass took 14 s where compiling the
    whole step took 37 s, and later passes ran as fast (2.27-2.45 s against 2.40-2.47 s, 16 x 32 tokens)."""
    if "step" not in _COMPILED:
        _COMPILED["step"] = functools.partial(
            one_token, layer=torch.compile(layer_step, dynamic=False, fullgraph=True)
        )
    return _COMPILED["step"]


class GraphedStep:
    """A one-token step (:func:`one_token`, or its compiled form) replayed as a CUDA graph.

    The first call runs the step as usual on a side stream (its result is that call's), then captures it into a
    graph whose inputs are copies of the token ids, positions and cache slot; each later call writes the new ones into
    those copies and replays the graph. Outputs are copied out of the graph's memory, which the next replay
    overwrites. The decoder's cache and weights stay where they are, so one graph serves its whole sampling pass.
    """

    def __init__(self, step):
        self.step, self.graph = step, None

    def __call__(self, decoder: LeanDecoder, ids: torch.Tensor, positions: torch.Tensor, start: int):
        if self.graph is not None:
            self.ids.copy_(ids)
            self.positions.copy_(positions)
            self.index.fill_(start)
            self.graph.replay()
            return self.logits.clone(), self.hidden.clone()
        self.ids, self.positions = ids.clone(), positions.clone()
        self.index = torch.full((1,), start, dtype=torch.long, device=ids.device)
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):  # kernels' lazy set-up (cuBLAS workspaces, compiles) happens outside the capture
            result = self.step(decoder, self.ids, self.positions, self.index)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), _uncached_autocast(ids.device):
            self.logits, self.hidden = self.step(decoder, self.ids, self.positions, self.index)
        self.graph = graph
        return result


def _uncached_autocast(device: torch.device):
    """Autocast as it is on ``device`` now, but without its cache of cast weights (a graph must not capture into
    memory autocast frees when it exits)."""
    dtype = prepack.compute_dtype(device)  # float32: autocast is off (it has no float32 mode)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)


def lean_decoder(
    model: nn.Module,
    batch: int,
    length: int,
    compiled: bool = False,
    dtype: torch.dtype = torch.float32,
    packed: bool | None = None,
) -> LeanDecoder | None:
    """A :class:`LeanDecoder` for ``model`` computing its linear layers in ``dtype`` (its one-token step compiled
    with ``compiled``, where this PyTorch can: float32 only on the CPU), or None when its architecture is not one this
    module reproduces or this CPU cannot pack ``dtype``. Its weights are oneDNN-packed on the CPU (``packed``: the
    default there; False takes the plain multiplies other devices use; a compiled step of at most 16 rows on an
    AVX-512 CPU takes :mod:`tether.small_linear`'s panels) and its step is graphed on CUDA."""
    device = model.get_output_embeddings().weight.device
    packed = device.type == "cpu" if packed is None else packed
    if not _supported(model, length, dtype, packed):
        return None
    compiled = compiled and (not packed or (prepack.compilable() and dtype == torch.float32))
    panels = compiled and packed and batch <= small_linear.ROWS and small_linear.available()
    return LeanDecoder(model, batch, length, compiled, dtype, packed, graphed=device.type == "cuda", panels=panels)
