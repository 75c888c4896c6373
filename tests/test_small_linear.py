"""The small-batch float32 multiply (tether/csrc/small_linear.cpp) against torch's, and where the decoder takes it."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tether import prepack, small_linear
from tether.decoding import lean_decoder

needs_kernel = pytest.mark.skipif(not small_linear.available(), reason="no AVX-512 or no C++ build here")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_it_multiplies_as_torch_does(rows, with_bias):
    torch.manual_seed(0)
    weight, x = torch.randn(48, 37), torch.randn(rows, 37)
    bias = torch.randn(48) if with_bias else None
    torch.testing.assert_close(small_linear.linear(x, small_linear.pack(weight), bias), F.linear(x, weight, bias))


@needs_kernel
def test_it_runs_inside_a_compiled_function_as_an_operator_of_its_own():
    torch.manual_seed(0)
    weight, x = torch.randn(32, 24), torch.randn(4, 24)
    packed = small_linear.pack(weight)
    compiled = torch.compile(lambda x: small_linear.linear(torch.relu(x), packed, None) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(torch.relu(x), weight) * 2)


def test_only_widths_of_whole_panels_pack():
    assert small_linear.packable(torch.zeros(48, 5)) and not small_linear.packable(torch.zeros(40, 5))
    assert not small_linear.packable(torch.zeros(48, 5, dtype=torch.bfloat16))


def test_without_avx512_or_a_build_it_is_not_used(monkeypatch):
    monkeypatch.setattr(small_linear, "_BUILT", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no AVX-512: quietly not used
        assert not small_linear.available()
    monkeypatch.setattr(small_linear, "_BUILT", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension\nsmall_linear.cpp:1: error: no C++ compiler here")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with pytest.warns(UserWarning, match="small-batch multiply was not built.*error: no C\\+\\+ compiler here"):
        assert not small_linear.available()


@needs_kernel
@pytest.mark.skipif(not prepack.compilable(), reason="this PyTorch cannot compile the packed linear")
def test_the_compiled_decoder_takes_it_for_up_to_16_rows_only():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()  # fmt: skip
    assert lean_decoder(model, 16, 20, compiled=True).head.plain
    assert not lean_decoder(model, 17, 20, compiled=True).head.plain  # more rows: oneDNN's blocked multiply
    assert not lean_decoder(model, 16, 20, compiled=False).head.plain  # an eager sampler builds nothing
