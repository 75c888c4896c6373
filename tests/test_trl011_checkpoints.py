"""Value-head checkpoints in TRL 0.11's layout, both ways (issue 16): the language model's own keys plus
``v_head.summary.weight`` / ``v_head.summary.bias`` in the model's safetensors file (sharded or not)."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tether.legacy import AutoModelForCausalLMWithValueHead, LegacyValueError, PPOConfig, PPOTrainer

TRL_HEAD_KEYS = {"v_head.summary.weight", "v_head.summary.bias"}


def trl_checkpoint(policy_dir, folder, shards: int = 1):
    """A folder as TRL 0.11's ``save_pretrained`` left it: config, tokenizer, and the LM's weights with a trained
    value head (``v_head.summary.*``) in ``model.safetensors``, or in ``shards`` files with an index."""
    lm = AutoModelForCausalLM.from_pretrained(policy_dir)
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    torch.manual_seed(7)
    head = {"v_head.summary.weight": torch.randn(1, lm.config.n_embd), "v_head.summary.bias": torch.tensor([0.25])}
    state.update(head)
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{policy_dir}/{name}", folder / name)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return head
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return head


@pytest.mark.parametrize("shards", [1, 2])
def test_trl_checkpoint_keeps_its_value_head(policy_dir, tmp_path, shards):
    head = trl_checkpoint(policy_dir, tmp_path / "trl", shards)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "trl"))
    assert torch.equal(model.v_head.summary.weight, head["v_head.summary.weight"])
    assert torch.equal(model.v_head.summary.bias, head["v_head.summary.bias"])
    lm_keys = set(AutoModelForCausalLM.from_pretrained(policy_dir).state_dict())
    assert set(model.state_dict()) == lm_keys | TRL_HEAD_KEYS  # TRL's state_dict layout
    assert isinstance(model.v_head.dropout, torch.nn.Dropout) and model.v_head.dropout.p == 0.1  # TRL's head


def test_saved_checkpoint_is_in_trl_layout_and_round_trips(policy_dir, tmp_path):
    trl_checkpoint(policy_dir, tmp_path / "trl")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "trl"))
    with torch.no_grad():
        model.v_head.summary.weight.mul_(-2.0)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
        assert torch.equal(f.get_tensor("v_head.summary.weight"), model.v_head.summary.weight)
    assert TRL_HEAD_KEYS <= saved and any(k.startswith("transformer.h.") for k in saved)
    assert not any(k.startswith("pretrained_model.") for k in saved)
    assert not (tmp_path / "saved" / "value_head.safetensors").exists()
    again = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "saved"))
    assert torch.equal(again.v_head.summary.weight, model.v_head.summary.weight)
    # state_dict() / load_state_dict() round-trip in TRL's layout, and PyTorch's own layout loads too
    fresh = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    fresh.load_state_dict(torch.nn.Module.state_dict(again))
    with pytest.raises(RuntimeError, match="missing keys"):
        fresh.load_state_dict({"v_head.summary.weight": model.v_head.summary.weight})


def test_trainer_starts_from_a_trl_checkpoint(policy_dir, tmp_path, tokenizer):
    head = trl_checkpoint(policy_dir, tmp_path / "trl")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "trl"))
    config = PPOConfig(
        batch_size=2, mini_batch_size=2, ppo_epochs=1, learning_rate=0.0, accelerator_kwargs={"cpu": True}
    )
    trainer = PPOTrainer(config, model, None, tokenizer)
    assert torch.equal(trainer.ref_model.v_head.summary.weight, head["v_head.summary.weight"])
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    stats = trainer.step(queries, [torch.tensor([10, 11]), torch.tensor([12])], [1.0, 0.0])
    assert stats["ppo/val/mean"] != 0.0  # the loaded head's values, not a fresh zero head


def test_value_head_that_does_not_fit_is_an_error(policy_dir, tmp_path):
    trl_checkpoint(policy_dir, tmp_path / "trl")
    file = tmp_path / "trl" / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["v_head.summary.weight"] = torch.zeros(1, 7)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(LegacyValueError, match="does not fit this model"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "trl"))


def test_peft_checkpoint_round_trips_and_trl_pickle_head_is_reported(policy_dir, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, peft_config=config)
    assert model.is_peft_model and set(model.state_dict()) == TRL_HEAD_KEYS  # as TRL: only the head
    model.save_pretrained(tmp_path / "adapter")
    files = {f.name for f in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= files
    again = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "adapter"), is_trainable=True)
    assert again.is_peft_model and torch.equal(again.v_head.summary.weight, model.v_head.summary.weight)
    assert any(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)
    frozen = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "adapter"))  # TRL's default
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "lora_" in n)
    # TRL wrote a PEFT model's head to pytorch_model.bin: tether does not read pickle, and says so
    (tmp_path / "adapter" / "value_head.safetensors").rename(tmp_path / "adapter" / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="pytorch_model.bin may hold a TRL value head.*never reads pickle"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "adapter"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary model folder has no head to report
        AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
