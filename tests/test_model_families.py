"""GPT-2, Llama and Qwen2 folders end to end: PPO from config, padding invariance, save and reload.

Each family is a tiny model built from its config (2 layers, width 32) with a BPE tokenizer trained here that has no
pad token: ``load_tokenizer`` adds a separate one and ``model_inputs`` replaces it before embedding.
"""

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn
from tokenizers import Tokenizer, decoders, models, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from tether import prepack, sampling
from tether.algo import logprobs_from_logits
from tether.config import RunConfig
from tether.data import left_pad
from tether.errors import TetherError
from tether.models import (
    ActorCritic,
    check_logits,
    enable_gradient_checkpointing,
    fuse_activations,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    new_scalar_model,
    reference_copy,
)
from tether.passes import (
    compiled_trunks,
    family_logits,
    hidden_states,
    last_feed_forward,
    response_logits,
    sequence_scores,
    trunk,
)
from tether.rewards import load_callable
from tether.rollout import score_tokens
from tether.sampling import Sampling
from tether.trainers.common import save_model
from tether.trainers.ppo import PPOTrainer

FAMILIES = ["gpt2", "llama", "qwen2"]
PROMPTS = ["1+2=", "13+4=", "7+7=", "20+9=", "3+30=", "11+11=", "2+5=", "9+18="]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on arithmetic strings: EOS and UNK, and deliberately no pad token."""
    corpus = [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(
        vocab_size=48, special_tokens=["<eos>", "<unk>"], show_progress=False, initial_alphabet=list("0123456789+=")
    )
    backend.train_from_iterator(corpus, trainer)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    assert tok.pad_token is None
    return tok


def family_config(family: str, vocab_size: int, eos_id: int):
    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id)
    if family == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common
        )
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **common,
    )
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=False, **llama_like)
    return Qwen2Config(tie_word_embeddings=True, **llama_like)


def save_family(root, family: str, tok, vocab_size: int) -> tuple[str, str]:
    """Policy (causal LM) and reward model (sequence classification, 1 label) folders for one family."""
    torch.manual_seed(0)
    config = family_config(family, vocab_size, tok.eos_token_id)
    policy_dir, rm_dir = root / "policy", root / "reward"
    AutoModelForCausalLM.from_config(config).save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    torch.manual_seed(1)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    return str(policy_dir), str(rm_dir)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, policy folder, reward-model folder).

    As in released checkpoints (Qwen2 pads its vocabulary to a multiple of 128), the embedding matrix has a few more
    rows than the tokenizer has tokens. ``test_pad_id_past_the_last_embedding_row`` covers the exact-size case.
    """
    tok = bpe_tokenizer()
    vocab_size = -(-(len(tok) + 1) // 8) * 8
    return (request.param, *save_family(tmp_path_factory.mktemp(request.param), request.param, tok, vocab_size))


def ppo_config(policy_dir: str, rm_dir: str, run_dir, value_model: str = "head", lr: float = 1e-3) -> RunConfig:
    config = RunConfig(output_dir=str(run_dir))
    config.model.policy, config.model.reward_model = policy_dir, rm_dir
    config.model.value_model, config.model.device = value_model, "cpu"
    config.ppo.steps, config.ppo.rollout_batch_size, config.ppo.mini_batch_size = 2, 8, 4
    config.ppo.ppo_epochs, config.ppo.lr = 1, lr
    config.sampling.max_new_tokens = 8
    config.logging.print_every = 0
    return config.finalize()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(p, before[name]) for name, p in module.named_parameters())


def test_tokenizer_gets_a_separate_pad(family):
    _, policy_dir, _ = family
    tok = load_tokenizer(policy_dir)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_padding_invariance(family):
    """Left-padded batch logits (and reward scores) equal those of each sequence alone."""
    _, policy_dir, rm_dir = family
    tok = load_tokenizer(policy_dir)
    policy, rm = load_causal_lm(policy_dir).eval(), load_reward_model(rm_dir).eval()
    prompts = [tok(p)["input_ids"] for p in ["1+2=", "13+24=", "9="]]
    responses = [tok(r)["input_ids"] + [tok.eos_token_id] for r in ["34", "1+1", "7"]]
    width = max(len(r) for r in responses)
    responses = [r + [tok.pad_token_id] * (width - len(r)) for r in responses]  # right-padded responses
    prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
    response_ids = torch.tensor(responses)
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, (response_ids != tok.pad_token_id).long()], 1)
    assert (ids == tok.pad_token_id).any()
    with torch.no_grad():
        batched = response_logits(policy, ids, mask, prompt_ids.shape[1], 0.7, tok.eos_token_id)
        batched_scores = sequence_scores(rm, ids, mask, tok.eos_token_id)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            n = int((torch.tensor(response) != tok.pad_token_id).sum())
            alone = torch.tensor([prompt + response[:n]])
            logits = response_logits(policy, alone, torch.ones_like(alone), len(prompt), 0.7, tok.eos_token_id)
            torch.testing.assert_close(batched[i, :n], logits[0], atol=1e-5, rtol=0)
            score = sequence_scores(rm, alone, torch.ones_like(alone), tok.eos_token_id)
            torch.testing.assert_close(batched_scores[i : i + 1], score, atol=1e-5, rtol=0)


