"""The lean Llama-family decoder against transformers' own forward: each family, left padding, prompt then tokens one
at a time; the sampler on it against the plain path; and the models it leaves to transformers."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers import cache_utils

from tether import prepack, small_linear
from tether.decoding import LeanDecoder, lean_decoder
from tether.passes import model_inputs
from tether import sampling
from tether.sampling import Sampling, TransformersSteps, row_keys, sample

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this PyTorch has no oneDNN packed linear")
needs_compile = pytest.mark.skipif(not prepack.compilable(), reason="this PyTorch cannot compile the packed linear")
SIZES = dict(vocab_size=200, hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, rope_theta=500.0)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True)),  # q, k, v with biases
}
OTHERS = {  # decoded through transformers' own forward (TransformersSteps)
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=200, n_embd=96, n_layer=2, n_head=6, n_positions=128)),
    "mistral-window": lambda: MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4)),
}


def build(family: str):
    torch.manual_seed(0)
    model = {**FAMILIES, **OTHERS}[family]().eval()
    with torch.no_grad():  # non-zero biases and norm weights, so a mix-up of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.1 if name.endswith("bias") else 1.0, 0.2)
    return model


def padded_prompts():
    ids = torch.randint(3, 200, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0  # a one-token prompt
    return ids, mask


@pytest.mark.parametrize(
    "family, compiled, packed",
    [
        *((family, False, True) for family in FAMILIES),
        pytest.param("qwen2", True, True, marks=needs_compile),
        *((family, False, False) for family in ("llama", "qwen2")),  # the plain multiplies of other devices
    ],
)
def test_prompt_then_tokens_match_the_full_forward(family, compiled, packed):
    model = build(family)
    ids, mask = padded_prompts()
    steps = 4
    decoder = lean_decoder(model, 3, ids.shape[1] + steps, compiled, packed=packed)
    assert decoder is not None and decoder.keys[0].shape[2] == (64 if compiled else ids.shape[1] + steps)
    panels = compiled and small_linear.available()  # compiled on an AVX-512 CPU: the small-batch kernel's panels
    assert bool(decoder.blocks[0].qkv.plain) == panels and decoder.blocks[0].qkv.packed == (packed and not panels)
    assert decoder.head.packed == packed and not decoder.head.plain  # 200 ids: not a multiple of 16, oneDNN's
    assert_steps_match_the_full_forward(model, decoder, ids, mask, steps, tolerance=1e-5)


def assert_steps_match_the_full_forward(model, decoder, ids, mask, steps: int, tolerance: float):
    """The decoder's logits and hidden state after the prompt, then after each of ``steps`` greedy tokens fed one at
    a time, against transformers' forward over the whole sequence so far."""
    inputs = model_inputs(ids, mask, 0)
    with torch.no_grad():
        logits, hidden = decoder.forward(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"])
        for step in range(steps + 1):
            full = model(**model_inputs(ids, mask, 0), output_hidden_states=True)
            torch.testing.assert_close(logits, full.logits[:, -1], atol=tolerance, rtol=tolerance)
            torch.testing.assert_close(hidden, full.hidden_states[-1][:, -1], atol=tolerance, rtol=tolerance)
            if step == steps:
                break
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            position = model_inputs(ids, mask, 0)["position_ids"][:, -1:]
            logits, hidden = decoder.forward(token, position)


@pytest.mark.parametrize(
    "family, compiled", [("llama", False), ("qwen2", False), pytest.param("llama", True, marks=needs_compile)]
)
def test_the_sampler_on_it_samples_what_the_plain_path_samples(family, compiled):
    model = build(family)
    ids, mask = padded_prompts()
    keys = row_keys(5, 0, range(3))
    lean, plain = (
        sample(model, ids, mask, Sampling(9, 0.8, fast_decoding=on, compile=compiled), [1], keys, record=True)
        for on in (True, False)
    )
    assert torch.equal(lean.tokens, plain.tokens)
    for name in ("logprobs", "entropy", "hidden"):
        torch.testing.assert_close(getattr(lean, name), getattr(plain, name), atol=1e-5, rtol=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_on_cuda_the_graphed_step_matches_the_full_forward(family):
    """The one-token step captured as a CUDA graph at the first token and replayed at the others (no fallback to the
    eager step): logits and hidden states those of transformers' forward over the whole sequence."""
    from tether.decoding import GraphedStep

    model = build(family).cuda()
    ids, mask = (t.cuda() for t in padded_prompts())
    steps = 4
    decoder = lean_decoder(model, 3, ids.shape[1] + steps)
    assert isinstance(decoder.graphed, GraphedStep) and not decoder.head.packed
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "sampling.fast_decoding")  # a failed capture warns and steps eagerly
        assert_steps_match_the_full_forward(model, decoder, ids, mask, steps, tolerance=1e-4)
    assert isinstance(decoder.graphed, GraphedStep) and decoder.graphed.graph is not None


@needs_cuda
def test_on_cuda_the_sampler_samples_what_the_plain_path_samples():
    """The sampler on the graphed lean decoder against transformers' forward, with the rarer stop checks of a GPU:
    rows that run on, and rows that all stop at their first token (the steps after are dropped)."""
    model = build("qwen2").cuda()
    ids, mask = (t.cuda() for t in padded_prompts())
    keys = row_keys(5, 0, range(3), device="cuda")
    for stops in ([1], list(range(200))):
        lean, plain = (
            sample(model, ids, mask, Sampling(12, 0.8, fast_decoding=on), stops, keys, record=True)
            for on in (True, False)
        )
        assert torch.equal(lean.tokens, plain.tokens)
        for name in ("logprobs", "entropy", "hidden"):
            torch.testing.assert_close(getattr(lean, name), getattr(plain, name), atol=1e-4, rtol=1e-4)
    assert lean.tokens.shape[1] == 1


@needs_cuda
def test_on_cuda_under_bf16_autocast_the_graphed_step_computes_as_transformers_does():
    model = build("llama").cuda()
    ids, mask = (t.cuda() for t in padded_prompts())
    keys = row_keys(5, 0, range(3), device="cuda")
    on_cuda = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    lean, plain = (
        sample(model, ids, mask, Sampling(8, min_new_tokens=8, fast_decoding=on), [1], keys, on_cuda, record=True)
        for on in (True, False)
    )
    same = (lean.tokens == plain.tokens).int().cumprod(1).bool()  # up to a draw a bf16 rounding may have moved
    assert same.float().mean() > 0.8
    torch.testing.assert_close(lean.logprobs[same], plain.logprobs[same], atol=3e-2, rtol=0)


class FakeGraph:
    """A stand-in for ``torch.cuda.CUDAGraph`` on the CPU with a graph's contract: a replay computes the captured step
    again from the step's input tensors as they are now, into the output tensors of the capture."""

    decoder = None  # the LeanDecoder whose GraphedStep captured this graph

    def replay(self):
        graphed = FakeGraph.decoder.graphed
        logits, hidden = graphed.step(FakeGraph.decoder, graphed.ids, graphed.positions, graphed.index)
        graphed.logits.copy_(logits)
        graphed.hidden.copy_(hidden)


def test_the_graphed_step_feeds_each_token_to_its_graph_and_copies_the_outputs_out(monkeypatch):
    """GraphedStep's bookkeeping, which CI (no GPU) cannot run for real: with CUDA's stream and graph calls replaced by
    the CPU stand-ins above, the sampler on a graphed decoder samples what the plain path samples, every step's
    recorded hidden state its own (a replay overwrites the graph's outputs: they must be copied out)."""
    from contextlib import nullcontext

    from tether.decoding import GraphedStep, LeanDecoder

    stream = type("Stream", (), {"__init__": lambda self, *a: None, "wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **k: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)

    def graphed_decoder(model, batch, length, compiled, dtype):
        FakeGraph.decoder = LeanDecoder(model, batch, length, compiled, dtype, packed=False, graphed=True)
        return FakeGraph.decoder

    monkeypatch.setattr(sampling, "lean_decoder", graphed_decoder)
    model = build("qwen2")
    ids, mask = padded_prompts()
    keys = row_keys(5, 0, range(3))
    lean = sample(model, ids, mask, Sampling(12, 0.8, min_new_tokens=12), [1], keys, record=True)
    plain = sample(model, ids, mask, Sampling(12, 0.8, min_new_tokens=12, fast_decoding=False), [1], keys, record=True)
    graphed = FakeGraph.decoder.graphed
    assert isinstance(graphed, GraphedStep) and graphed.graph is not None
    assert int(graphed.index) == ids.shape[1] + 10  # the last step's cache slot reached the graph's input
    assert torch.equal(lean.tokens, plain.tokens)
    for name in ("logprobs", "entropy", "hidden"):
        torch.testing.assert_close(getattr(lean, name), getattr(plain, name), atol=1e-5, rtol=1e-5)


def test_checking_for_stopped_rows_less_often_gives_the_same_samples(monkeypatch):
    """On a GPU the sampler asks whether every row has stopped once every few steps (each asking waits for the card),
    then drops the steps decoded after they all had: the result is what asking at every step gives."""
    model = build("llama")
    ids, mask = padded_prompts()
    keys = row_keys(2, 0, range(3))
    stops = list(range(3, 120))  # most of the vocabulary: rows stop within a step or two
    every_step = sample(model, ids, mask, Sampling(20), stops, keys, record=True)
    monkeypatch.setattr(sampling, "stop_check_every", lambda device: 8)
    every_eighth = sample(model, ids, mask, Sampling(20), stops, keys, record=True)
    assert every_step.tokens.shape[1] < 8
    for name in ("tokens", "logprobs", "entropy", "hidden"):
        assert torch.equal(getattr(every_step, name), getattr(every_eighth, name))


needs_bf16 = pytest.mark.skipif(not prepack.packs(torch.bfloat16), reason="oneDNN has no bf16 on this CPU")
bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731


@needs_bf16
@pytest.mark.parametrize("family", list(FAMILIES))
def test_under_bf16_autocast_it_computes_as_transformers_does_there(family):
    """model.dtype=bfloat16: weights packed in bf16, logits in bf16, to a bf16 rounding of transformers' forward."""
    model = build(family)
    ids, mask = padded_prompts()
    steps = 4
    decoder = lean_decoder(model, 3, ids.shape[1] + steps, dtype=torch.bfloat16)
    assert decoder.head.weight.dtype == decoder.values[0].dtype == torch.bfloat16
    inputs = model_inputs(ids, mask, 0)
    with torch.no_grad(), bf16():
        logits, hidden = decoder.forward(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"])
        for step in range(steps + 1):
            full = model(**model_inputs(ids, mask, 0), output_hidden_states=True)
            assert logits.dtype == full.logits.dtype == torch.bfloat16 and hidden.dtype == torch.float32
            torch.testing.assert_close(logits.float(), full.logits[:, -1].float(), atol=1e-2, rtol=0)
            torch.testing.assert_close(hidden, full.hidden_states[-1][:, -1], atol=5e-2, rtol=1e-2)
            if step == steps:
                break
            token = full.logits[:, -1].float().argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            position = model_inputs(ids, mask, 0)["position_ids"][:, -1:]
            logits, hidden = decoder.forward(token, position)


@needs_bf16
def test_under_bf16_autocast_the_sampler_runs_it_in_bf16(monkeypatch):
    model = build("llama")
    ids, mask = padded_prompts()
    built = []
    monkeypatch.setattr(sampling, "lean_decoder", lambda *a: built.append(a[-1]) or lean_decoder(*a))
    fast, plain = (
        sample(model, ids, mask, Sampling(6, fast_decoding=on), [1], row_keys(0, 0, range(3)), bf16, record=True)
        for on in (True, False)
    )
    assert built == [torch.bfloat16]
    assert torch.equal(fast.tokens, plain.tokens)  # a bf16 rounding apart: the same draws here
    torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=1e-2, rtol=0)


def test_models_it_leaves_to_transformers():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    assert lean_decoder(gpt2, 2, 16) is None
    windowed = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=16))
    assert lean_decoder(windowed, 2, 16) is not None and lean_decoder(windowed, 2, 17) is None
    assert lean_decoder(build("llama").to(torch.bfloat16), 2, 16) is None
    assert lean_decoder(build("llama").to(torch.bfloat16), 2, 16, packed=False) is None  # float32 weights only
    lora = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert lean_decoder(lora, 2, 16) is None  # LoRA layers run through transformers (their base layers packed)


@needs_compile
def test_a_compiled_sampler_compiles_once_per_length_bucket_and_falls_back_when_the_compiler_fails(monkeypatch):
    from torch._dynamo.utils import counters

    from tether import decoding

    torch._dynamo.reset()  # no step compiled by an earlier test
    monkeypatch.setattr(decoding, "_COMPILED", {})
    model = build("llama")
    ids, mask = padded_prompts()
    keys = row_keys(1, 0, range(3))
    eager = sample(model, ids, mask, Sampling(5), [1], keys, record=True)
    before = counters["stats"]["unique_graphs"]
    compiled = sample(model, ids, mask, Sampling(5, compile=True), [1], keys, record=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == before + 1 and len(model.model.layers) > 1  # one layer's graph serves every layer
    longer = torch.cat([ids[:, :2], ids], 1), torch.cat([torch.zeros_like(mask[:, :2]), mask], 1)  # 9 tokens, not 7
    sample(model, *longer, Sampling(5, compile=True), [1], keys, record=True)
    assert counters["stats"]["unique_graphs"] == graphs  # the same cache length bucket: no new graph
    assert torch.equal(compiled.tokens, eager.tokens)

    def broken(*args):
        raise RuntimeError("no C++ compiler here\nmore detail")

    monkeypatch.setitem(decoding._COMPILED, "step", broken)
    with pytest.warns(UserWarning, match=r"sampling.compile: torch.compile failed \(RuntimeError: no C\+\+ compiler "
                      r"here\); sampling without it"):  # fmt: skip
        fallen = sample(model, ids, mask, Sampling(5, compile=True), [1], keys, record=True)
    assert decoding._COMPILED["step"] is decoding.one_token  # later samplers go straight to the eager step
    assert torch.equal(fallen.tokens, eager.tokens)
    torch.testing.assert_close(fallen.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)  # a longer cache: rounding


def test_a_cache_with_more_than_keys_and_values_keeps_every_row():
    """transformers' forward drops rows only where every cache layer is keys and values, which a row selection
    follows: a layer with recurrent state (a hybrid model's) keeps the whole batch."""
    steps = TransformersSteps(build("gpt2"))
    ids = torch.randint(3, 200, (4, 5))
    inputs = model_inputs(ids, torch.ones_like(ids), 3)
    with torch.no_grad():
        steps.forward(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"])
    assert steps.can_keep_rows
    if not hasattr(cache_utils, "LinearAttentionAndFullAttentionLayer"):
        pytest.skip("this transformers has no linear-attention cache layer")
    steps.cache.layers[1] = cache_utils.LinearAttentionAndFullAttentionLayer()
    assert not steps.can_keep_rows


@pytest.mark.parametrize(
    "family, decoder",
    [
        ("llama", LeanDecoder),
        ("gpt2", TransformersSteps),  # transformers' own forward and cache
        ("mistral-window", TransformersSteps),  # a sliding-window cache (4 tokens), shorter than the responses
    ],
)
def test_rows_that_stopped_leave_the_batch_and_the_others_sample_the_same(monkeypatch, family, decoder):
    """On the CPU the eager decoder drops the rows that have stopped once a quarter of its rows have (a step costs
    less with fewer rows): the other rows draw the tokens, and record the log-probs, entropies and hidden states, that
    decoding every row to the end gives."""
    model = build(family)
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (8, 5))
    keys = row_keys(3, 0, range(8))
    stops = list(range(3, 33))  # a sixth of the vocabulary: rows stop after different numbers of steps
    kept, keep_rows = [], decoder.keep_rows
    monkeypatch.setattr(decoder, "keep_rows", lambda self, rows: (kept.append(len(rows)), keep_rows(self, rows)))
    dropping = sample(model, ids, torch.ones_like(ids), Sampling(16), stops, keys, record=True)
    monkeypatch.setattr(decoder, "can_keep_rows", False)
    whole = sample(model, ids, torch.ones_like(ids), Sampling(16), stops, keys, record=True)
    lengths = torch.isin(whole.tokens, torch.tensor(stops)).int().argmax(1)
    assert len(set(lengths.tolist())) > 3  # the rows stopped at different steps
    assert kept and kept == sorted(kept, reverse=True) and kept[0] <= 6  # dropped a quarter or more each time
    assert torch.equal(dropping.tokens, whole.tokens)
    for name in ("logprobs", "entropy", "hidden"):
        torch.testing.assert_close(getattr(dropping, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
