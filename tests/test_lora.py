"""LoRA through peft: the reference is the policy with its adapter disabled (one copy of the weights)."""

import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

pytest.importorskip("peft")

from tether.config import RunConfig  # noqa: E402
from tether.demo.task import ALPHABET  # noqa: E402
from tether.errors import TetherError  # noqa: E402
from tether.lora import AdapterDisabledReference, add_lora, export_policy, merged_lora_state, parameter_bytes  # noqa: E402
from tether.models import ActorCritic, char_tokenizer, load_causal_lm, new_scalar_model  # noqa: E402
from tether.passes import is_peft_model, response_logits  # noqa: E402
from tether.rollout import Sampling, generate  # noqa: E402
from tether.trainers.common import save_model  # noqa: E402
from tether.trainers.ppo import PPOTrainer  # noqa: E402

PROMPTS = ["1+2=", "13+4=", "7+7=", "20+9=", "3+30=", "11+11=", "2+5=", "9+18="]


def tiny(family: str, vocab_size: int, eos_id: int, width: int = 32):
    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id)
    if family == "gpt2":
        return GPT2Config(
            n_embd=width,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=family == "qwen2",
        **common,
    )


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tiny Llama (width 64, 2 layers) policy folder and a reward model on its trunk."""
    tok = char_tokenizer(ALPHABET)
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny("llama", len(tok), tok.eos_token_id, width=64)).save_pretrained(
        root / "policy"
    )
    tok.save_pretrained(root / "policy")
    torch.manual_seed(1)
    new_scalar_model(str(root / "policy")).save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")
    return str(root / "policy"), str(root / "reward")


def ppo_config(llama_dirs, run_dir, lora_r: int, value_model: str = "head") -> RunConfig:
    config = RunConfig(output_dir=str(run_dir))
    config.model.policy, config.model.reward_model = llama_dirs
    config.model.device, config.model.value_model, config.model.lora_r = "cpu", value_model, lora_r
    config.ppo.steps, config.ppo.rollout_batch_size, config.ppo.mini_batch_size = 1, 8, 4
    config.ppo.ppo_epochs, config.ppo.lr = 1, 1e-2
    config.sampling.max_new_tokens = 8
    config.logging.print_every = 0
    return config.finalize()


def probe(tokenizer):
    ids = torch.tensor([tokenizer("12+3=15")["input_ids"], tokenizer("4+40=44")["input_ids"]])
    return ids, torch.ones_like(ids)


def logits_of(model, tokenizer):
    ids, mask = probe(tokenizer)
    with torch.no_grad():
        return response_logits(model, ids, mask, 3, 1.0, tokenizer.eos_token_id)


def test_lora_shares_weights_and_reference_stays_base(llama_dirs, tmp_path):
    full = PPOTrainer.from_config(ppo_config(llama_dirs, tmp_path / "full", lora_r=0))
    full_bytes = parameter_bytes(full.actor_critic, full.reference)
    del full
    torch.manual_seed(0)
    trainer = PPOTrainer.from_config(ppo_config(llama_dirs, tmp_path / "lora", lora_r=8))
    policy, reference, tok = trainer.actor_critic.policy, trainer.reference, trainer.tokenizer
    assert is_peft_model(policy) and isinstance(reference, AdapterDisabledReference)
    assert list(reference.parameters()) == []  # nothing of its own: it reads the policy's weights
    lora_bytes = parameter_bytes(trainer.actor_critic, reference)
    # unique storage, counted by hand as well: policy (with adapter) + value head, nothing else
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in trainer.actor_critic.parameters()
    }
    assert lora_bytes == sum(storages.values())
    assert lora_bytes < 0.6 * full_bytes, (lora_bytes, full_bytes)
    trainable = sum(p.numel() * p.element_size() for p in trainer.actor_critic.parameters() if p.requires_grad)
    print(
        f"\nparameter bytes: full policy + deep-copied reference {full_bytes}, LoRA r=8 shared {lora_bytes}; "
        f"trainable bytes with LoRA {trainable}"
    )

    base = load_causal_lm(llama_dirs[0]).eval()
    ref_before, policy_before = logits_of(reference, tok), logits_of(policy, tok)
    assert torch.equal(ref_before, logits_of(base, tok))
    assert torch.equal(policy_before, ref_before)  # B = 0 at the start: the adapter adds nothing yet
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    first_stats = []
    micro_step = trainer.micro_step

    def spy(*args):
        first_stats.append(micro_step(*args))
        return first_stats[-1]

    trainer.micro_step = spy
    trainer.train(PROMPTS, tmp_path / "lora")
    assert abs(first_stats[0]["ppo/ratio_max"] - 1) < 1e-5 and abs(first_stats[0]["ppo/ratio_min"] - 1) < 1e-5
    assert torch.equal(logits_of(reference, tok), ref_before)
    assert (logits_of(policy, tok) - policy_before).abs().max() > 1e-4
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if not p.requires_grad)
    assert trainer.actor_critic.value_head.weight.abs().sum() > 0

    # the final model/ folder: adapter merged into a copy, loadable by plain AutoModelForCausalLM
    after = logits_of(policy, tok)
    path = save_model(policy, tok, tmp_path / "model")
    assert (path / "model.safetensors").is_file() and not (path / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(logits_of(reloaded, tok), after, atol=1e-5, rtol=0)
    assert is_peft_model(policy) and torch.equal(logits_of(policy, tok), after)  # the trained model kept its adapter


def test_lora_with_separate_critic(llama_dirs, tmp_path):
    trainer = PPOTrainer.from_config(ppo_config(llama_dirs, tmp_path, lora_r=4, value_model="separate"))
    critic_before = [p.detach().clone() for p in trainer.actor_critic.critic.parameters()]
    trainer.train(PROMPTS, tmp_path)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.actor_critic.critic.parameters(), critic_before))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_lora_on_each_family(family):
    """Reference = base logits even with a non-zero adapter; values on the trunk; generate on the PeftModel."""
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny(family, len(tok), tok.eos_token_id)).eval()
    base_logits = logits_of(model, tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = add_lora(model, r=4, alpha=8.0)
    # neither peft's Conv1D warning nor its use of a name transformers deprecated reaches the user
    assert not [w for w in caught if any(s in str(w.message) for s in ("fan_in_fan_out", "is_gradient_checkpointing"))]
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    reference = AdapterDisabledReference(policy)
    assert torch.equal(logits_of(reference, tok), base_logits)
    assert (logits_of(policy, tok) - base_logits).abs().max() > 1e-3

    ids, mask = probe(tok)
    actor_critic = ActorCritic(policy)
    logits, values = actor_critic(ids, mask, 3, 1.0, tok.eos_token_id)
    assert logits.shape[:2] == values.shape == (2, ids.shape[1] - 3)
    values.sum().backward()
    assert actor_critic.value_head.weight.grad is not None
    response, response_mask = generate(
        policy, ids[:, :3], mask[:, :3], Sampling(max_new_tokens=5), tok.eos_token_id, tok.pad_token_id
    )
    assert response.shape[0] == 2 and response.shape[1] <= 5 and response_mask.shape == response.shape

    merged, state = export_policy(policy)
    assert not is_peft_model(merged) and is_peft_model(policy) and state is None
    torch.testing.assert_close(logits_of(merged, tok), logits_of(policy, tok), atol=1e-5, rtol=0)
    # what FSDP's export computes from the gathered state dict: peft's merge, key for key, without the copy
    computed, expected = merged_lora_state(policy, policy.state_dict()), merged.state_dict()
    assert computed.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(computed[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_lora_errors(monkeypatch):
    tok = char_tokenizer(ALPHABET)
    model = AutoModelForCausalLM.from_config(tiny("llama", len(tok), tok.eos_token_id))
    with pytest.raises(TetherError, match="model.lora_target_modules='nope'"):
        add_lora(model, r=4, target_modules="nope")
    with pytest.raises(TetherError, match="lora_dropout"):
        add_lora(model, r=4, dropout=1.5)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(TetherError, match=r"needs the peft package \(pip install 'tether\[lora\]'\)"):
        add_lora(model, r=4)
