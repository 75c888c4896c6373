import re
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tether.checkpoint import load_training_state
from tether.config import build_config
from tether.data import write_jsonl
from tether.trainers.ppo import PPOTrainer
from tether.trainers.reward import train_reward
from tether.trainers.sft import train_sft
from tether.tracking import read_metrics
from tether.types import Rollout, by_length, length_groups

PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7=", "3*3=", "8-1=", "5+4=", "6*2="]


def ppo_config(tiny_ppo_args, tmp_path, *overrides, device="cpu"):
    return build_config(overrides=[*tiny_ppo_args, f"model.device={device}", f"output_dir={tmp_path}", *overrides])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_ppo_step_trains_policy_and_value_but_not_reference_or_reward(tiny_ppo_args, tmp_path, device):
    torch.manual_seed(0)
    trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, device=device))
    policy, value, ref, rm = (
        snapshot(m)
        for m in (
            trainer.actor_critic.policy,
            trainer.actor_critic.value_head,
            trainer.reference,
            trainer.scorer.model,
        )
    )
    trainer.train(PROMPTS, tmp_path)
    assert len(changed(policy, trainer.actor_critic.policy)) > 10
    assert changed(value, trainer.actor_critic.value_head) == ["weight", "bias"]
    assert changed(ref, trainer.reference) == [] and changed(rm, trainer.scorer.model) == []
    assert all(not p.requires_grad for p in trainer.reference.parameters())
    assert all(p.grad is None for p in trainer.actor_critic.parameters())  # freed after the update, for the rollout


def test_every_logged_metric_is_documented(tiny_ppo_args, tmp_path, device):
    overrides = ["ppo.kl_control=adaptive", "ppo.kl_target=0.01", "ppo.kl_horizon=100"]
    trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, *overrides, device=device))
    trainer.train(PROMPTS, tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    documented = set(
        re.findall(r"`([a-z_]+/[a-z0-9_]+)`", (Path(__file__).parents[1] / "docs/metrics.md").read_text())
    )
    missing = [k for k in records[-1] if k != "step" and k not in documented]
    assert not missing, f"undocumented metrics: {missing}"
    # adaptive KL: the first rollout has KL 0 < target, so the coefficient shrinks by (1 - 0.2 * 8 / 100)
    assert records[1]["kl/coef"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 100))
    assert all(v is None or isinstance(v, (int, float)) for v in records[-1].values())


def test_first_update_has_ratio_one(tiny_ppo_args, tmp_path, device):
    trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, "ppo.lr=0", "ppo.steps=1", device=device))
    stats = trainer.train(PROMPTS, tmp_path)
    assert stats["ppo/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["ppo/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert stats["ppo/clipfrac"] == 0 and stats["ppo/approx_kl"] == pytest.approx(0, abs=1e-7)


def test_micro_batches_give_the_same_update(tiny_ppo_args, tmp_path, device):
    results = []
    for micro in (4, 1):
        torch.manual_seed(0)
        trainer = PPOTrainer.from_config(
            ppo_config(
                tiny_ppo_args,
                tmp_path / str(micro),
                "ppo.steps=1",
                f"ppo.micro_batch_size={micro}",
                "ppo.max_grad_norm=none",
                device=device,
            )
        )
        trainer.train(PROMPTS, tmp_path / str(micro))
        results.append(snapshot(trainer.actor_critic))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=2e-5, rtol=1e-4)


def with_padding_columns(rollout: Rollout, k: int, pad_id: int) -> Rollout:
    """``rollout`` with ``k`` columns of padding before every prompt and after every response."""
    out = {}
    for f in fields(rollout):
        value = getattr(rollout, f.name)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            block = (
                torch.full_like(value[:, :k], pad_id) if f.name.endswith("_ids") else torch.zeros_like(value[:, :k])
            )
            out[f.name] = torch.cat([block, value] if f.name.startswith("prompt_") else [value, block], 1)
    return replace(rollout, **out)