def cut_and_whole(model, ids, mask, fill_id: int, first: int) -> list[int]:
    """Asserts that hidden states from ``first`` on and the parameters' gradients are the whole forward's; returns
    the sequence lengths the last feed-forward's first sub-module saw (whole run, then cut run)."""
    seen, ff = [], last_feed_forward(model)
    next(ff.children()).register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))  # fc, gate
    weights = torch.randn(ids.shape[0], ids.shape[1] - first, model.config.hidden_size)
    runs = []
    for start in (0, first):
        model.zero_grad(set_to_none=True)
        hidden = hidden_states(model, ids, mask, fill_id, start)[:, first - start :]
        (hidden * weights).sum().backward()
        runs.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert "forward" not in vars(ff)
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-6, rtol=1e-5)
    assert runs[1][1].keys() == runs[0][1].keys()
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    return seen


def test_last_feed_forward_runs_from_the_first_position_read(family):
    """Hidden states, their gradients and reward scores from position ``first`` on are those of the whole forward,
    while the last layer's feed-forward sees only those positions (and is itself again afterwards)."""
    _, policy_dir, rm_dir = family
    tok = load_tokenizer(policy_dir)
    policy, rm = load_causal_lm(policy_dir), load_reward_model(rm_dir).eval()
    prompt_ids, prompt_mask = left_pad([tok(p)["input_ids"] for p in ["1+2=", "13+24=", "9="]], tok.pad_token_id)
    response_ids = torch.tensor([tok("34")["input_ids"][:2] + [tok.eos_token_id, tok.pad_token_id]] * 3)
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, (response_ids != tok.pad_token_id).long()], 1)
    first = prompt_ids.shape[1] - 1
    assert cut_and_whole(policy, ids, mask, tok.eos_token_id, first) == [ids.shape[1], ids.shape[1] - first]
    with torch.no_grad():
        whole = sequence_scores(rm, ids, mask, tok.eos_token_id)
        torch.testing.assert_close(sequence_scores(rm, ids, mask, tok.eos_token_id, first), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("config", "cut"),
    [
        (
            GPTNeoXConfig(
                vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
            ),
            True,
        ),
        (
            PhiConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
            True,
        ),
        (BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2), False),
    ],
    ids=["gpt-neox", "phi", "bloom"],
)
def test_last_feed_forward_on_other_layouts(config, cut):
    """Attention and feed-forward side by side (GPT-NeoX, Phi) are cut too; Bloom's feed-forward, which takes the
    residual as a second argument, runs whole. Either way the result is the whole forward's."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids, mask = torch.randint(1, 64, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    assert cut_and_whole(model, ids, mask, 1, 4) == [9, 5 if cut else 9]


def test_last_feed_forward_left_whole_where_compiled_or_recomputed(family):
    """A trunk under torch.compile (model.compile) would compile a graph per prompt length, and gradient
    checkpointing recomputes each layer in the backward pass with its whole input: no skipping in either."""
    _, policy_dir, _ = family
    policy = load_causal_lm(policy_dir)
    assert last_feed_forward(policy) is not None
    with compiled_trunks([policy], {}):
        assert last_feed_forward(policy) is None
    assert last_feed_forward(policy) is not None
    enable_gradient_checkpointing(True, policy)
    assert last_feed_forward(policy) is None


def test_compiled_trunks_compile_each_layer_or_a_trunk_whole():
    """model.compile compiles a trunk's decoder layers one by one where it keeps them in one ModuleList (each
    family's), and a trunk of another layout whole; outside the block every forward is the class's own again."""

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Body()

        @property
        def base_model(self):
            return self.body

    other, gpt2 = Model(), AutoModelForCausalLM.from_config(family_config("gpt2", 48, 0))
    cache = {}
    with compiled_trunks([other, None, gpt2], cache):
        assert set(cache) == {other.body, *gpt2.transformer.h} and len(gpt2.transformer.h) == 2
        assert all("forward" in vars(m) for m in cache) and "forward" not in vars(gpt2.transformer)
    assert not any("forward" in vars(m) for m in cache)


@pytest.mark.parametrize("value_model", ["head", "separate"])
def test_ppo_from_config(family, value_model, tmp_path):
    """Two PPO iterations from the folders: ratio 1 first, trained params move, frozen ones don't, saved policy
    reloads with plain AutoModelForCausalLM."""
    name, policy_dir, rm_dir = family
    torch.manual_seed(0)
    trainer = PPOTrainer.from_config(ppo_config(policy_dir, rm_dir, tmp_path, value_model))
    ac = trainer.actor_critic
    value_module = ac.value_head if value_model == "head" else ac.critic
    assert (ac.critic is None) == (value_model == "head")
    before = {
        "policy": snapshot(ac.policy),
        "value": snapshot(value_module),
        "ref": snapshot(trainer.reference),
        "rm": snapshot(trainer.scorer.model),
    }
    first_stats = []
    micro_step = trainer.micro_step

    def spy(*args):
        stats = micro_step(*args)
        first_stats.append(stats)
        return stats

    trainer.micro_step = spy
    stats = trainer.train(PROMPTS, tmp_path)
    assert trainer.iteration == 2 and stats["response/length"] > 0
    # the first minibatch of the first update sees the rollout's own policy: ratio exactly 1 (ppo_details #9)
    assert abs(first_stats[0]["ppo/ratio_max"] - 1) < 1e-5 and abs(first_stats[0]["ppo/ratio_min"] - 1) < 1e-5
    assert changed(ac.policy, before["policy"]), f"{name}: policy did not train"
    assert changed(value_module, before["value"]), f"{name}: value model did not train"
    assert not changed(trainer.reference, before["ref"]), f"{name}: reference moved"
    assert not changed(trainer.scorer.model, before["rm"]), f"{name}: reward model moved"

    path = save_model(ac.policy, trainer.tokenizer, tmp_path / "model")
    assert (path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(reloaded) is type(ac.policy)
    ids = torch.tensor([trainer.tokenizer("12+3=15")["input_ids"]])
    ac.policy.eval()
    with torch.no_grad():
        plain = reloaded(ids).logits  # transformers' own GELU: the same function to float rounding
        torch.testing.assert_close(plain, ac.policy(ids).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(fuse_activations(reloaded)(ids).logits, ac.policy(ids).logits)  # the very weights
    assert load_tokenizer(str(path)).pad_token_id == trainer.tokenizer.pad_token_id


@pytest.mark.skipif(not prepack.packs(torch.bfloat16), reason="oneDNN has no bf16 on this CPU")
def test_bf16_sampler_records_what_the_update_recomputes(family, tmp_path):
    """model.dtype=bfloat16 on the CPU: the sampler (bf16-packed weights; the lean decoder for Llama and Qwen2) records
    old log-probs that the update's bf16 forward over the whole sequence gives back to bf16 rounding (lr 0)."""
    name, policy_dir, rm_dir = family
    config = ppo_config(policy_dir, rm_dir, tmp_path, lr=0.0)
    config.model.dtype, config.ppo.steps = "bfloat16", 1
    trainer = PPOTrainer.from_config(config.finalize())
    built = []
    lean = sampling.lean_decoder
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "lean_decoder", lambda *a: built.append(lean(*a)) or built[-1])
        stats = trainer.train(PROMPTS, tmp_path)
    if name == "gpt2":  # GPT-2 samples through transformers' forward, its linear layers packed in bf16
        assert built == [None]
    else:
        assert len(built) == 1 and built[0].head.weight.dtype == torch.bfloat16
    assert 0.99 < stats["ppo/ratio_min"] <= stats["ppo/ratio_max"] < 1.01, name  # measured: within 8e-4
    assert stats["ppo/approx_kl"] < 1e-6


