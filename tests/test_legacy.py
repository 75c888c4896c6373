"""The legacy TRL API (tether.legacy): config mapping, value-head model, generate, step, the tutorial example."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tether
from tether.errors import GuardStop, TetherError
from tether.legacy import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

LEGACY_KEYS = [
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "ppo/mean_non_score_reward",
    "ppo/mean_scores",
    "ppo/std_scores",
    "tokens/queries_len_mean",
    "tokens/queries_len_std",
    "tokens/responses_len_mean",
    "tokens/responses_len_std",
    "ppo/loss/policy",
    "ppo/loss/value",
    "ppo/loss/total",
    "ppo/policy/entropy",
    "ppo/policy/approxkl",
    "ppo/policy/clipfrac",
    "ppo/policy/advantages_mean",
    "ppo/returns/mean",
    "ppo/returns/var",
    "ppo/val/error",
    "ppo/val/clipfrac",
    "ppo/val/mean",
    "ppo/val/var_explained",
    "ppo/learning_rate",
    "time/ppo/forward_pass",
    "time/ppo/compute_rewards",
    "time/ppo/compute_advantages",
    "time/ppo/optimize_step",
    "time/ppo/calc_stats",
    "time/ppo/total",
]
ARRAY_KEYS = [
    "objective/kl_dist",
    "objective/logprobs",
    "objective/ref_logprobs",
    "tokens/queries_dist",
    "tokens/responses_dist",
    "ppo/policy/advantages",
]


def make_trainer(policy_dir, tokenizer, device="cpu", head=None, **overrides):
    """A trainer on the tiny policy; ``head`` are the value head's from_pretrained keywords."""
    kwargs = dict(batch_size=4, mini_batch_size=2, learning_rate=1e-3, init_kl_coef=0.01, seed=0)
    kwargs["accelerator_kwargs"] = {"cpu": True} if device == "cpu" else {}  # as accelerate: cuda unless cpu=True
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, **(head or {}))
    ref = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    return PPOTrainer(config=PPOConfig(**kwargs), model=model, ref_model=ref, tokenizer=tokenizer)


def encode(tokenizer, texts):
    return [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]


