"""TRL 0.11's documented behaviour of the legacy classes beyond its example script (issue 16)."""

import math
import warnings

import numpy as np
import pytest
import torch
from transformers import GPT2ForSequenceClassification, HfArgumentParser

from tether.algo import AdaptiveKLController
from tether.errors import TetherError
from tether.legacy import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    LegacyValueError,
    LengthSampler,
    PPOConfig,
    PPOTrainer,
    create_reference_model,
    set_seed,
)


def small_config(**overrides) -> PPOConfig:
    kwargs = dict(batch_size=4, mini_batch_size=2, learning_rate=1e-3, seed=0, accelerator_kwargs={"cpu": True})
    return PPOConfig(**{**kwargs, **overrides})


def trainer_for(policy_dir, tokenizer, ref_model=None, head=None, **overrides) -> PPOTrainer:
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, **(head or {}))
    return PPOTrainer(small_config(**overrides), model, ref_model, tokenizer)


def fixed_batch(tokenizer):
    queries = [torch.tensor(tokenizer(t)["input_ids"]) for t in ["1+2=", "3*4=", "9-9=", "1+1="]]
    a, b = tokenizer.convert_tokens_to_ids("3"), tokenizer.convert_tokens_to_ids("7")
    responses = [
        torch.tensor([a, b, tokenizer.eos_token_id]),
        torch.tensor([b]),
        torch.tensor([a, a]),
        torch.tensor([b, a]),
    ]
    return queries, responses, [torch.tensor(s) for s in (1.0, -1.0, 0.5, 0.0)]