def test_rollout_trimmed_drops_only_columns_of_padding_in_every_row():
    prompt_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    per_token = torch.arange(8.0).view(2, 4)
    rollout = Rollout(prompt_mask * 7, prompt_mask, response_mask * 9, response_mask, *[per_token] * 3,
                      torch.ones(2), torch.ones(2), torch.ones(2, dtype=torch.bool), per_token)  # fmt: skip
    cut = rollout.trimmed()
    assert torch.equal(cut.prompt_mask, prompt_mask[:, 1:]) and torch.equal(cut.prompt_ids, prompt_mask[:, 1:] * 7)
    assert torch.equal(cut.response_mask, response_mask[:, :2]) and torch.equal(cut.values, per_token[:, :2])
    assert torch.equal(cut.scores, rollout.scores) and cut.rewards is None
    assert torch.equal(cut.sequence_ids, rollout.sequence_ids[:, 1:6])
    nothing = replace(
        rollout, prompt_mask=torch.zeros_like(prompt_mask), response_mask=torch.zeros_like(response_mask)
    )
    assert nothing.trimmed().sequence_ids.shape == (2, 2)  # the prompt's last column and one response column stay
    assert rollout.select(torch.tensor([0, 1])).trimmed().trimmed().response_ids.shape == (2, 2)


def test_update_never_feeds_columns_that_are_padding_in_every_row(tiny_ppo_args, tmp_path, device):
    """A micro-batch drops the columns that are padding in all its rows before its forward: the same rollout with
    three more such columns on each side feeds the models the same widths and trains the same weights."""
    source = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path / "source", device=device))
    rollout = source.compute_advantages(source.compute_rewards(source.rollout(PROMPTS)))
    padded = with_padding_columns(rollout, 3, source.tokenizer.pad_token_id)
    stats, weights, widths = [], [], []
    for name, batch in (("plain", rollout), ("padded", padded)):
        trainer = PPOTrainer.from_config(
            ppo_config(tiny_ppo_args, tmp_path / name, "ppo.micro_batch_size=2", device=device)
        )
        seen = []
        embedding = trainer.actor_critic.policy.get_input_embeddings()
        embedding.register_forward_hook(lambda module, args, out, seen=seen: seen.append(args[0].shape[1]))
        stats.append(trainer.optimize(batch))
        weights.append(snapshot(trainer.actor_critic))
        widths.append(seen)
    assert widths[0] == widths[1] and max(widths[1]) <= rollout.sequence_ids.shape[1]
    assert stats[1] == pytest.approx(stats[0], rel=1e-5, abs=1e-6)
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_by_length_orders_rows_by_real_tokens_ties_in_row_order():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]])
    assert by_length(mask).tolist() == [1, 3, 4, 0, 2]


def test_length_groups_gives_each_group_its_own_span():
    prompt_mask = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
    response_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    groups = [(rows.tolist(), span) for rows, span in length_groups(prompt_mask, response_mask, 2)]
    assert groups == [([0, 3], (2, 2)), ([2, 1], (0, 4))]


def test_micro_batches_group_rows_of_like_length(tiny_ppo_args, tmp_path, device):
    """With every other response cut to two tokens, the micro-batches of a minibatch take the short rows together
    and then the long ones (each fed without the padding of its rows), and train what one micro-batch trains."""
    source = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path / "source", device=device))
    rollout = source.rollout(PROMPTS)
    cut = torch.zeros_like(rollout.response_mask)
    cut[::2, :2], cut[1::2] = 1, 1
    mask = rollout.response_mask * cut
    short = {k: getattr(rollout, k) * mask for k in ("logprobs", "ref_logprobs", "values", "entropy")}
    padded_ids = rollout.response_ids.masked_fill(mask == 0, source.tokenizer.pad_token_id)
    rollout = replace(rollout, response_mask=mask, response_ids=padded_ids, **short)
    rollout = source.compute_advantages(source.compute_rewards(rollout))
    weights, widths = [], []
    for micro in (2, 8):
        overrides = ("ppo.mini_batch_size=8", f"ppo.micro_batch_size={micro}", "ppo.ppo_epochs=1")
        trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path / str(micro), *overrides, device=device))
        seen = []
        embedding = trainer.actor_critic.policy.get_input_embeddings()
        embedding.register_forward_hook(lambda module, args, out, seen=seen: seen.append(args[0].shape[1]))
        trainer.optimize(rollout)
        weights.append(snapshot(trainer.actor_critic))
        widths.append(seen)
    assert widths[0] == sorted(widths[0]) and widths[0][1] < widths[0][2] and widths[1] == [max(widths[0])]
    for key, value in weights[1].items():
        torch.testing.assert_close(weights[0][key], value, atol=2e-5, rtol=1e-4, msg=key)