# ---- PPOConfig -------------------------------------------------------------------------------------------------
def test_config_has_trl_legacy_defaults():
    c = PPOConfig()
    assert (c.learning_rate, c.batch_size, c.mini_batch_size, c.ppo_epochs) == (1.41e-5, 128, 128, 4)
    assert (c.init_kl_coef, c.adap_kl_ctrl, c.target, c.horizon, c.kl_penalty) == (0.2, True, 6.0, 10000.0, "kl")
    assert (c.gamma, c.lam, c.cliprange, c.cliprange_value, c.vf_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert (c.max_grad_norm, c.target_kl, c.steps, c.seed, c.gradient_accumulation_steps) == (None, 1.0, 20000, 0, 1)
    assert (c.use_score_scaling, c.use_score_norm, c.score_clip, c.whiten_rewards) == (False, False, None, False)
    assert c.model_name == "gpt2" and c.ratio_threshold == 10.0 and c.early_stopping is False


def test_tutorial_config_maps_to_run_config():
    c = PPOConfig(
        model_name="sft_model",
        learning_rate=1.4e-5,
        batch_size=256,
        mini_batch_size=64,
        ppo_epochs=4,
        cliprange=0.2,
        vf_coef=0.5,
        init_kl_coef=0.01,
        target_kl=6.0,
        adap_kl_ctrl=True,
        cliprange_value=0.2,
        max_grad_norm=1.0,
    )
    run = c.to_run_config()
    p = run.ppo
    assert run.model.policy == "sft_model" and run.seed == 0
    assert (p.rollout_batch_size, p.mini_batch_size, p.micro_batch_size, p.ppo_epochs) == (256, 64, 64, 4)
    assert (p.lr, p.lr_schedule, p.adam_eps) == (1.4e-5, "constant", 1e-8)
    assert (p.clip_range, p.value_clip_range, p.vf_coef, p.max_grad_norm) == (0.2, 0.2, 0.5, 1.0)
    assert (p.kl_coef, p.kl_control, p.kl_target, p.kl_horizon, p.kl_estimator) == (
        0.01,
        "adaptive",
        6.0,
        10000.0,
        "k1",
    )
    assert (p.gamma, p.gae_lambda, p.whiten_advantages, p.whiten_rewards) == (1.0, 0.95, True, False)
    assert (p.score_norm, p.score_clip, p.length_penalty, p.missing_eos_penalty) == ("none", None, 0.0, None)
    assert p.steps == math.ceil(20000 / 256) == 79
    assert run.sampling.temperature == 1.0


def test_config_mapping_details():
    p = (
        PPOConfig(
            batch_size=16,
            mini_batch_size=4,
            gradient_accumulation_steps=2,
            kl_penalty="mse",
            use_score_scaling=True,
            use_score_norm=True,
            score_clip=3.0,
            lam=0.9,
            target=2.0,
            target_kl=0.5,
            adap_kl_ctrl=False,
            whiten_rewards=True,
            cliprange_value=0.1,
        )
        .to_run_config()
        .ppo
    )
    assert (p.rollout_batch_size, p.mini_batch_size, p.micro_batch_size) == (16, 8, 4)
    assert (p.kl_estimator, p.score_norm, p.score_clip, p.gae_lambda) == ("mse", "norm", 3.0, 0.9)
    assert (p.kl_target, p.kl_control, p.whiten_rewards, p.value_clip_range) == (2.0, "fixed", True, 0.1)
    assert PPOConfig(use_score_scaling=True, kl_penalty="abs").to_run_config().ppo.score_norm == "scale"
    assert PPOConfig(kl_penalty="abs").to_run_config().ppo.kl_estimator == "abs"
    # as in TRL, target_kl is only early_stopping's threshold; the adaptive controller's target is `target`
    assert PPOConfig().kl_target == 6.0 and PPOConfig(target_kl=3.0).kl_target == 6.0


def test_config_rejects_bad_arguments():
    with pytest.raises(TypeError, match="learnig_rate.*learning_rate") as info:
        PPOConfig(learnig_rate=1e-5)
    assert isinstance(info.value, TetherError) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="kl_penalty") as info:  # a ValueError, as TRL raised
        PPOConfig(kl_penalty="fulll")
    assert isinstance(info.value, TetherError)
    with pytest.raises(ValueError, match="batch_size=10 must be a multiple"):
        PPOConfig(batch_size=10, mini_batch_size=4)
    with pytest.warns(UserWarning, match="log_with, compare_steps accepted but has no effect"):
        PPOConfig(log_with="wandb", compare_steps=5)


def test_lazy_exports():
    assert tether.PPOConfig is PPOConfig and tether.PPOTrainer is PPOTrainer
    assert tether.__version__
    code = "import sys, tether; assert 'torch' not in sys.modules and 'tether.legacy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        tether.NoSuchThing  # noqa: B018


# ---- AutoModelForCausalLMWithValueHead -------------------------------------------------------------------------
def test_value_head_model_forward_and_round_trip(policy_dir, tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, v_head_init_strategy="zero").eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    logits, loss, values = model(ids, attention_mask=torch.ones_like(ids))
    vocab = model.pretrained_model.config.vocab_size
    assert logits.shape == (2, 4, vocab) and logits.dtype == torch.float32 and loss is None
    assert values.shape == (2, 4) and torch.all(values == 0)  # tether's "zero" strategy: V = 0 at the start
    torch.nn.init.normal_(model.v_head.summary.weight)
    model.save_pretrained(tmp_path / "saved")
    files = {f.name for f in (tmp_path / "saved").iterdir()}
    assert {"model.safetensors", "config.json"} <= files  # TRL's layout: the head inside model.safetensors
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    again = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(again.v_head.summary.weight, model.v_head.summary.weight)
    logits2, _, values2 = again(ids)
    assert torch.allclose(logits2, logits) and torch.allclose(values2, model(ids)[2])
    assert model.generate(ids[:1], max_new_tokens=2, do_sample=False).shape == (1, 6)
    with pytest.raises(TetherError, match="no such folder"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "missing")


