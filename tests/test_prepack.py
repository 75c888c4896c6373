"""oneDNN-packed linear weights for CPU decoding: the same numbers as the plain layers, layers restored afterwards,
and the plain path wherever the packed one does not apply."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from tether import prepack
from tether.prepack import prepacked_linears

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this PyTorch has no oneDNN packed linear")


def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def linear_layers(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


@pytest.mark.parametrize("build", [llama, gpt2], ids=["Linear", "Conv1D"])
def test_packed_layers_give_the_plain_logits_and_are_restored(build):
    model = build()
    ids = torch.randint(0, 300, (3, 11))
    with torch.no_grad():
        plain = model(ids).logits
        with prepacked_linears(model) as count:
            assert count == len(linear_layers(model))  # every linear layer, the LM head too
            assert all("forward" in vars(m) for m in linear_layers(model))
            packed = model(ids).logits
            first = linear_layers(model)[0].weight
            first.mul_(2)  # the packed copy is what runs now, so this changes nothing inside
            assert torch.equal(model(ids).logits, packed)
            first.div_(2)
        after = model(ids).logits
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(m) for m in linear_layers(model))
    assert torch.equal(after, plain)


needs_bf16 = pytest.mark.skipif(not prepack.packs(torch.bfloat16), reason="oneDNN has no bf16 on this CPU")


@needs_bf16
@pytest.mark.parametrize("build", [llama, gpt2], ids=["Linear", "Conv1D"])
def test_under_bf16_autocast_layers_packed_in_bf16_compute_as_autocast_does(build):
    model = build()
    ids = torch.randint(0, 300, (3, 11))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids).logits
        with prepacked_linears(model, dtype=torch.bfloat16) as count:
            assert count == len(linear_layers(model))
            packed = model(ids).logits
        with prepacked_linears(model) as count:  # float32 copies: autocast computes in bf16, so they stay unused
            assert count == len(linear_layers(model))
            unused = model(ids).logits
    assert packed.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(packed.float(), plain.float(), atol=1e-2, rtol=0)  # a bf16 rounding or two
    assert torch.equal(unused, plain)
    with torch.no_grad(), prepacked_linears(model, dtype=torch.bfloat16):
        outside = model(ids).logits  # no autocast: float32 inputs, the float32 layers' own forward
    assert outside.dtype == torch.float32 and torch.equal(outside, model(ids).logits)


def test_gradients_and_other_dtypes_take_the_plain_path():
    model = llama()
    ids = torch.randint(0, 300, (2, 7))
    plain = model(ids).logits
    with prepacked_linears(model):
        with_grad = model(ids).logits
    assert torch.equal(with_grad, plain)  # under autograd the packed copy is never read
    with_grad.sum().backward()
    assert model.lm_head.weight.grad is not None
    with torch.no_grad(), prepacked_linears(model.to(torch.bfloat16)) as count:
        assert count == 0


def test_off_and_lora_layers():
    model = llama()
    with prepacked_linears(model, enabled=False) as count:
        assert count == 0 and not any("forward" in vars(m) for m in linear_layers(model))
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        lora.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.normal_()
        plain = lora(ids).logits
        with prepacked_linears(lora):
            packed = lora(ids).logits
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_an_exception_inside_restores_the_layers():
    model = gpt2()
    with pytest.raises(RuntimeError, match="inside"), prepacked_linears(model):
        raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in linear_layers(model))


def test_a_linear_subclass_with_its_own_forward_is_left_alone():
    """Llama 4's router is an nn.Linear whose forward returns (scores, logits): routing it through the packed
    multiply would return one tensor. Such layers keep their forward; plain linears beside them are packed."""

    class Router(torch.nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.sigmoid(), logits

    model = torch.nn.ModuleDict({"router": Router(8, 4), "proj": torch.nn.Linear(8, 4)})
    x = torch.randn(3, 8)
    with torch.no_grad(), prepacked_linears(model) as count:
        assert count == 1 and "forward" in vars(model["proj"]) and "forward" not in vars(model["router"])
        scores, logits = model["router"](x)
        projected = model["proj"](x)
    with torch.no_grad():
        torch.testing.assert_close(logits, torch.nn.functional.linear(x, model["router"].weight, model["router"].bias))
        torch.testing.assert_close(scores, logits.sigmoid())
        torch.testing.assert_close(projected, model["proj"](x), atol=1e-5, rtol=1e-5)