def test_pad_id_past_the_last_embedding_row(tmp_path):
    """Model vocab == tokenizer vocab: the added pad id has no embedding row. Forward passes replace it."""
    tok = bpe_tokenizer()
    policy_dir, rm_dir = save_family(tmp_path, "llama", tok, len(tok))
    tok = load_tokenizer(policy_dir)
    policy, rm = load_causal_lm(policy_dir).eval(), load_reward_model(rm_dir).eval()
    assert tok.pad_token_id >= policy.get_output_embeddings().out_features
    prompt_ids, prompt_mask = left_pad([tok("1+2=")["input_ids"], tok("3=")["input_ids"]], tok.pad_token_id)
    response_ids = torch.tensor([[5, tok.eos_token_id, tok.pad_token_id], [6, 7, tok.eos_token_id]])
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, (response_ids != tok.pad_token_id).long()], 1)
    with torch.no_grad():
        assert torch.isfinite(response_logits(policy, ids, mask, prompt_ids.shape[1], 1.0, tok.eos_token_id)).all()
        assert torch.isfinite(sequence_scores(rm, ids, mask, tok.eos_token_id)).all()


def test_score_tokens_with_pad_id_past_the_last_embedding_row(tmp_path):
    tok = bpe_tokenizer()
    policy_dir, _ = save_family(tmp_path, "gpt2", tok, len(tok))
    tok = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir)
    prompt_ids, prompt_mask = left_pad([tok("1+2=")["input_ids"], tok("3=")["input_ids"]], tok.pad_token_id)
    response_ids = torch.tensor([[5, tok.eos_token_id, tok.pad_token_id], [6, 7, tok.eos_token_id]])
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, (response_ids != tok.pad_token_id).long()], 1)
    out = score_tokens(
        ActorCritic(policy),
        reference_copy(policy),
        ids,
        mask,
        prompt_ids.shape[1],
        response_ids,
        1.0,
        tok.eos_token_id,
        chunk=2,
    )
    assert torch.isfinite(out["logprobs"]).all()


