"""Shared fixtures: tiny models built from a config in the test (no downloads)."""

import os

import pytest
import torch
import transformers
from transformers import AutoTokenizer, GPT2LMHeadModel

from tether.demo.task import ALPHABET
from tether.models import char_tokenizer, new_scalar_model, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ]
)
def device(request):
    """Every device the suite finds: "cpu" always, "cuda" when available (a mismatch then fails a test)."""
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer(ALPHABET)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory, tokenizer):
    """A 2-layer GPT-2 (width 32) with the character tokenizer, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy")
    config = tiny_config(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, n_embd=32, n_layer=2, n_head=2
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory, policy_dir, tokenizer):
    """A reward model (sequence classification, one label) on the tiny policy's trunk."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("reward")
    model = new_scalar_model(policy_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_ppo_args(policy_dir, reward_dir):
    """Dotted overrides for a short PPO run on the tiny models; tests append their own (the last one wins)."""
    return [
        f"model.policy={policy_dir}",
        f"model.reward_model={reward_dir}",
        "ppo.steps=2",
        "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=2",
        "ppo.lr=1e-3",
        "sampling.max_new_tokens=8",
        "logging.print_every=0",
    ]


@pytest.fixture()
def user_tokenizer(policy_dir):
    """The tutorial's tokenizer, as its scripts make it: pad_token set to eos_token."""
    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.pad_token = tok.eos_token
    return tok