def test_checkpoint_is_safetensors_and_restores(tiny_ppo_args, tmp_path, device):
    trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, "ppo.steps=1", device=device))
    trainer.train(PROMPTS, tmp_path)
    path = trainer.save(tmp_path / "checkpoints")
    assert path.name == "step_000001" and not list(path.parent.glob("*.tmp"))
    files = {p.name for p in path.rglob("*") if p.is_file()}
    assert {"model.safetensors", "trainable.safetensors", "optimizer.safetensors", "trainer_state.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    reloaded = AutoModelForCausalLM.from_pretrained(path / "policy")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(ids).logits, trainer.actor_critic.policy(ids.to(device)).logits.cpu())
    # the policy is on disk once: policy/ holds its tensors, trainable.safetensors the rest (here the value head)
    assert set(load_file(path / "trainable.safetensors")) == {"value_head.weight", "value_head.bias"}
    fresh = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, device=device))
    state = load_training_state(path, fresh.actor_critic, fresh.optimizer)
    assert state["iteration"] == 1
    for a, b in zip(fresh.actor_critic.parameters(), trainer.actor_critic.parameters(), strict=True):
        assert torch.equal(a, b) and a.device == b.device
    a, b = fresh.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_separate_critic_from_the_reward_model(tiny_ppo_args, tmp_path, device):
    trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, "model.value_model=separate", device=device))
    assert trainer.actor_critic.value_head is None
    critic = snapshot(trainer.actor_critic.critic)
    rm_head = trainer.scorer.model.score.weight.clone()
    torch.testing.assert_close(critic["score.weight"], rm_head)  # the critic starts as the reward model
    trainer.train(PROMPTS, tmp_path)
    assert changed(critic, trainer.actor_critic.critic)
    assert torch.equal(trainer.scorer.model.score.weight, rm_head)


