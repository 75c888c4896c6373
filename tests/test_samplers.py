"""Another sampler in tether's place (``PPOTrainer.sampler``): here examples/engine_sampler.py's, built on
``transformers``' ``generate`` as an inference engine's client would be. Its tokens are what PPO trains on, the
policy's own forward pass gives their old log-probs (so the first update's ratio is 1), and a sampler that returns
the wrong thing is a one-line error."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether.config import build_config
from tether.data import write_jsonl
from tether.envs.episodes import collect_episodes
from tether.errors import TetherError
from tether.models import ActorCritic, load_causal_lm, reference_copy
from tether.rewards import load_callable
from tether.rollout import mask_after_eos
from tether.sampling import Sampled, Sampling
from tether.tracking import read_metrics
from tether.trainers.ppo import PPOTrainer

PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7=", "3*3=", "8-1=", "5+4=", "6*2="]


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "engine_sampler.py"
Example = load_callable(f"{EXAMPLE}:GenerateSampler", "the example", "Class")


class GenerateSampler(Example):
    """The example's sampler (``model.generate``, token lists back, as an engine's client), keeping what it drew."""

    def __init__(self):
        super().__init__()
        self.records, self.drawn = [], []

    def __call__(self, model, prompt_ids, prompt_mask, sampling, stops, keys, autocast, record):
        sampled = super().__call__(model, prompt_ids, prompt_mask, sampling, stops, keys, autocast, record)
        self.records.append(record)
        self.drawn.append(sampled.tokens.clone())
        return sampled


def config(tiny_ppo_args, tmp_path, *overrides):
    return build_config(overrides=[*tiny_ppo_args, "model.device=cpu", f"output_dir={tmp_path}", *overrides])


def test_responses_as_lists_become_rows_filled_after_their_end():
    sampled = Sampled.of_responses([[5, 6, 2], [7], []], fill_id=2)
    assert sampled.tokens.tolist() == [[5, 6, 2], [7, 2, 2], [2, 2, 2]]
    assert sampled.tokens.dtype == torch.long and not sampled.recorded


def test_a_plugged_in_sampler_draws_what_ppo_trains_on(tiny_ppo_args, tmp_path):
    torch.manual_seed(0)
    sampler = GenerateSampler()
    trainer = PPOTrainer.from_config(config(tiny_ppo_args, tmp_path, "sampling.temperature=0.7"), sampler=sampler)
    rollout = trainer.rollout(PROMPTS)
    assert sampler.records == [True]
    expected, mask = mask_after_eos(sampler.drawn[0], trainer.stops, trainer.tokenizer.pad_token_id)
    width = rollout.response_ids.shape[1]
    assert torch.equal(rollout.response_ids, expected[:, :width]) and torch.equal(rollout.response_mask, mask)
    # the old log-probs are the policy's, at the sampling temperature, over exactly those tokens
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    attention = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    policy = trainer.actor_critic.policy
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions).logits.float()
    logits = logits[:, rollout.prompt_ids.shape[1] - 1 : -1] / 0.7
    logprobs = logits.log_softmax(-1).gather(-1, rollout.response_ids[..., None])[..., 0] * rollout.response_mask
    torch.testing.assert_close(rollout.logprobs, logprobs, atol=1e-4, rtol=1e-4)


def test_ppo_with_a_plugged_in_sampler_starts_at_ratio_one_and_trains(tiny_ppo_args, tmp_path):
    torch.manual_seed(0)
    trainer = PPOTrainer.from_config(config(tiny_ppo_args, tmp_path, "ppo.lr=0", "ppo.steps=1"))
    trainer.sampler = GenerateSampler()  # set on a built trainer, as an engine's client would be
    stats = trainer.train(PROMPTS, tmp_path / "run")
    assert trainer.sampler.records == [True]
    assert stats["ppo/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["ppo/ratio_min"] == pytest.approx(1.0, abs=1e-5)


class ThreeTurns:
    """An environment that answers "no" and ends the episode after three turns."""

    def reset(self, prompt) -> str:
        self.turn = 0
        return "?"

    def step(self, response: str):
        self.turn += 1
        return "no", 1.0, self.turn >= 3


def test_episodes_take_their_turns_from_the_plugged_in_sampler(policy_dir, tokenizer):
    torch.manual_seed(0)
    policy = load_causal_lm(policy_dir)
    sampler = GenerateSampler()
    envs = [ThreeTurns() for _ in PROMPTS[:4]]
    rollout = collect_episodes(
        ActorCritic(policy), reference_copy(policy), envs, tokenizer, PROMPTS[:4], Sampling(3), 3, chunk=2,
        sampler=sampler,
    )  # fmt: skip
    assert sampler.records == [False] * 3  # one call per turn, three turns
    assert rollout.response_ids[:, 0].tolist() == sampler.drawn[0][:, 0].tolist()


@pytest.mark.parametrize(
    "returned, message",
    [
        (
            lambda ids: Sampled(torch.zeros(len(ids) - 1, 3, dtype=torch.long)),
            r"\(8, T <= 8\) tokens.*got tokens of shape \(7, 3\)",
        ),
        (lambda ids: Sampled(torch.zeros(len(ids), 9, dtype=torch.long)), r"got tokens of shape \(8, 9\)"),
        (lambda ids: [[1, 2]] * len(ids), "got list"),
        (lambda ids: Sampled(torch.zeros(len(ids), 3)), "tokens must be int64 on cpu.*got torch.float32"),
        (
            lambda ids: Sampled(torch.full((len(ids), 3), 50_000)),
            r"token ids must be in \[0, \d+\) \(the policy's vocab",
        ),
        (lambda ids: Sampled(torch.full((len(ids), 3), -1)), r"got ids from -1 to -1"),
    ],
)
def test_a_sampler_that_returns_the_wrong_thing_is_named(tiny_ppo_args, tmp_path, returned, message):
    trainer = PPOTrainer.from_config(config(tiny_ppo_args, tmp_path))
    trainer.sampler = lambda model, ids, *rest: returned(ids)
    with pytest.raises(TetherError, match=f"^sampler: .*{message}"):
        trainer.rollout(PROMPTS)


class Fives:
    """An engine that answers every prompt with token 5 and a stop (for ``sampling.sampler=<this file>:Fives``)."""

    def __call__(self, model, prompt_ids, prompt_mask, sampling, stops, keys, autocast, record):
        return Sampled.of_responses([[5, stops[0]]] * len(prompt_ids), stops[0], prompt_ids.device)


class Raises(Fives):
    def __call__(self, *args):
        raise ConnectionError("engine at localhost:8000 refused the connection\nmore detail")


def test_the_config_names_a_sampler_in_a_file(tiny_ppo_args, tmp_path):
    trainer = PPOTrainer.from_config(config(tiny_ppo_args, tmp_path, f"sampling.sampler={__file__}:Fives"))
    rollout = trainer.rollout(PROMPTS)
    assert rollout.response_ids[:, 0].tolist() == [5] * len(PROMPTS)
    assert rollout.response_mask.sum(1).tolist() == [2] * len(PROMPTS)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("Raises", "sampling.sampler '.*:Raises': it raised ConnectionError: engine at localhost:8000 refused the "
         "connection$"),
        ("Nothing", "sampling.sampler '.*:Nothing': 'Nothing' is not a callable"),
        ("PROMPTS", "sampling.sampler '.*:PROMPTS': 'PROMPTS' is not a callable"),
    ],
)  # fmt: skip
def test_a_named_sampler_that_fails_is_one_line(tiny_ppo_args, tmp_path, spec, message):
    with pytest.raises(TetherError, match=message):
        trainer = PPOTrainer.from_config(config(tiny_ppo_args, tmp_path, f"sampling.sampler={__file__}:{spec}"))
        trainer.rollout(PROMPTS)


def tether_ppo(tiny_ppo_args, tmp_path, sampler: str):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", "ppo", *tiny_ppo_args, f"output_dir={tmp_path / 'run'}",
         f"ppo.prompts={tmp_path / 'prompts.jsonl'}", f"sampling.sampler={sampler}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_tether_ppo_trains_with_the_example_sampler(tiny_ppo_args, tmp_path):
    run = tether_ppo(tiny_ppo_args, tmp_path, f"{EXAMPLE}:GenerateSampler")
    assert run.returncode == 0, run.stderr
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(1 <= r["response/length"] <= 8 for r in records)  # sampling.max_new_tokens=8
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_the_command_line_names_a_missing_sampler_file_in_one_line(tiny_ppo_args, tmp_path):
    run = tether_ppo(tiny_ppo_args, tmp_path, f"{tmp_path / 'engine.py'}:Engine")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith(f"no such file '{tmp_path / 'engine.py'}'")
    assert "Traceback" not in run.stderr


def test_tether_sample_draws_from_the_named_sampler(policy_dir, tokenizer):
    def sample(spec):
        return subprocess.run(
            [sys.executable, "-m", "tether.cli", "sample", str(policy_dir), "1+1=", "2*3=", "--sampler", spec],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    run = sample(f"{__file__}:Fives")
    assert run.returncode == 0, run.stderr
    answers = [line for line in run.stdout.splitlines() if line.startswith("answer:")]
    assert answers == [f"answer: {tokenizer.decode([5]).strip()}"] * 2
    run = sample(f"{__file__}:Raises")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"tether: --sampler '{__file__}:Raises': it raised ConnectionError: "
        "engine at localhost:8000 refused the connection"
    )
