"""Score post-processing (score_norm modes, sqrt length normalisation), the reward-function guard rails, and the
reward model's length remedies (length-balanced pairs, the held-out score-length correlation)."""

import math

import pytest
import torch

from tether.config import build_config
from tether.data import prompt_batch, write_jsonl
from tether.errors import TetherError
from tether.rewards import FunctionScorer, RunningMoments, transform_scores
from tether.trainers.reward import length_balanced, split_pairs, train_reward
from tether.tracking import read_metrics


def transform(raw, lengths=None, ended=None, **options):
    raw = torch.tensor(raw)
    lengths = torch.tensor(lengths) if lengths is not None else torch.ones_like(raw)
    ended = torch.tensor(ended) if ended is not None else torch.ones_like(raw, dtype=torch.bool)
    settings = dict(missing_eos_penalty=None, length_penalty=0.0, score_norm="none", score_clip=None)
    settings.update(options)
    moments = settings.pop("moments", RunningMoments())
    return transform_scores(raw, ended, lengths, moments=moments, **settings)


def test_batch_modes_by_hand():
    # raw [1, 3, 5]: mean 3, Bessel std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2 (the population std would be 1.633)
    # 'batch'       (s - 3) / 2     -> [-1, 0, 1]  (the tutorial's normalize_rewards)
    # 'batch_scale' (s - 3) / 2 + 3 -> [2, 3, 4]   (unit std, mean kept)
    torch.testing.assert_close(transform([1.0, 3.0, 5.0], score_norm="batch"), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(transform([1.0, 3.0, 5.0], score_norm="batch_scale"), torch.tensor([2.0, 3.0, 4.0]))


def test_batch_modes_match_the_tutorial_formula():
    raw = torch.tensor([0.3, -1.2, 2.5, 0.9, 4.0, -0.4])
    tutorial = (raw - raw.mean()) / (raw.std() + 1e-8)  # normalize_rewards (and whiten_rewards) in the tutorial
    torch.testing.assert_close(transform(raw.tolist(), score_norm="batch"), tutorial)
    torch.testing.assert_close(transform(raw.tolist(), score_norm="batch_scale"), tutorial + raw.mean())


def test_running_modes_divide_by_the_running_std():
    # the moments start at mean 0, var 1, count 1e-4; after [1, 3, 5] they are mean ~3, var ~8/3 (population)
    moments = RunningMoments()
    scaled = transform([1.0, 3.0, 5.0], score_norm="scale", moments=moments)
    assert moments.mean == pytest.approx(3.0, abs=1e-3) and moments.var == pytest.approx(8 / 3, abs=1e-3)
    std = math.sqrt(8 / 3)
    torch.testing.assert_close(scaled, torch.tensor([1 / std, 3 / std, 5 / std]), atol=1e-3, rtol=0)
    normed = transform([1.0, 3.0, 5.0], score_norm="norm", moments=RunningMoments())
    torch.testing.assert_close(normed, torch.tensor([-2 / std, 0.0, 2 / std]), atol=1e-3, rtol=0)


def test_sqrt_length_norm_comes_before_penalties_and_clip():
    # raw [2, 3, -4], lengths [4, 9, 16]: raw / sqrt(len) = [1, 1, -1]
    torch.testing.assert_close(transform([2.0, 3.0, -4.0], [4, 9, 16], length_norm="sqrt"), torch.tensor([1.0, 1, -1]))
    # then length_penalty 0.1 * len = [0.4, 0.9, 1.6] -> [0.6, 0.1, -2.6]; the last one never ended: -0.5 -> -3.1;
    # clip at 3 -> -3.0. (Penalising first would give (2 - 0.4) / 2 = 0.8 for the first.)
    scores = transform(
        [2.0, 3.0, -4.0],
        [4, 9, 16],
        [True, True, False],
        length_norm="sqrt",
        length_penalty=0.1,
        missing_eos_penalty=0.5,
        score_clip=3.0,
    )
    torch.testing.assert_close(scores, torch.tensor([0.6, 0.1, -3.0]))


@pytest.mark.parametrize("mode", ["batch", "batch_scale", "scale", "norm"])
def test_a_nan_score_stays_nan_and_does_not_poison_the_statistics(mode):
    # finite [1, 3, 5] as above: 'batch' gives [-1, ., 0, 1]
    moments = RunningMoments()
    scores = transform([1.0, float("nan"), 3.0, 5.0], score_norm=mode, moments=moments)
    assert math.isnan(scores[1]) and torch.isfinite(scores[[0, 2, 3]]).all()
    assert math.isfinite(moments.mean) and math.isfinite(moments.var)
    if mode == "batch":
        torch.testing.assert_close(scores[[0, 2, 3]], torch.tensor([-1.0, 0.0, 1.0]))


def score_with(tokenizer, fn, name="mod:fn"):
    ids, mask = prompt_batch(tokenizer, ["1+1=", "2+2="], 32)
    resp_ids = torch.tensor([[tokenizer.convert_tokens_to_ids("2"), tokenizer.eos_token_id]] * 2)
    return FunctionScorer(fn, name)(ids, mask, resp_ids, torch.ones(2, 2, dtype=torch.long), tokenizer=tokenizer)


def test_reward_function_errors_are_one_line_naming_it(tokenizer):
    def boom(prompts, responses):
        raise ValueError("bad\nsecond line")

    with pytest.raises(TetherError, match=r"^reward function 'mod:fn' raised ValueError: bad$"):
        score_with(tokenizer, boom)
    with pytest.raises(TetherError, match=r"^reward function 'mod:fn' must return numbers, one per response; got"):
        score_with(tokenizer, lambda p, r: ["good", "bad"])
    with pytest.raises(TetherError, match="must return numbers"):
        score_with(tokenizer, lambda p, r: None)
    with pytest.raises(TetherError, match=r"^reward function 'mod:fn' returned 3 scores for 2 responses$"):
        score_with(tokenizer, lambda p, r: [1.0, 2.0, 3.0])


def test_non_finite_scores_pass_through_as_nan(tokenizer):
    scores = score_with(tokenizer, lambda p, r: [float("inf"), float("nan")])
    assert scores.dtype == torch.float32 and torch.isnan(scores).all()
    assert score_with(tokenizer, lambda p, r: [1, 2.5]).tolist() == [1.0, 2.5]


def test_length_balanced_pairs_by_hand(tokenizer):
    # one character = one token: gaps |1 - 3| = 2, |2 - 2| = 0, |1 - 17| = 16
    records = [
        {"prompt": "2+3=", "chosen": "5", "rejected": "Hmm"},
        {"prompt": "7*8=", "chosen": "56", "rejected": "57"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "Hmm, hard to say."},
    ]
    assert length_balanced(tokenizer, records, 3) == records[:2]
    assert length_balanced(tokenizer, records, 2) == records[1:2]  # strictly below the threshold
    assert length_balanced(tokenizer, records, 17) == records


@pytest.mark.parametrize(
    "override, message",
    [
        ("sft.lr=-1e-3", "sft.lr must be a learning rate >= 0, got -0.001"),
        ("reward.lr=-1", "reward.lr must be a learning rate >= 0, got -1.0"),
        ("ppo.lr=nan", "ppo.lr must be a learning rate >= 0, got nan"),
        ("reward.max_length_gap=0", "reward.max_length_gap must be positive (or none), got 0"),
    ],
)
def test_finalize_rejects(override, message):
    with pytest.raises(TetherError) as error:
        build_config(overrides=[override])
    assert str(error.value) == message


def test_batch_norm_needs_two_responses():
    with pytest.raises(TetherError, match="ppo.score_norm=batch needs ppo.rollout_batch_size >= 2"):
        build_config(overrides=["ppo.score_norm=batch", "ppo.rollout_batch_size=1", "ppo.mini_batch_size=1"])
    assert build_config(overrides=["ppo.lr=0", "ppo.length_norm=sqrt"]).ppo.length_norm == "sqrt"


def reward_config(policy_dir, data, *overrides):
    return build_config(
        overrides=[
            f"model.policy={policy_dir}",
            f"reward.data={data}",
            "reward.epochs=3",
            "reward.batch_size=8",
            "reward.lr=1e-3",
            "reward.eval_fraction=0.25",
            "logging.print_every=0",
            *overrides,
        ]
    )


def test_length_biased_reward_model_shows_negative_correlation_and_pairs_are_filtered(policy_dir, tmp_path):
    # short correct answers are chosen over a long evasion, and (2 of every 8) over a one-character wrong answer:
    # the reward model learns "shorter is better", so its score falls with length on held-out responses.
    pairs = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1) if b >= 6 else "Hmm, hard to say."}
        for a in range(8)
        for b in range(8)
    ]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    torch.manual_seed(0)
    lines = []
    _, held_out = train_reward(reward_config(policy_dir, tmp_path / "pairs.jsonl"), tmp_path / "all", lines.append)
    assert held_out["length_corr"] < -0.5  # -0.92 to -0.98 over seeds 0-2
    assert f"score-length correlation {held_out['length_corr']:+.2f} on 16 pairs" in lines[-1]
    last = read_metrics(tmp_path / "all/metrics.jsonl")[-1]
    assert last["rm/eval_length_corr"] == pytest.approx(held_out["length_corr"])
    assert (last["rm/pairs_kept"], last["rm/pairs_total"]) == (48, 48)

    # max_length_gap=3 keeps only the training pairs whose rejected answer is a number (gap at most 1 character)
    train, _ = split_pairs(pairs, 0.25, 0)
    expected = sum(not r["rejected"].startswith("Hmm") for r in train)
    config = reward_config(policy_dir, tmp_path / "pairs.jsonl", "reward.max_length_gap=3", "reward.epochs=1")
    lines = []
    train_reward(config, tmp_path / "balanced", lines.append)
    assert f"kept {expected} of 48 training pairs (|len(chosen) - len(rejected)| < 3 tokens)" in lines[0]
    last = read_metrics(tmp_path / "balanced/metrics.jsonl")[-1]
    assert (last["rm/pairs_kept"], last["rm/pairs_total"]) == (expected, 48)