@pytest.mark.parametrize("mode", ["in turn", "side by side"])
def test_a_separate_critic_updated_on_its_own_gives_the_weights_of_one_step(
    tiny_ppo_args, tmp_path, device, monkeypatch, mode
):
    """On one process the critic's pass runs on its own: after the policy's step, whose gradients are freed first
    (in turn), or at the same time on a second thread (side by side, ``model.parallel_critic``). Either way the
    weights and statistics are those of one backward of pg_loss + vf_coef * vf_loss and one step, each model
    clipped on its own (both clipped here), over two micro-batches."""
    import copy
    import threading

    overrides = ("model.value_model=separate", "ppo.vf_coef=0.3", "ppo.max_grad_norm=0.01", "ppo.micro_batch_size=2")
    parallel = str(mode == "side by side").lower()
    trainer = PPOTrainer.from_config(
        ppo_config(tiny_ppo_args, tmp_path, *overrides, f"model.parallel_critic={parallel}", device=device)
    )
    assert trainer.split_update and trainer.parallel_critic == (mode == "side by side")
    ac = trainer.actor_critic
    rollout = trainer.compute_advantages(trainer.compute_rewards(trainer.rollout(PROMPTS[:4])))
    start = copy.deepcopy((ac.state_dict(), trainer.optimizer.state_dict(), trainer.update_index))
    seen = []  # (the thread, whether the policy held gradients) when the critic's gradients were made
    hook = next(ac.critic.parameters()).register_post_accumulate_grad_hook(
        lambda p: seen.append((threading.current_thread(), any(q.grad is not None for q in ac.policy.parameters())))
    )
    weights, stats, threads = {}, {}, torch.get_num_threads()
    for split in (True, False):
        monkeypatch.setattr(PPOTrainer, "split_update", property(lambda self, split=split: split))
        ac.load_state_dict(start[0])
        trainer.optimizer.load_state_dict(copy.deepcopy(start[1]))
        trainer.update_index = start[2]
        seen.clear()
        done, _ = trainer.minibatch_step(rollout)
        stats[split] = {k: total / weight for k, (total, weight) in done.items()}
        weights[split] = snapshot(ac)
        assert len(seen) == 2 and torch.get_num_threads() == threads
        if not split:  # one backward of both losses: the policy's gradients exist before the critic's last one
            assert seen[-1][1] and all(thread is threading.main_thread() for thread, _ in seen)
        elif mode == "in turn":
            assert not any(held for _, held in seen) and all(t is threading.main_thread() for t, _ in seen)
        else:
            assert all(thread is not threading.main_thread() for thread, _ in seen)
    hook.remove()
    assert stats[True]["ppo/grad_norm"] > 0.01 and stats[True]["ppo/critic_grad_norm"] > 0.01
    assert stats[True] == pytest.approx(stats[False], rel=1e-5, abs=1e-7)
    assert changed(start[0], ac) and weights[True].keys() == weights[False].keys()
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("bad", ["policy", "critic"])
def test_side_by_side_passes_apply_only_the_finite_one(tiny_ppo_args, tmp_path, bad):
    """With the passes side by side, a pass whose gradient is not finite leaves its model as it was, the other
    model takes its step, and the minibatch counts as skipped."""
    overrides = ("model.value_model=separate", "model.parallel_critic=true")
    trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, *overrides))
    ac = trainer.actor_critic
    rollout = trainer.compute_advantages(trainer.compute_rewards(trainer.rollout(PROMPTS[:4])))
    real, key = trainer.clip_gradients, {"policy": "ppo/grad_norm", "critic": "ppo/critic_grad_norm"}[bad]
    trainer.clip_gradients = lambda: real() | {key: float("nan")}
    before = {"policy": snapshot(ac.policy), "critic": snapshot(ac.critic)}
    done, _ = trainer.minibatch_step(rollout)
    assert done is None and trainer.guards.bad_steps == 1
    assert not changed(before[bad], getattr(ac, bad))
    good = "critic" if bad == "policy" else "policy"
    assert changed(before[good], getattr(ac, good))
    assert all(p.grad is None for p in ac.parameters())


def test_parallel_critic_auto_is_on_for_small_models_on_a_cpu_with_two_threads(tiny_ppo_args, tmp_path, monkeypatch):
    from tether.trainers import update

    trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, "model.value_model=separate"))
    assert trainer.config.model.parallel_critic is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert trainer.parallel_critic
    critic_size = sum(p.numel() for p in trainer.actor_critic.critic.parameters())
    monkeypatch.setattr(update, "PARALLEL_BELOW", critic_size)
    assert not trainer.parallel_critic  # a critic this size keeps the passes in turn
    monkeypatch.setattr(update, "PARALLEL_BELOW", critic_size + 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not trainer.parallel_critic
    head = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path / "head", "model.parallel_critic=true"))
    assert not head.split_update and not head.parallel_critic  # a value head has no second pass


def test_compiled_update_gives_the_eager_numbers(tiny_ppo_args, tmp_path, device):
    """model.compile runs the update's forwards through torch.compile (graphs really compiled, one layer's graph
    serving every layer) and trains the same weights to float rounding; the layers are eager again afterwards (the
    sampler never sees the compiled forward)."""
    from torch._dynamo.utils import counters

    from tether.passes import decoder_layers, trunk

    trainers, stats = {}, {}
    for compiled in (False, True):
        overrides = ("model.value_model=separate", f"model.compile={str(compiled).lower()}")
        trainers[compiled] = PPOTrainer.from_config(
            ppo_config(tiny_ppo_args, tmp_path / str(compiled), *overrides, device=device)
        )
    rollout = trainers[False].compute_advantages(trainers[False].compute_rewards(trainers[False].rollout(PROMPTS)))
    graphs, before = counters["stats"]["unique_graphs"], snapshot(trainers[True].actor_critic)
    for compiled, trainer in trainers.items():
        stats[compiled] = trainer.optimize(rollout)
    assert changed(before, trainers[True].actor_critic)
    layers = [layer for m in (trainers[True].actor_critic.policy, trainers[True].actor_critic.critic)
              for layer in decoder_layers(trunk(m))]  # fmt: skip
    assert set(trainers[True].compiled_forwards) == set(layers) and len(layers) >= 4
    assert graphs < counters["stats"]["unique_graphs"] < graphs + len(layers)
    assert not any("forward" in vars(layer) for layer in layers)
    assert stats[True] == pytest.approx(stats[False], rel=1e-4, abs=1e-5)
    eager, compiled = (dict(t.actor_critic.named_parameters()) for t in (trainers[False], trainers[True]))
    for name, param in eager.items():
        torch.testing.assert_close(compiled[name], param, rtol=1e-4, atol=1e-5, msg=name)


