"""Environments that answer back: masks, per-turn rewards, the PPO loss on multi-turn episodes, loading, the game."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether.algo import compute_gae, kl_penalty, logprobs_from_logits, ppo_policy_loss, ppo_value_loss, shape_rewards
from tether.config import build_config
from tether.envs import make_envs
from tether.envs.episodes import collect_episodes, episode_stats, play_episodes
from tether.envs.games import REPLY, HighLow, all_prompts, rule_answer, sft_records
from tether.errors import TetherError
from tether.models import ActorCritic, load_causal_lm, reference_copy
from tether.passes import gather_ids
from tether.rollout import Sampling
from tether.trainers.ppo import PPOTrainer
from tether.tracking import read_metrics

PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7="]


class Scripted:
    """Opens with '?', answers every turn with ``reply``; turn k (from 1) earns k; done after three turns."""

    reply = "no!"

    def __init__(self, reply: str | None = None):
        self.reply = reply or self.reply
        self.turn = 0

    def reset(self, prompt) -> str:
        self.turn = 0
        return "?"

    def step(self, response: str):
        self.turn += 1
        return self.reply, float(self.turn), self.turn >= 3


@pytest.fixture
def actor_critic(policy_dir):
    torch.manual_seed(0)
    policy = load_causal_lm(policy_dir)
    return ActorCritic(policy), reference_copy(policy)


def play(actor_critic, tokenizer, reply="no!", max_turns=3, seed=0):
    torch.manual_seed(seed)
    model, reference = actor_critic
    envs = [Scripted(reply) for _ in PROMPTS]
    return collect_episodes(model, reference, envs, tokenizer, PROMPTS, Sampling(3), max_turns, chunk=2)


def turn_ends(mask_row: torch.Tensor) -> list[int]:
    """Positions of the last token of each run of 1s."""
    nxt = torch.cat([mask_row[1:], mask_row.new_zeros(1)])
    return torch.nonzero((mask_row == 1) & (nxt == 0)).flatten().tolist()


def test_replies_are_read_but_never_trained_on(actor_critic, tokenizer):
    rollout = play(actor_critic, tokenizer)
    reply_ids = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    mask, env = rollout.response_mask, rollout.env_mask
    assert not (mask.bool() & env.bool()).any()
    for row in range(len(rollout)):
        assert rollout.response_ids[row][env[row].bool()].tolist() == reply_ids * 2  # two replies between 3 turns
        assert len(turn_ends(mask[row])) == 3
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        assert (getattr(rollout, name)[env.bool()] == 0).all(), name
    # the log-probs of sampled tokens are read in the context of the replies: one plain forward over each episode
    model, _ = actor_critic
    for row in range(len(rollout)):
        seq = torch.cat([rollout.prompt_ids[row][rollout.prompt_mask[row].bool()], rollout.response_ids[row]])
        seen = int((mask[row] + env[row]).sum())
        seq = seq[: len(seq) - (rollout.response_ids.shape[1] - seen)]
        logits = model.policy(seq[None]).logits[0, :-1]
        expected = logprobs_from_logits(logits, seq[1:])[-seen:]
        picked = mask[row][:seen].bool()
        torch.testing.assert_close(rollout.logprobs[row][:seen][picked], expected[picked], atol=1e-5, rtol=1e-5)


def test_each_turns_reward_lands_on_its_last_token(actor_critic, tokenizer):
    rollout = play(actor_critic, tokenizer)
    assert rollout.raw_scores.tolist() == [3.0] * len(rollout)  # the last turn's reward is the outcome
    for row in range(len(rollout)):
        first, second, last = turn_ends(rollout.response_mask[row])
        expected = torch.zeros_like(rollout.step_scores[row])
        expected[first], expected[second] = 1.0, 2.0
        assert torch.equal(rollout.step_scores[row], expected)
        assert rollout.env_mask[row][first + 1] == 1 and rollout.env_mask[row][second + 1] == 1
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1") * rollout.response_mask
    rewards, _ = shape_rewards(rollout.raw_scores, kl, rollout.response_mask, 0.0, rollout.step_scores)
    assert rewards.sum(-1).tolist() == [6.0] * len(rollout)  # 1 + 2 + 3, nothing on the replies
    assert episode_stats(rollout) == {"env/return": 6.0, "env/turns": 3.0}


def test_gae_over_an_episode_equals_gae_with_the_replies_cut_out(actor_critic, tokenizer):
    """Reply tokens are skipped: turn k's last token bootstraps from turn k+1's first."""
    rollout = play(actor_critic, tokenizer)
    mask = rollout.response_mask
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1") * mask
    rewards, _ = shape_rewards(rollout.raw_scores, kl, mask, 0.1, rollout.step_scores)
    values = rollout.values + 0.3 * mask  # nonzero values everywhere that counts
    advantages, returns = compute_gae(rewards, values, mask, 0.9, 0.8)
    env = rollout.env_mask.bool()
    assert (advantages[env] == 0).all() and (returns[env] == 0).all() and (rewards[env] == 0).all()
    for row in range(len(rollout)):
        keep = mask[row].bool()
        cut_adv, cut_ret = compute_gae(
            rewards[row][keep][None], values[row][keep][None], mask[row][keep][None], 0.9, 0.8
        )
        torch.testing.assert_close(advantages[row][keep], cut_adv[0])
        torch.testing.assert_close(returns[row][keep], cut_ret[0])


@pytest.mark.parametrize("reply", ["no!", "wrong, try again?"])
def test_the_loss_reaches_exactly_the_sampled_tokens_whatever_the_reply(actor_critic, tokenizer, reply):
    """Policy and value gradients flow into sampled positions only; a longer reply changes nothing of that."""
    rollout = play(actor_critic, tokenizer, reply=reply)
    model, _ = actor_critic
    mask = rollout.response_mask.float()
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1") * mask
    rewards, _ = shape_rewards(rollout.raw_scores, kl, mask, 0.1, rollout.step_scores)
    advantages, returns = compute_gae(rewards, rollout.values, mask, 1.0, 0.95)
    prompt_length, eos = rollout.prompt_ids.shape[1], tokenizer.eos_token_id
    logits, values = model(rollout.sequence_ids, rollout.attention_mask, prompt_length, 1.0, eos)
    logits.retain_grad()
    values.retain_grad()
    new_logprobs = logprobs_from_logits(logits, gather_ids(rollout.response_ids, mask, eos))
    pg_loss, stats = ppo_policy_loss(new_logprobs, rollout.logprobs, advantages, mask, 0.2)
    vf_loss, _ = ppo_value_loss(values, rollout.values, returns, mask, 0.2)
    (pg_loss + 0.1 * vf_loss).backward()
    assert torch.equal(logits.grad.abs().sum(-1) > 0, rollout.response_mask.bool())
    assert (values.grad[rollout.env_mask.bool()] == 0).all()
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)  # old log-probs match the update's forward


def test_episodes_end_when_the_environment_says_done(policy_dir, tokenizer):
    policy = load_causal_lm(policy_dir)
    envs = [HighLow(), HighLow()]
    torch.manual_seed(0)
    episodes = play_episodes(policy, envs, tokenizer, ["1 or 2?", "8 or 3?"], Sampling(2), max_turns=5)
    for turns, replies, rewards in zip(episodes.turns, episodes.replies, episodes.rewards):
        assert 1 <= len(turns) <= HighLow.tries and len(replies) == len(turns) - 1 and len(rewards) == len(turns)
        assert all(r == REPLY for r in replies)
    assert episodes.done == [True, True]


def test_a_ppo_run_on_the_game_from_the_command_line(tmp_path, policy_dir):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in all_prompts()[:8]))
    result = tether(
        "ppo",
        f"model.policy={policy_dir}",
        "ppo.env=tether.envs.games:HighLow",
        "ppo.max_turns=2",
        "ppo.prompts=prompts.jsonl",
        "ppo.steps=2",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=2",
        "ppo.lr=1e-3",
        "sampling.max_new_tokens=3",
        f"output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 <= r["reward/score"] <= 1 and 0 <= r["reward/steps"] <= 1 for r in records)
    assert (tmp_path / "run/model/config.json").is_file()


@pytest.mark.parametrize("offload", ["false", "true"])  # true: the reference is away except for the episodes
def test_a_ppo_trainer_with_an_env_trains_on_the_sampled_tokens(tiny_ppo_args, tmp_path, offload):
    env = f"ppo.env={Path(__file__)}:Scripted"
    overrides = [*tiny_ppo_args, "model.reward_model=", env, "sampling.max_new_tokens=2"]
    config = build_config(overrides=[*overrides, f"model.offload_frozen={offload}"])
    trainer = PPOTrainer.from_config(config)
    assert trainer.scorer is None and len(trainer.envs) == config.ppo.rollout_batch_size
    stats = trainer.train(PROMPTS * 2, tmp_path)
    assert stats["reward/score"] == 3.0 and stats["reward/steps"] == 3.0  # turn 3's reward, and 1 + 2
    assert 3 <= stats["response/length"] <= 6  # three turns of 1-2 sampled tokens; the replies add 6 more
    assert [env.turn for env in trainer.envs] == [3] * len(trainer.envs)


def tether(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_a_bad_env_is_one_line_and_exit_2(tmp_path, policy_dir):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1 or 2?"}) + "\n")
    result = tether(
        "ppo", f"model.policy={policy_dir}", "ppo.env=no_such_module:Game", "ppo.prompts=prompts.jsonl", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tether: ppo.env 'no_such_module:Game': cannot import module 'no_such_module' (No module named "
        "'no_such_module')"
    ]


class NoStep:
    def reset(self, prompt):
        return ""


class Broken(Scripted):
    def step(self, response):
        raise ValueError("the board is on fire\nsecond line")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("Game", "ppo.env 'Game': expected 'module:Class' or 'file.py:Class'"),
        (
            "tether.envs.games:Nope",
            "ppo.env 'tether.envs.games:Nope': 'Nope' is not a callable in 'tether.envs.games'",
        ),
        ("NoStep", "NoStep has no reset(prompt) and step(response)"),
        ("missing.py:Game", "ppo.env 'missing.py:Game': no such file 'missing.py'"),
    ],
)
def test_bad_env_specs_are_named(spec, message):
    if spec == "NoStep":
        spec, message = f"{Path(__file__)}:NoStep", f"ppo.env '{Path(__file__)}:NoStep': {message}"
    with pytest.raises(TetherError) as error:
        make_envs(spec, 2)
    assert str(error.value) == message


def test_an_env_that_raises_is_named_in_one_line(actor_critic, tokenizer):
    model, reference = actor_critic
    with pytest.raises(TetherError, match=r"^ppo.env Broken.step raised ValueError: the board is on fire$"):
        collect_episodes(model, reference, [Broken()], tokenizer, ["1+1="], Sampling(2), 2, chunk=1)


def test_an_env_with_a_reward_model_is_refused(tiny_ppo_args):
    with pytest.raises(TetherError, match="ppo.env: the environment's rewards are the reward"):
        build_config(overrides=[*tiny_ppo_args, "ppo.env=tether.envs.games:HighLow"])


def test_the_game_changes_its_rule_with_the_level():
    game = HighLow(rounds_per_level=2)
    levels, answers = [], []
    for _ in range(5):
        game.reset("7 or 3?")
        levels.append(game.level)
        answers.append(game.step("7"))
    assert levels == [1, 1, 2, 2, 2]
    assert answers[0] == ("yes!", 1.0, True) and answers[2] == (REPLY, 0.0, False)
    assert game.step(" 3 ") == ("yes!", 0.5, True)  # the second try after the reply
    game.reset("7 or 3?")
    assert game.step("5") == (REPLY, 0.0, False) and game.step("7") == (REPLY, 0.0, True)
    assert rule_answer("2 or 9?", 1) == "9" and rule_answer("2 or 9?", 2) == "2"
    with pytest.raises(ValueError, match="not a high-low prompt"):
        game.reset("1+1=")


def test_the_games_sft_data_knows_the_first_rule():
    records = sft_records(2000, seed=0, eos="<eos>")
    first = [r for r in records if "<eos>" not in r["prompt"]]
    retries = [r for r in records if "<eos>" in r["prompt"]]
    right = sum(r["response"] == rule_answer(r["prompt"], 1) for r in first) / len(first)
    assert 0.8 < right < 0.9 and 0.25 < len(retries) / len(records) < 0.35
    for r in retries:  # after "no!" the player names the digit it did not try
        prompt, tried = r["prompt"].split("<eos>")[0][:-1], r["prompt"].split("<eos>")[0][-1]
        assert r["prompt"].endswith(REPLY) and r["response"] != tried and r["response"] in prompt