# ---- errors and the config ----------------------------------------------------------------------------------------
def test_bad_values_raise_value_errors(policy_dir, user_tokenizer):
    for kwargs, message in [
        ({"kl_penalty": "kll"}, "kl_penalty"),
        ({"batch_size": 10, "mini_batch_size": 4}, "must be a multiple"),
        ({"ppo_epochs": 0}, "ppo_epochs must be a positive integer"),
        ({"accelerator_kwargs": '{"cpu": tru'}, "not valid JSON"),
        ({"kl_stop_action": "explode"}, "kl_stop_action"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            PPOConfig(**kwargs)
        assert isinstance(info.value, TetherError) and isinstance(info.value, LegacyValueError)
        assert "\n" not in str(info.value)
    trainer = trainer_for(policy_dir, user_tokenizer)
    queries, responses, scores = fixed_batch(user_tokenizer)
    with pytest.raises(ValueError, match="got 3 queries"):
        trainer.step(queries[:3], responses, scores)
    with pytest.raises(ValueError, match="num_beams"):
        trainer.generate(queries, num_beams=4)
    with pytest.raises(ValueError, match="model must be an AutoModelForCausalLMWithValueHead"):
        PPOTrainer(small_config(), trainer.model.pretrained_model, None, user_tokenizer)


def test_config_changed_after_construction_is_checked_again(policy_dir, user_tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    config = small_config()
    config.kl_penalty = "fulll"
    with pytest.raises(ValueError, match="kl_penalty='fulll' is not one of"):
        PPOTrainer(config, model, None, user_tokenizer)
    config.kl_penalty, config.mini_batch_size = "kl", 3
    with pytest.raises(ValueError, match=r"batch_size=4 must be a multiple of .* = 3 \* 1"):
        PPOTrainer(config, model, None, user_tokenizer)
    config.mini_batch_size = 2
    trainer = PPOTrainer(config, model, None, user_tokenizer)
    queries, responses, scores = fixed_batch(user_tokenizer)
    config.kl_penalty, config.mini_batch_size = "full", 4  # read at the next step, as TRL read them
    stats = trainer.step(queries, responses, scores)
    assert trainer.core.micro_batch_size == 4 and config.backward_batch_size == 4
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the full KL of identical models
    config.batch_size = 6
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple"):
        trainer.step(queries, responses, scores)


def test_config_parses_like_trl():
    argv = ["--accelerator_kwargs", '{"cpu": true}', "--kl_penalty", "full", "--early_stopping", "--batch_size", "8"]
    argv += ["--mini_batch_size", "4"]
    (config,) = HfArgumentParser(PPOConfig).parse_args_into_dataclasses(args=argv)
    assert config.accelerator_kwargs == {"cpu": True} and config.kl_penalty == "full" and config.early_stopping
    assert (config.batch_size, config.backward_batch_size, config.world_size, config.total_ppo_epochs) == (
        8,
        4,
        1,
        2500,
    )
    assert PPOConfig("run", 3).seed == 3 and PPOConfig("run").exp_name == "run"  # TRL's field order
    flat = PPOConfig(accelerator_kwargs={"cpu": True}).to_dict()
    assert flat["accelerator_kwargs/cpu"] is True and flat["learning_rate"] == 1.41e-5
    assert PPOConfig(dataset_num_proc=2, is_peft_model=None).dataset_num_proc == 2
    with pytest.warns(UserWarning, match="forward_batch_size is deprecated"):
        assert PPOConfig(forward_batch_size=16).mini_batch_size == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tracking-only names (as TRL's docs call them) are recorded silently
        PPOConfig(exp_name="x", reward_model="sentiment-analysis:mine", query_dataset="mine", task_name="t")


# ---- the value-head model -----------------------------------------------------------------------------------------
def test_from_pretrained_takes_trls_keywords(policy_dir):
    cls = AutoModelForCausalLMWithValueHead
    assert cls.transformers_parent_class.__name__ == "AutoModelForCausalLM"
    plain = cls.from_pretrained(
        policy_dir, torch_dtype=None, device_map=None, peft_config=None, trust_remote_code=False
    )
    assert not plain.is_peft_model and plain.pretrained_model.dtype == torch.float32
    assert cls.from_pretrained(policy_dir, torch_dtype=torch.bfloat16).pretrained_model.dtype == torch.bfloat16
    assert cls.from_pretrained(policy_dir, device_map={"": "cpu"}, attn_implementation="eager") is not None
    head = cls.from_pretrained(
        policy_dir, summary_dropout_prob=0.0, v_head_init_strategy="normal", v_head_initializer_range=1e-3
    )
    assert isinstance(head.v_head.dropout, torch.nn.Identity) and head.v_head.summary.bias.item() == 0.0
    assert head.v_head.summary.weight.abs().max() < 0.01
    set_seed(0)
    first = cls.from_pretrained(policy_dir).v_head.summary.weight.clone()
    set_seed(0)
    assert torch.equal(cls.from_pretrained(policy_dir).v_head.summary.weight, first)  # TRL's random init
    assert first.abs().sum() > 0
    for kwargs, message in [
        ({"device_map": {"transformer": 0, "lm_head": 1}}, "spreads the model over several devices"),
        ({"load_in_8bit": True}, "load_in_8bit is not supported"),
        ({"use_safetensors": False}, "safetensors weights only"),
        ({"v_head_init_strategy": "xavier"}, "v_head_init_strategy"),
        ({"reward_adapter": "rm-adapter"}, "reward_adapter is not supported"),
    ]:
        with pytest.raises(ValueError, match=message):
            cls.from_pretrained(policy_dir, **kwargs)
    classifier = GPT2ForSequenceClassification(plain.config)
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification is not a causal language model"):
        cls.from_pretrained(classifier)
    with pytest.raises(ValueError, match="encoder-decoder models are not supported"):
        AutoModelForSeq2SeqLMWithValueHead.from_pretrained(policy_dir)


def checkpointing(model) -> bool:
    """Whether activation checkpointing is on (its newer transformers name first)."""
    return getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_gradient_checkpointing_is_forwarded(policy_dir, user_tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    model.gradient_checkpointing_enable()
    assert checkpointing(model.pretrained_model)
    model.gradient_checkpointing_disable()
    assert not checkpointing(model.pretrained_model)
    trainer = trainer_for(policy_dir, user_tokenizer, gradient_checkpointing=True)
    assert checkpointing(trainer.model.pretrained_model)
    assert math.isfinite(trainer.step(*fixed_batch(user_tokenizer))["ppo/loss/total"])


# ---- PPOTrainer's arguments -----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:PPOTrainer.step. the KL to the reference is negative")
def test_user_optimizer_and_lr_scheduler(policy_dir, user_tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = PPOTrainer(small_config(), model, None, user_tokenizer, optimizer=optimizer, lr_scheduler=scheduler)
    assert trainer.optimizer is optimizer and trainer.lr_scheduler is scheduler
    batch = fixed_batch(user_tokenizer)
    lrs = [trainer.step(*batch)["ppo/learning_rate"] for _ in range(2)]
    assert lrs == pytest.approx([0.1, 0.05]) and optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    with pytest.raises(ValueError, match="lr_scheduler must schedule the optimizer given"):
        PPOTrainer(small_config(), model, None, user_tokenizer, lr_scheduler=scheduler)
    with pytest.raises(ValueError, match="lr_scheduler must be a torch"):
        PPOTrainer(small_config(), model, None, user_tokenizer, optimizer=optimizer, lr_scheduler="linear")


def test_create_reference_model_and_num_shared_layers(policy_dir, user_tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    ref = create_reference_model(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    create_reference_model(model, num_shared_layers=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "pretrained_model.transformer.wte.weight" in frozen and any(".h.0." in n for n in frozen)
    assert not any(".h.1." in n or n.startswith("v_head.") for n in frozen)
    with pytest.raises(ValueError, match="no parameter matches layer 1"):
        create_reference_model(model, num_shared_layers=1, pattern="model.blocks.{layer}")
    fresh = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    trainer = PPOTrainer(small_config(learning_rate=1e-2), fresh, None, user_tokenizer, num_shared_layers=1)
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trained for n, p in fresh.named_parameters() if ".h.0." in n)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    trainer.step(*fixed_batch(user_tokenizer))
    after = dict(fresh.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if ".h.0." in n or ".wte." in n)
    assert not all(torch.equal(before[n], after[n]) for n in before if ".h.1." in n)


def test_accelerator_offers_what_scripts_use(policy_dir, user_tokenizer):
    trainer = trainer_for(policy_dir, user_tokenizer)
    acc = trainer.accelerator
    assert acc.device == trainer.device == torch.device("cpu") and acc.num_processes == 1
    assert acc.is_main_process and acc.process_index == 0 and acc.state.deepspeed_plugin is None
    assert acc.unwrap_model(trainer.model) is trainer.model and acc.prepare(trainer.model) is trainer.model
    x = torch.arange(3)
    assert acc.gather(x) is x and acc.pad_across_processes(x) is x
    with acc.main_process_first(), acc.local_main_process_first():
        acc.wait_for_everyone()
    with pytest.raises(AttributeError, match="has no 'deepspeed_engine_wrapped': tether runs one process"):
        acc.deepspeed_engine_wrapped  # noqa: B018


# ---- step ---------------------------------------------------------------------------------------------------------
# every key TRL 0.11's docs/source/logging.mdx lists (its "tokens/responses_len_dist" is "tokens/responses_dist")
TRL_LOGGED_KEYS = """
env/reward_dist env/reward_mean env/reward_std objective/entropy objective/kl_coef objective/kl_dist
objective/kl objective/logprobs objective/ref_logprobs ppo/learning_rate ppo/loss/policy
ppo/loss/total ppo/loss/value ppo/mean_non_score_reward ppo/mean_scores ppo/policy/advantages_mean
ppo/policy/advantages ppo/policy/approxkl ppo/policy/clipfrac ppo/policy/entropy ppo/policy/policykl
ppo/policy/ratio ppo/returns/mean ppo/returns/var ppo/std_scores ppo/val/clipfrac ppo/val/error
ppo/val/mean ppo/val/var_explained ppo/val/var ppo/val/vpred tokens/queries_dist
tokens/queries_len_mean tokens/queries_len_std tokens/responses_dist tokens/responses_len_mean
tokens/responses_len_std
""".split()


def test_step_reports_trls_update_statistics(policy_dir, user_tokenizer):
    no_dropout = {"summary_dropout_prob": 0.0}  # the head's dropout (TRL's 0.1) acts in the updates only
    trainer = trainer_for(
        policy_dir, user_tokenizer, head=no_dropout, learning_rate=0.0, ppo_epochs=1, optimize_device_cache=True
    )
    batch = fixed_batch(user_tokenizer)
    stats = trainer.log_stats(trainer.step(*batch), {}, batch[2])
    assert not set(TRL_LOGGED_KEYS) - set(stats)
    assert stats["ppo/policy/policykl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["ppo/policy/approxkl"] == pytest.approx(0.0, abs=1e-9)
    ratio = stats["ppo/policy/ratio"]
    assert isinstance(ratio, np.ndarray) and ratio.shape == (3 + 1 + 2 + 2,) and np.allclose(ratio, 1.0)
    assert stats["ppo/val/vpred"] == pytest.approx(stats["ppo/val/mean"], abs=1e-5)  # no update: same values
    assert stats["ppo/val/var"] > 0 and math.isfinite(stats["ppo/val/var"])
    assert stats["tokens/responses_len_std"] == pytest.approx(torch.tensor([3.0, 1, 2, 2]).std().item())


def test_full_kl_penalty_is_the_kl_over_the_vocabulary(policy_dir, user_tokenizer):
    ref = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ref.pretrained_model.transformer.h[1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    trainer = trainer_for(policy_dir, user_tokenizer, ref_model=ref, kl_penalty="full", learning_rate=0.0)
    queries, responses, scores = fixed_batch(user_tokenizer)
    stats = trainer.step(queries, responses, scores)
    expected = []
    for q, r in zip(queries, responses):
        ids = torch.cat([q, r])[None]
        logp = torch.log_softmax(trainer.model(ids)[0][0, len(q) - 1 : -1], -1)
        ref_logp = torch.log_softmax(ref(ids)[0][0, len(q) - 1 : -1], -1)
        expected.append((logp.exp() * (logp - ref_logp)).sum().item())
    assert stats["objective/kl"] == pytest.approx(sum(expected) / 4, rel=1e-4)
    assert np.allclose(stats["objective/kl_dist"], expected, rtol=1e-4) and min(expected) > 0


def test_kl_controller_follows_the_configured_estimator(policy_dir, user_tokenizer):
    ref = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    with torch.no_grad():
        ref.pretrained_model.lm_head.weight.mul_(1.5)
    trainer = trainer_for(policy_dir, user_tokenizer, ref_model=ref, kl_penalty="abs", init_kl_coef=0.2)
    stats = trainer.step(*fixed_batch(user_tokenizer))
    expected = AdaptiveKLController(0.2, 6.0, 10000.0)
    expected.update(stats["objective/kl"], 4)
    assert stats["objective/kl"] >= abs(stats["kl/ref"]) > 0 and trainer.kl_ctl.value == pytest.approx(expected.value)


def test_early_stopping_and_ratio_threshold(policy_dir, user_tokenizer):
    batch = fixed_batch(user_tokenizer)
    kept = trainer_for(policy_dir, user_tokenizer, learning_rate=1e-2).step(*batch)
    stopped = trainer_for(policy_dir, user_tokenizer, learning_rate=1e-2, early_stopping=True, target_kl=-1e9)
    assert kept["ppo/epochs"] == 4 and stopped.step(*batch)["ppo/epochs"] == 1  # any KL is > 1.5 * -1e9
    lenient = trainer_for(policy_dir, user_tokenizer, learning_rate=1e-2, early_stopping=True, target_kl=1e9)
    assert lenient.step(*batch)["ppo/epochs"] == 4
    skipping = trainer_for(policy_dir, user_tokenizer, learning_rate=1e-2, ratio_threshold=0.5)
    before = {k: v.clone() for k, v in skipping.model.state_dict().items()}
    with pytest.warns(UserWarning, match="exceeds ratio_threshold 0.50; skipping it"):
        stats = skipping.step(*batch)
    assert stats["ppo/loss/total"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in skipping.model.state_dict().items())  # zero loss: no update


def test_peft_model_uses_no_reference_copy(policy_dir, user_tokenizer):
    peft = pytest.importorskip("peft")
    from tether.lora import AdapterDisabledReference, parameter_bytes

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, peft_config=lora)
    trainer = PPOTrainer(small_config(learning_rate=1e-2), model, None, user_tokenizer)
    assert trainer.ref_model is None and isinstance(trainer.core.reference, AdapterDisabledReference)
    assert parameter_bytes(model, trainer.core.reference) == parameter_bytes(model)  # no second model in memory
    queries = fixed_batch(user_tokenizer)[0]
    for _ in range(3):
        trainer.step(*fixed_batch(user_tokenizer))
    greedy = dict(do_sample=False, max_new_tokens=6, return_prompt=False)
    response, ref_response = trainer.generate(queries, generate_ref_response=True, **greedy)
    base = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir)
    for q, r in zip(queries, ref_response):  # the reference is the base model (adapter off)
        expected = base.generate(
            q[None], attention_mask=torch.ones_like(q)[None], **{"do_sample": False, "max_new_tokens": len(r)}
        )
        assert torch.equal(expected[0, len(q) :], r)
    with pytest.warns(UserWarning, match="ref_model is not used with a PEFT model"):
        PPOTrainer(small_config(), model, base, user_tokenizer)


def test_bfloat16_policy_trains_in_bfloat16(policy_dir, user_tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, torch_dtype=torch.bfloat16)
    trainer = PPOTrainer(small_config(), model, None, user_tokenizer)
    assert (trainer.run_config.model.dtype, trainer.run_config.model.master_weights) == ("bfloat16", "dtype")
    assert math.isfinite(trainer.step(*fixed_batch(user_tokenizer))["ppo/loss/total"])
    half = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="float16, which needs a gradient scaler"):
        PPOTrainer(small_config(), half, None, user_tokenizer)


def test_set_seed_and_length_sampler():
    sampler = LengthSampler(2, 5)
    set_seed(1)
    first = [sampler() for _ in range(20)]
    set_seed(1)
    assert [sampler() for _ in range(20)] == first and set(first) == {2, 3, 4}