def test_sft_learns_and_saves(policy_dir, tmp_path, device):
    records = [{"prompt": p, "response": "42"} for p in PROMPTS]
    write_jsonl(tmp_path / "sft.jsonl", records)
    config = build_config(
        overrides=[
            f"model.policy={policy_dir}",
            f"model.device={device}",
            f"sft.data={tmp_path / 'sft.jsonl'}",
            "sft.steps=40",
            "sft.batch_size=8",
            "sft.lr=3e-3",
            "sft.warmup_steps=5",
            "logging.print_every=0",
        ]
    )
    model_dir = train_sft(config, tmp_path, echo=lambda *a: None)
    losses = [r["sft/loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert losses[-1] < 0.3 * losses[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert model.config.n_layer == 2


def test_reward_model_learns_separable_pairs(policy_dir, tmp_path, device):
    pairs = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": "Hmm, hard to say."}
        for a in range(8)
        for b in range(8)
    ]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    config = build_config(
        overrides=[
            f"model.policy={policy_dir}",
            f"model.device={device}",
            f"reward.data={tmp_path / 'pairs.jsonl'}",
            "reward.epochs=3",
            "reward.batch_size=8",
            "reward.lr=1e-3",
            "reward.eval_fraction=0.25",
            "logging.print_every=0",
        ]
    )
    model_dir, held_out = train_reward(config, tmp_path, echo=lambda *a: None)
    losses = [r["rm/loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "rm/loss" in r]
    assert losses[-1] < losses[0] / 3
    assert held_out["accuracy"] == 1.0 and held_out["margin"] > 0.5
    assert AutoConfig.from_pretrained(model_dir).num_labels == 1


def test_fewer_prompts_than_a_rollout_batch_cycle_through(tiny_ppo_args, tmp_path, device):
    trainer = PPOTrainer.from_config(ppo_config(tiny_ppo_args, tmp_path, "ppo.steps=1", device=device))
    seen = []
    trainer.train(PROMPTS[:3], tmp_path, on_step=lambda t, rollout: seen.append(len(rollout)))
    assert seen == [8]  # a full rollout batch of 8, drawn from 3 prompts by reshuffled passes
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 1


def test_adam_state_made_up_front_trains_the_same_weights(tiny_ppo_args, tmp_path):
    """On a CPU the trainer makes Adam's state before the first rollout (memory placement only): the same weights and
    moments as the state Adam makes itself at its first step."""
    trainers = {}
    for upfront in (True, False):
        torch.manual_seed(0)
        config = ppo_config(tiny_ppo_args, tmp_path / str(upfront), "model.value_model=separate", "ppo.steps=2")
        trainer = PPOTrainer.from_config(config)
        trained = [p for p in trainer.actor_critic.parameters() if p.requires_grad]
        assert len(trainer.optimizer.state) == len(trained)
        assert all(not s["exp_avg"].any() and s["step"] == 0 for s in trainer.optimizer.state.values())
        if not upfront:
            trainer.optimizer.state.clear()  # Adam's own lazy state
        trainer.train(PROMPTS, tmp_path / str(upfront))
        trainers[upfront] = trainer
    for a, b in zip(trainers[True].actor_critic.parameters(), trainers[False].actor_critic.parameters(), strict=True):
        assert torch.equal(a, b)
    states = [trainers[k].optimizer.state_dict()["state"] for k in (True, False)]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert all(torch.equal(states[0][k][n], states[1][k][n]) for n in ("step", "exp_avg", "exp_avg_sq"))
        assert states[0][k]["step"].dtype == states[1][k]["step"].dtype