def test_the_example_sampler_takes_prompts_padded_past_the_last_embedding_row(tmp_path):
    """An engine's client gets left-padded prompts whose pad id may have no embedding row: the example
    (examples/engine_sampler.py) draws from the real tokens only."""
    tok = bpe_tokenizer()
    policy_dir, _ = save_family(tmp_path, "llama", tok, len(tok))
    tok = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir).eval()
    vocab = policy.get_output_embeddings().out_features
    assert tok.pad_token_id >= vocab
    example = Path(__file__).resolve().parent.parent / "examples" / "engine_sampler.py"
    sampler = load_callable(f"{example}:GenerateSampler", "the example", "Class")()
    rows = [tok("12+34*5-6=")["input_ids"], tok("3")["input_ids"]]
    prompt_ids, prompt_mask = left_pad(rows, tok.pad_token_id)
    assert (prompt_ids == tok.pad_token_id).any()
    sampled = sampler(policy, prompt_ids, prompt_mask, Sampling(4), [tok.eos_token_id], None, nullcontext, True)
    assert sampled.tokens.shape[0] == 2 and 1 <= sampled.tokens.shape[1] <= 4
    assert ((sampled.tokens >= 0) & (sampled.tokens < vocab)).all()


@pytest.mark.parametrize(
    "family",
    [
        ("gemma2", dict(final_logit_softcapping=0.5, head_dim=16, num_key_value_heads=1)),
        ("cohere", dict(logit_scale=0.25, num_key_value_heads=1)),
        ("granite", dict(logits_scaling=4.0, num_key_value_heads=1)),
        ("hyperclovax", dict(logits_scaling=0.25, num_key_value_heads=1)),
        ("minicpm3", dict(dim_model_base=8, num_key_value_heads=2)),
        ("falcon_h1", dict(lm_head_multiplier=0.25, num_key_value_heads=1)),
    ],
    ids=["gemma2-softcap", "cohere-scale", "granite-scaling", "hyperclovax-scaling", "minicpm3-scaling", "falcon-h1"],
)
def test_logits_take_the_step_a_family_takes_after_its_head(family):
    """Gemma 2 caps its logits after the LM head; Cohere, HyperCLOVA X and Falcon-H1 multiply them, Granite and
    MiniCPM3 divide them (``logits_scaling`` means the one or the other by family): the update's log-probs and the
    sampler's are those of the model's own forward, and the first update's ratio is 1."""
    kind, extra = family
    config = AutoConfig.for_model(
        kind, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # logits large enough that the family's step matters
        model.get_output_embeddings().weight.mul_(40)
    ids, mask = torch.randint(3, 64, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits[:, 5:-1]
        head = model.get_output_embeddings()(trunk(model)(input_ids=ids, attention_mask=mask).last_hidden_state)
        assert not torch.allclose(head[:, 5:-1], own, atol=1e-2)  # the step is there to take
        assert check_logits(model, "policy") is model
        torch.testing.assert_close(response_logits(model, ids, mask, 6, 0.7, 2), own / 0.7, atol=1e-5, rtol=1e-5)
        prompts, prompt_mask = ids[:, :6], mask[:, :6]
        keys = sampling.row_keys(0, 0, range(3))
        drawn = sampling.sample(model, prompts, prompt_mask, Sampling(4, temperature=0.7), [2], keys, record=True)
        response = drawn.tokens
        whole = torch.cat([prompts, response], 1)
        whole_mask = torch.cat([prompt_mask, torch.ones_like(response)], 1)
        again = logprobs_from_logits(response_logits(model, whole, whole_mask, 6, 0.7, 2), response)
    live = drawn.logprobs != 0
    torch.testing.assert_close(drawn.logprobs[live], again[live], atol=1e-5, rtol=1e-5)


def test_a_composite_config_scales_then_caps_from_its_text_config():
    """A model whose config nests its text config (as vision-language models do) takes the step its text config
    names; a scale and a cap together are taken in that order (Muse's forward: cap * tanh(logits * m / cap))."""

    class Text:
        model_type, output_multiplier, final_logit_softcapping = "muse_spark_text", 2.0, 3.0

    class Outer:
        model_type = "muse_spark"

        def get_text_config(self):
            return Text()

    model = torch.nn.Module()
    model.config = Outer()
    logits = torch.tensor([[-4.0, 0.0, 1.5]])
    expected = torch.tensor([[3.0 * math.tanh(-8.0 / 3.0), 0.0, 3.0 * math.tanh(1.0)]])
    torch.testing.assert_close(family_logits(model, logits), expected)
    Text.model_type, Text.output_multiplier, Text.final_logit_softcapping = "hyperclovax", 1, None
    Text.logits_scaling = 4.0  # HyperCLOVA X multiplies by it where Granite divides
    torch.testing.assert_close(family_logits(model, logits), logits * 4.0)
    plain = torch.nn.Module()
    plain.config = AutoConfig.for_model("llama")
    assert family_logits(plain, logits) is logits


def test_a_model_whose_head_tether_cannot_run_is_refused_in_one_line():
    """ELECTRA's generator projects its hidden state down before the output embedding: tether's reading of the
    logits fails, and the error says so in one line instead of a shape mismatch mid-rollout."""
    config = AutoConfig.for_model(
        "electra", vocab_size=64, hidden_size=32, embedding_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, is_decoder=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(TetherError) as caught:
        check_logits(model, "policy 'electra'")
    message = str(caught.value)
    assert message.startswith("policy 'electra': ElectraForCausalLM is not supported for sampling and PPO: its logits")
    assert "\n" not in message


def test_llama4_text_reads_its_trunk_and_samples_as_it_trains():
    """Llama 4's text model names its trunk ``language_model`` but keeps it at ``model``: the trunk is found, its
    logits read as its forward's, and its router (an nn.Linear returning two tensors) is left out of the packed
    sampling path, so the sampler's log-probs are the update's."""
    config = AutoConfig.for_model(
        "llama4_text", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert type(trunk(model)).__name__ == "Llama4TextModel"
    assert check_logits(model, "policy") is model
    ids, mask = torch.randint(3, 64, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits[:, 5:-1]
        torch.testing.assert_close(response_logits(model, ids, mask, 6, 1.0, 2), own, atol=1e-5, rtol=1e-5)
        prompts, prompt_mask = ids[:, :6], mask[:, :6]
        drawn = sampling.sample(
            model, prompts, prompt_mask, Sampling(4), [2], sampling.row_keys(0, 0, range(3)), record=True
        )
        whole = torch.cat([prompts, drawn.tokens], 1)
        whole_mask = torch.cat([prompt_mask, torch.ones_like(drawn.tokens)], 1)
        again = logprobs_from_logits(response_logits(model, whole, whole_mask, 6, 1.0, 2), drawn.tokens)
    live = drawn.logprobs != 0
    torch.testing.assert_close(drawn.logprobs[live], again[live], atol=1e-5, rtol=1e-5)


def test_a_critic_or_reward_model_from_an_encoder_is_refused_in_one_line(tmp_path):
    """Reward-model training and a separate critic start from a folder's trunk with a new 'score' head; a BERT
    folder has none to draw: the error names the folder and the class."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(TetherError) as caught:
        new_scalar_model(str(tmp_path / "bert"))
    assert str(caught.value).startswith(f"model '{tmp_path / 'bert'}': BertForSequenceClassification has no linear")


def test_a_critic_starts_from_a_classifier_of_other_labels(tmp_path):
    """A sequence classifier of two labels as a critic's or reward model's start: its trunk is read, and its head,
    of the wrong size, is drawn anew with one output (not a size-mismatch traceback)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    source = LlamaForSequenceClassification(config)
    source.save_pretrained(tmp_path / "classifier")
    model = new_scalar_model(str(tmp_path / "classifier"))
    assert model.score.weight.shape == (1, 32)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, source.model.layers[0].mlp.up_proj.weight)