# ---- PPOTrainer.generate ---------------------------------------------------------------------------------------
def test_generate_one_response_per_query_stopping_at_eos(policy_dir, user_tokenizer, device):
    trainer = make_trainer(policy_dir, user_tokenizer, device)
    assert trainer.device.type == device and trainer.model.v_head.weight.device.type == device
    eos = user_tokenizer.eos_token_id
    head = trainer.model.pretrained_model.get_output_embeddings()
    hook = head.register_forward_hook(
        lambda m, i, out: out + 4.0 * torch.nn.functional.one_hot(torch.tensor(eos, device=out.device), out.shape[-1])
    )  # make EOS likely, so responses end at different lengths
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9=", "12+1=", "7*7=", "5-1="])
    full = trainer.generate(queries, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.0)
    assert len(full) == len(queries)
    lengths = []
    for q, r in zip(queries, full):
        assert torch.equal(r[: len(q)], q)  # return_prompt=True (TRL's default)
        gen = r[len(q) :]
        assert 1 <= len(gen) <= 6
        assert (gen[:-1] != eos).all()  # nothing after the first EOS
        lengths.append(len(gen))
    assert any(r[-1] == eos for r in full) and len(set(lengths)) > 1
    hook.remove()
    only = trainer.generate(queries[:2], max_new_tokens=3, return_prompt=False, do_sample=False)
    assert all(1 <= len(r) <= 3 for r in only)
    padded = user_tokenizer(["1+2=", "12+13="], return_tensors="pt", padding=True).input_ids  # pad == eos
    out = trainer.generate(padded, max_new_tokens=3)
    assert torch.equal(out[0][:4], torch.tensor(user_tokenizer("1+2=")["input_ids"]))
    user_tokenizer.padding_side = "right"  # right padding with pad == eos is stripped too
    padded = user_tokenizer(["1+2=", "12+13="], return_tensors="pt", padding=True).input_ids
    assert [len(r) for r in trainer.generate(padded, max_new_tokens=1)] == [5, 7]
    single = trainer.generate(queries[0], max_new_tokens=3)
    assert single.dim() == 2 and single.shape[0] == 1
    with pytest.raises(TetherError, match="repetition_penalty"):
        trainer.generate(queries, repetition_penalty=1.2)


def boost(model, token_id, amount):
    """Add ``amount`` to ``token_id``'s logit in every forward of ``model``; returns the hook handle."""
    head = model.get_output_embeddings()
    return head.register_forward_hook(
        lambda m, i, out: out + amount * torch.nn.functional.one_hot(torch.tensor(token_id), out.shape[-1])
    )


def test_generate_accepts_trl_classic_generation_kwargs(policy_dir, user_tokenizer):
    trainer = make_trainer(policy_dir, user_tokenizer)
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9=", "12+1=", "7*7="])
    generation_kwargs = {  # TRL's gpt2-sentiment example, verbatim
        "min_length": -1,
        "top_k": 0.0,
        "top_p": 1.0,
        "do_sample": True,
        "pad_token_id": user_tokenizer.eos_token_id,
        "max_new_tokens": 32,
    }
    drawn = []

    def length_sampler():
        drawn.append(len(drawn) + 2)
        return drawn[-1]

    response, ref_response = trainer.generate(
        queries,
        return_prompt=False,
        length_sampler=length_sampler,
        generate_ref_response=True,
        batch_size=16,
        **generation_kwargs,
    )
    assert drawn == [2, 3]  # one draw per batch of 16, for the policy and then the reference
    assert len(response) == len(ref_response) == len(queries)
    assert all(1 <= len(r) <= 2 for r in response) and all(1 <= len(r) <= 3 for r in ref_response)
    ignored = dict(use_cache=True, synced_gpus=False, output_scores=True, pad_to_multiple_of=8, remove_padding=True)
    no_ops = dict(num_beams=1, num_return_sequences=1, repetition_penalty=1.0, no_repeat_ngram_size=0)
    out = trainer.generate(queries, max_new_tokens=3, return_dict_in_generate=False, **ignored, **no_ops)
    assert all(torch.equal(r[: len(q)], q) and len(r) <= len(q) + 3 for q, r in zip(queries, out))


def test_generate_top_k_as_float(policy_dir, user_tokenizer):
    trainer = make_trainer(policy_dir, user_tokenizer)
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9="])
    assert len(trainer.generate(queries, top_k=0.0, max_new_tokens=4)) == 3  # 0.0: off, as in TRL's examples
    greedy = trainer.generate(queries, do_sample=False, max_new_tokens=6)
    assert all(torch.equal(a, b) for a, b in zip(trainer.generate(queries, top_k=1.0, max_new_tokens=6), greedy))


def test_generate_min_new_tokens_and_min_length(policy_dir, user_tokenizer):
    trainer = make_trainer(policy_dir, user_tokenizer)
    eos = user_tokenizer.eos_token_id
    boost(trainer.model.pretrained_model, eos, 30.0)  # EOS is sampled whenever it is allowed
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "12+1=", "7*7="])
    assert all(r.tolist() == [eos] for r in trainer.generate(queries, max_new_tokens=8, return_prompt=False))
    out = trainer.generate(queries, max_new_tokens=8, min_new_tokens=3, return_prompt=False)
    assert all(len(r) == 4 and r[-1] == eos and (r[:-1] != eos).all() for r in out)
    # min_length counts the left-padded prompt too (as HF's did in TRL): batches 5 wide -> 9 - 5 = 4 new tokens
    out = trainer.generate(queries, max_new_tokens=8, min_length=9, batch_size=4, return_prompt=False)
    assert [len(r) for r in out] == [5] * 4
    out = trainer.generate(queries, max_new_tokens=8, min_length=9, batch_size=1, return_prompt=False)
    assert [len(r) for r in out] == [6, 6, 5, 6]  # each query alone: 9 - its own length


def test_generate_stops_at_any_eos_token_id(policy_dir, user_tokenizer):
    trainer = make_trainer(policy_dir, user_tokenizer)
    eos, a = user_tokenizer.eos_token_id, user_tokenizer.convert_tokens_to_ids("a")
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9="])
    hook = boost(trainer.model.pretrained_model, a, 30.0)
    assert all(len(r) == 6 for r in trainer.generate(queries, max_new_tokens=6, return_prompt=False))
    for stop in ([eos, a], a):
        assert all(r.tolist() == [a] for r in trainer.generate(queries, eos_token_id=stop, return_prompt=False))
    hook.remove()
    boost(trainer.model.pretrained_model, eos, 30.0)  # the tokenizer's EOS still stops (TRL cut responses at it)
    assert all(r.tolist() == [eos] for r in trainer.generate(queries, eos_token_id=a, return_prompt=False))


def test_generate_remove_padding_false_keeps_the_batch_padding(policy_dir, user_tokenizer):
    trainer = make_trainer(policy_dir, user_tokenizer)
    eos = user_tokenizer.eos_token_id
    boost(trainer.model.pretrained_model, eos, 3.0)  # responses end at different lengths
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9=", "12+1=", "7*7=", "5-1="])
    torch.manual_seed(0)
    kept = trainer.generate(
        queries, batch_size=6, max_new_tokens=8, remove_padding=False, pad_token_id=5, return_prompt=False
    )
    torch.manual_seed(0)
    cut = trainer.generate(queries, batch_size=6, max_new_tokens=8, return_prompt=False)
    assert len({len(r) for r in kept}) == 1 and len({len(r) for r in cut}) > 1  # one batch of 6, padded to one width
    for k, c in zip(kept, cut):
        assert torch.equal(k[: len(c)], c) and (k[len(c) :] == 5).all()


def test_generate_ref_response_samples_the_reference(policy_dir, user_tokenizer):
    trainer = make_trainer(policy_dir, user_tokenizer)
    eos = user_tokenizer.eos_token_id
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9=", "12+1=", "7*7="])
    response, ref_response = trainer.generate(queries, do_sample=False, max_new_tokens=6, generate_ref_response=True)
    assert all(torch.equal(a, b) for a, b in zip(response, ref_response))  # same weights, greedy: same responses
    boost(trainer.core.reference, eos, 30.0)  # only the reference now ends at once
    response, ref_response = trainer.generate(queries, max_new_tokens=6, generate_ref_response=True)
    assert all(r[len(q) :].tolist() == [eos] for q, r in zip(queries, ref_response))
    assert any(len(r) > len(q) + 1 for q, r in zip(queries, response))
    single, single_ref = trainer.generate(queries[0], max_new_tokens=6, generate_ref_response=True)
    assert single.shape[0] == single_ref.shape[0] == 1 and single_ref[0, -1] == eos


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"num_beams": 4}, "num_beams is not supported: beam search is not sampling"),
        ({"num_return_sequences": 2}, "num_return_sequences is not supported: one response per query"),
        ({"repetition_penalty": 1.2}, "repetition_penalty is not supported: .*off-policy"),
        ({"no_repeat_ngram_size": 3}, "no_repeat_ngram_size is not supported: .*off-policy"),
        ({"return_dict_in_generate": True}, "return_dict_in_generate is not supported: .*token tensors only"),
        ({"typical_p": 0.9, "max_length": 20}, "unsupported argument.s. max_length, typical_p; supported: max_new"),
        ({"top_k": 2.5}, "top_k must be a whole number >= 0, got 2.5"),
        ({"min_new_tokens": -1}, "min_new_tokens must be a whole number >= 0"),
        ({"eos_token_id": [1, "a"]}, "eos_token_id must be a whole number"),
        ({"temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_generate_refuses_what_tether_cannot_do(policy_dir, user_tokenizer, kwargs, reason):
    trainer = make_trainer(policy_dir, user_tokenizer)
    with pytest.raises(TetherError, match=reason) as info:
        trainer.generate(encode(user_tokenizer, ["1+2="]), **kwargs)
    assert "\n" not in str(info.value)


# ---- PPOTrainer.step -------------------------------------------------------------------------------------------
def test_step_returns_legacy_stats_and_updates_model_in_place(policy_dir, user_tokenizer, device):
    trainer = make_trainer(policy_dir, user_tokenizer, device)
    vocab_before = len(user_tokenizer)
    head_before = trainer.model.v_head.weight.detach().clone()
    queries = user_tokenizer(["1+2=", "3*4=", "9-9=", "12+1="], return_tensors="pt", padding=True).input_ids
    responses = trainer.generate(queries, max_new_tokens=5)
    stats = trainer.step(queries, responses, torch.tensor([1.0, 0.0, -1.0, 0.5]))
    for key in LEGACY_KEYS:
        assert isinstance(stats[key], float) and math.isfinite(stats[key]), key
    for key in ARRAY_KEYS:
        assert key in stats
    assert stats["ppo/mean_scores"] == pytest.approx(0.125)
    assert stats["ppo/std_scores"] == pytest.approx(torch.tensor([1.0, 0.0, -1.0, 0.5]).std().item())
    assert stats["objective/kl_coef"] == pytest.approx(0.01)
    assert stats["ppo/learning_rate"] == pytest.approx(1e-3)
    assert stats["tokens/queries_len_mean"] == pytest.approx(4.25)  # the user's padding was removed
    assert "reward/score" in stats  # tether's own keys come along
    assert not torch.equal(trainer.model.v_head.weight, head_before)  # the user's value head trained in place
    assert trainer.core.actor_critic.value_head is trainer.model.v_head
    assert user_tokenizer.pad_token_id == user_tokenizer.eos_token_id and len(user_tokenizer) == vocab_before


def test_step_with_zero_lr_leaves_policy_unchanged(policy_dir, user_tokenizer, device):
    trainer = make_trainer(policy_dir, user_tokenizer, device, learning_rate=0.0, ppo_epochs=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9=", "12+1="])
    responses = trainer.generate(queries, max_new_tokens=5)
    stats = trainer.step(
        queries, responses, [torch.tensor(1.0), torch.tensor(0.0), torch.tensor(2.0), torch.tensor(-1.0)]
    )
    assert stats["ppo/policy/clipfrac"] == 0.0
    assert abs(stats["ppo/policy/approxkl"]) < 1e-6
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    # responses with or without the query give the same iteration (the model did not change)
    again = trainer.step(queries, [r[len(q) :] for q, r in zip(queries, responses)], torch.tensor([1.0, 0, 2, -1]))
    for key in ("objective/kl", "objective/entropy", "tokens/responses_len_mean", "ppo/mean_scores"):
        assert again[key] == pytest.approx(stats[key], abs=1e-6), key


def test_step_masks_after_first_eos(policy_dir, user_tokenizer, device):
    trainer = make_trainer(policy_dir, user_tokenizer, device, learning_rate=0.0)
    eos, a = user_tokenizer.eos_token_id, user_tokenizer.convert_tokens_to_ids("a")
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9=", "1+1="])
    responses = [torch.tensor([a, a, eos, a, a]), torch.tensor([a]), torch.tensor([a, eos]), torch.tensor([eos])]
    stats = trainer.step(queries, responses, torch.zeros(4))
    assert list(stats["tokens/responses_dist"]) == [3, 1, 2, 1]


def test_step_rejects_bad_inputs(policy_dir, user_tokenizer):
    trainer = make_trainer(policy_dir, user_tokenizer)
    queries = encode(user_tokenizer, ["1+2=", "3*4=", "9-9=", "1+1="])
    responses = [torch.tensor([5, 6])] * 4
    with pytest.raises(TetherError, match=r"got 3 queries, expected config.batch_size=4") as info:
        trainer.step(queries[:3], responses[:3], torch.zeros(3))
    assert "\n" not in str(info.value)
    with pytest.raises(TetherError, match="got 3 scores"):
        trainer.step(queries, responses, torch.zeros(3))
    with pytest.raises(TetherError, match=r"scores\[1\] must be a scalar"):
        trainer.step(queries, responses, [torch.tensor(0.0), torch.zeros(2), torch.tensor(0.0), torch.tensor(0.0)])
    with pytest.raises(TetherError, match=r"responses\[0\] is empty"):
        trainer.step(queries, [torch.tensor([], dtype=torch.long)] + responses[1:], torch.zeros(4))
    with pytest.raises(ValueError, match="optimizer must be a torch optimizer"):
        PPOTrainer(
            config=PPOConfig(batch_size=4, mini_batch_size=2),
            model=trainer.model,
            tokenizer=user_tokenizer,
            optimizer="adam",
        )


def fixed_batch(tokenizer):
    """Queries and responses that do not depend on sampling, so two trainers can be fed the same steps."""
    queries = encode(tokenizer, ["1+2=", "3*4=", "9-9=", "1+1="])
    a, b = tokenizer.convert_tokens_to_ids("3"), tokenizer.convert_tokens_to_ids("7")
    responses = [
        torch.tensor([a, b, tokenizer.eos_token_id]),
        torch.tensor([b]),
        torch.tensor([a, a]),
        torch.tensor([b, a]),
    ]
    return queries, responses


def without_timings(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith(("time/", "perf/")) and isinstance(v, float)}


def test_save_and_load_checkpoint_continue_exactly(policy_dir, user_tokenizer, tmp_path):
    queries, responses = fixed_batch(user_tokenizer)
    scores = [torch.tensor([1.0, 0.0, -1.0, 0.5]), torch.tensor([0.2, 0.4, -0.3, 1.0]), torch.tensor([0.0, 1, 1, 0])]
    first = make_trainer(policy_dir, user_tokenizer, init_kl_coef=0.2)
    first.step(queries, responses, scores[0])
    assert first.save_checkpoint(tmp_path / "ckpt").name == "step_000001"
    expected = [first.step(queries, responses, s) for s in scores[1:]]
    second = make_trainer(policy_dir, user_tokenizer, init_kl_coef=0.2)
    assert second.load_checkpoint(tmp_path / "ckpt") == 1
    got = [second.step(queries, responses, s) for s in scores[1:]]
    assert [without_timings(s) for s in got] == [without_timings(s) for s in expected]
    assert second.kl_ctl.value == first.kl_ctl.value
    assert all(
        torch.equal(a, b) for a, b in zip(second.model.state_dict().values(), first.model.state_dict().values())
    )
    with pytest.raises(TetherError, match="load_checkpoint: no checkpoint at"):
        second.load_checkpoint(tmp_path / "nothing")


def test_nan_score_is_replaced_and_counted(policy_dir, user_tokenizer):
    queries, responses = fixed_batch(user_tokenizer)
    stats = make_trainer(policy_dir, user_tokenizer).step(queries, responses, [1.0, float("nan"), 0.0, 2.0])
    assert stats["guard/nonfinite_scores"] == 1 and stats["ppo/mean_scores"] == pytest.approx(1.0)
    assert math.isfinite(stats["ppo/loss/total"])


@pytest.mark.parametrize("action", ["stop", "rollback"])
def test_kl_stop_restores_the_last_stable_checkpoint(policy_dir, user_tokenizer, tmp_path, action):
    queries, responses = fixed_batch(user_tokenizer)
    zero = {"v_head_init_strategy": "zero", "summary_dropout_prob": 0.0}  # the KL these fixed steps reach
    trainer = make_trainer(
        policy_dir, user_tokenizer, head=zero, learning_rate=1e-2, kl_stop=1e-3, kl_stop_action=action
    )
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.save_checkpoint(tmp_path)  # step 0: its own batch (KL 0) makes it stable
    first = trainer.step(queries, responses, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert first["guard/fired"] == 0 and first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert not torch.equal(trainer.model.v_head.weight, start["v_head.summary.weight"])
    if action == "stop":
        with pytest.raises(GuardStop, match=r"KL to the reference .* > ppo.kl_stop=0.001; restored step_000000"):
            trainer.step(queries, responses, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    else:
        with pytest.warns(UserWarning, match="restored step_000000, continuing with lr x0.5"):
            stats = trainer.step(queries, responses, torch.tensor([1.0, -1.0, 1.0, -1.0]))
        assert stats["guard/fired"] == 1 and stats["guard/rollbacks"] == 1
    assert all(torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())


def test_kl_stop_without_a_checkpoint_says_so(policy_dir, user_tokenizer):
    queries, responses = fixed_batch(user_tokenizer)
    zero = {"v_head_init_strategy": "zero", "summary_dropout_prob": 0.0}
    trainer = make_trainer(policy_dir, user_tokenizer, head=zero, learning_rate=1e-2, kl_stop=1e-3)
    trainer.step(queries, responses, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    with pytest.raises(TetherError, match=r"> ppo.kl_stop=0.001, and no checkpoint to restore$"):
        trainer.step(queries, responses, torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_dataset_gives_a_dataloader(policy_dir, user_tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    data = [{"query": f"{i}+1="} for i in range(10)]
    trainer = PPOTrainer(
        config=PPOConfig(batch_size=4, mini_batch_size=2),
        model=model,
        tokenizer=user_tokenizer,
        dataset=data,
        data_collator=lambda rows: {"query": [r["query"] for r in rows]},
    )
    batches = list(trainer.dataloader)
    assert len(batches) == 2 and all(len(b["query"]) == 4 for b in batches)


# ---- the tutorial's snippet ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tutorial_example_runs_and_score_rises(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "tutorial_trl.py"
    spec = importlib.util.spec_from_file_location("tutorial_trl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(steps=20, seed=0)
    scores = [s["ppo/mean_scores"] for s in history]
    # measured on one thread, seeds 0-7: first 5 steps 0.004-0.052, last 5 steps 0.16-0.47 (seed 0: 0.023 -> 0.466);
    # the smallest rise was 0.13
    assert len(scores) == 20 and sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.1, scores
    assert "Mean reward:" in capsys.readouterr().out


def test_from_pretrained_refuses_a_model_whose_logits_the_trainer_cannot_read(tmp_path):
    """The trainer reads log-probs from the head at the trunk's last hidden state: a BERT turned decoder (a
    transform before its output embedding) is refused at from_pretrained, a ValueError as TRL's errors are."""
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)  # fmt: skip
    BertLMHeadModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="BertLMHeadModel is not supported for sampling and PPO: its logits are not"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "bert"))
