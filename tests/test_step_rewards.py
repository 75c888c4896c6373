"""Step rewards: ``(end, score)`` pairs from a reward function land on the token that holds character ``end - 1``
(tether.rewards.FunctionScorer), flow through the per-token reward and GAE (hand-computed returns), a step-scoring
reward model reads its score at marker tokens, the built-in steps task checks each step, and a tiny PPO run with a
step reward function works end to end."""

import math
import random
import sys
from bisect import bisect_right

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tether.config import build_config
from tether.data import prompt_batch
from tether.demo import steps_task
from tether.errors import TetherError
from tether.models import load_reward_model
from tether.passes import token_scalars
from tether.rewards import FunctionScorer, RewardModelScorer, char_ends, decode_texts
from tether.trainers.ppo import PPOTrainer
from tether.tracking import read_metrics
from tether.types import Rollout

PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7=", "3*3=", "8-1=", "5+4=", "6*2="]


def response_batch(tokenizer, prompts: list[str], responses: list[str]):
    """(prompt_ids, prompt_mask, response_ids, response_mask): each response encoded, then EOS, right-padded."""
    prompt_ids, prompt_mask = prompt_batch(tokenizer, prompts, 32)
    rows = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in responses]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return prompt_ids, prompt_mask, ids, mask


def score(tokenizer, fn, prompts, responses):
    return FunctionScorer(fn, "steps").score_steps(*response_batch(tokenizer, prompts, responses), tokenizer)


# ---- where a pair lands ----------------------------------------------------------------------------------------


def test_pairs_land_on_the_token_holding_character_end_minus_1(tokenizer):
    # "12,34" + EOS on the character tokenizer: tokens 1 2 , 3 4 <eos> at t = 0..5
    # (2, 0.25): character 1 ('2') -> t=1;  (3, 0.5): character 2 (',') -> t=2;  (3, 0.125) adds on t=2
    # (5, 1.0): end = len(response) -> the last response token, the EOS at t=5: the outcome score
    def fn(prompts, responses):
        return [[(2, 0.25), (3, 0.5), (5, 1.0), (3, 0.125)], 7.0]

    raw, steps = score(tokenizer, fn, ["1+1=", "2+2="], ["12,34", "4"])
    assert raw.tolist() == [1.0, 7.0]
    assert steps.tolist() == [[0.0, 0.25, 0.625, 0.0, 0.0, 0.0], [0.0] * 6]


def test_a_list_of_one_outcome_pair_is_the_same_as_a_number(tokenizer):
    raw, steps = score(tokenizer, lambda p, r: [[(len(r[0]), 2.0)], 3.0], ["1+1=", "2+2="], ["ab", "4"])
    assert raw.tolist() == [2.0, 3.0] and steps is None
    assert score(tokenizer, lambda p, r: [[], 3.0], ["1+1=", "2+2="], ["ab", "4"])[0].tolist() == [0.0, 3.0]
    # the plain call (what a gold judge or an evaluation reads) is the total: outcome plus steps
    batch = response_batch(tokenizer, ["1+1=", "2+2="], ["12,34", "4"])
    total = FunctionScorer(lambda p, r: [[(3, 0.5), (5, 1.0)], 7.0])(*batch, tokenizer=tokenizer)
    assert total.tolist() == [1.5, 7.0]


def test_a_step_that_ends_on_the_last_token_of_a_response_without_eos_is_the_outcome(tokenizer):
    prompt_ids, prompt_mask = prompt_batch(tokenizer, ["1+1="], 32)
    ids = torch.tensor([tokenizer.encode("12", add_special_tokens=False)])  # truncated: no EOS
    raw, steps = FunctionScorer(lambda p, r: [[(1, 0.5), (2, 1.0)]]).score_steps(
        prompt_ids, prompt_mask, ids, torch.ones_like(ids), tokenizer
    )
    assert raw.tolist() == [1.0] and steps.tolist() == [[0.5, 0.0]]


def byte_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained here: merged multi-character tokens, and characters outside the
    training text split into byte tokens that decode to U+FFFD until the character is complete."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["4*2=8, 3+8=11, 11-5=6. 6", "café au lait", "steps ✓ done ✓"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("text", ["4*2=8, 3+8=11. 11", "café ✓ 😀 ok", "😀", "über 11"])
def test_char_to_token_matches_the_tokenizers_offsets_on_byte_level_bpe(text):
    tok = byte_bpe_tokenizer()
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded.input_ids, encoded.offset_mapping
    ends = char_ends(tok, ids + [tok.eos_token_id])
    assert len(ends) == len(ids) + 1 and ends[-1] == ends[-2] == len(text)  # EOS completes no character
    for c in range(len(text)):
        # the reference: the last token whose span holds c (a split character is complete at its last byte token)
        want = max(k for k, (start, stop) in enumerate(offsets) if start <= c < stop)
        assert bisect_right(ends, c) == want, (text, c)
    if text == "café ✓ 😀 ok":  # the emoji is four byte tokens; only the fourth completes it
        assert [tok.decode([i]) for i in ids[3:7]] == ["\ufffd"] * 4 and bisect_right(ends, 7) == 6


def test_pairs_on_a_bpe_tokenizer_land_on_merged_and_multi_byte_tokens():
    tok = byte_bpe_tokenizer()
    text = "café ✓ 😀 ok"  # tokens: 'café' ' ✓' ' ' 4 x byte of 😀 ' ' 'o' 'k' <eos>
    prompt_ids = torch.tensor([tok.encode("q", add_special_tokens=False)])
    ids = torch.tensor([tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]])
    fn = FunctionScorer(lambda p, r: [[(1, 0.5), (4, 1.0), (6, 2.0), (8, 4.0), (len(text), 8.0)]], "bpe")
    raw, steps = fn.score_steps(prompt_ids, torch.ones_like(prompt_ids), ids, torch.ones_like(ids), tok)
    assert raw.tolist() == [8.0]
    # 'c' and 'é' are both in 'café' (t=0); '✓' in ' ✓' (t=1); the emoji's last byte token is t=6
    assert steps.tolist() == [[1.5, 2.0, 0, 0, 0, 0, 4.0, 0, 0, 0, 0]]


# ---- bad returns -------------------------------------------------------------------------------------------


W = "reward function 'steps': "


@pytest.mark.parametrize(
    "returned, message",
    [
        ([[(0, 1.0)], 1.0], W + "response 0: step end 0 is outside 1..5 (the response has 5 characters)"),
        ([1.0, [(2, 1.0)]], W + "response 1: step end 2 is outside 1..1 (the response has 1 characters)"),
        ([[(1.5, 1.0)], 1.0], W + "response 0: a step end must be an int character offset; got 1.5"),
        ([[(1, 1.0, 2)], 1.0], W + "response 0: expected (end, score) pairs; got (1, 1.0, 2)"),
        ([[(1, "x")], 1.0], W + "response 0: expected a number as the step score; got 'x'"),
        ([[(1, 1.0)], "x"], W + "response 1: expected a number or a list of (end, score) pairs; got 'x'"),
        ([[(1, 1.0)]], "reward function 'steps' returned 1 scores for 2 responses"),
    ],
)
def test_bad_returns_are_one_line_errors_naming_the_function_and_response(tokenizer, returned, message):
    with pytest.raises(TetherError) as error:
        score(tokenizer, lambda p, r: returned, ["1+1=", "2+2="], ["12,34", "4"])
    assert str(error.value) == message and "\n" not in str(error.value)


def test_a_non_finite_step_score_makes_that_response_lose_its_signal(tokenizer):
    raw, steps = score(
        tokenizer, lambda p, r: [[(2, math.nan), (5, 1.0)], [(1, 0.5), (2, 1.0)]], ["a", "b"], ["12,34", "12"]
    )
    assert math.isnan(raw[0]) and raw[1] == 1.0  # the PPO guard replaces the NaN by the batch mean and counts it
    assert steps[0].tolist() == [0.0] * 6 and steps[1].tolist()[:3] == [0.5, 0.0, 0.0]


# ---- the naive reference: returns by hand ------------------------------------------------------------------


def test_two_step_scores_give_the_hand_computed_returns(tiny_ppo_args, tmp_path, tokenizer):
    # "12,34" + EOS, a step score 0.25 ending at '2' (t=1) and 0.5 at ',' (t=2), the outcome 1.0 on the EOS (t=5);
    # policy = reference (KL 0), so r = [0, 0.25, 0.5, 0, 0, 1]. gamma = 1, lambda = 0.5, V = 0.5 everywhere:
    # delta_t = r_t + V_{t+1} - V_t:   delta = [0, 0.25, 0.5, 0, 0, 1 + 0 - 0.5 = 0.5]
    # A_t = delta_t + 0.5 * A_{t+1}:    A5 = 0.5, A4 = 0.25, A3 = 0.125, A2 = 0.5625, A1 = 0.53125, A0 = 0.265625
    # R = A + V = [0.765625, 1.03125, 1.0625, 0.625, 0.75, 1.0]
    config = build_config(
        overrides=[*tiny_ppo_args, "ppo.gamma=1.0", "ppo.gae_lambda=0.5", "model.device=cpu", f"output_dir={tmp_path}"]
    )
    trainer = PPOTrainer.from_config(config)
    batch = response_batch(tokenizer, ["1+1="], ["12,34"])
    raw, steps = FunctionScorer(lambda p, r: [[(2, 0.25), (3, 0.5), (5, 1.0)]]).score_steps(*batch, tokenizer)
    zeros = torch.zeros(1, 6)
    rollout = Rollout(
        *batch,
        logprobs=zeros,
        ref_logprobs=zeros,
        values=torch.full((1, 6), 0.5),
        scores=raw,
        raw_scores=raw,
        ended=torch.tensor([True]),
        entropy=zeros,
        step_scores=steps,
    )
    rollout = trainer.compute_advantages(trainer.compute_rewards(rollout))
    torch.testing.assert_close(rollout.rewards, torch.tensor([[0.0, 0.25, 0.5, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(rollout.returns, torch.tensor([[0.765625, 1.03125, 1.0625, 0.625, 0.75, 1.0]]))


# ---- a reward model that scores steps ------------------------------------------------------------------------


def test_a_reward_model_reads_step_scores_at_marker_tokens(reward_dir, tokenizer):
    model = load_reward_model(reward_dir).eval()
    comma = tokenizer.convert_tokens_to_ids(",")
    batch = response_batch(tokenizer, ["1+1=", "2+2="], ["1,2,3", "4"])
    raw, steps = RewardModelScorer(model, tokenizer.eos_token_id, step_id=comma).score_steps(*batch)
    ids, mask = torch.cat(batch[::2], 1), torch.cat(batch[1::2], 1)
    per_token = token_scalars(model, ids, mask, tokenizer.eos_token_id)[:, batch[0].shape[1] :]
    torch.testing.assert_close(steps[0, [1, 3]], per_token[0, [1, 3]])  # the two commas
    assert steps[0].count_nonzero() == 2 and steps[1].count_nonzero() == 0
    torch.testing.assert_close(raw, RewardModelScorer(model, tokenizer.eos_token_id)(*batch))
    with_steps = RewardModelScorer(model, tokenizer.eos_token_id, step_id=comma)(*batch)
    torch.testing.assert_close(with_steps, raw + steps.sum(-1))
    with pytest.raises(TetherError, match="model.step_marker needs a reward model that reads the policy's tokens"):
        RewardModelScorer(model, tokenizer.eos_token_id, rm_tokenizer=tokenizer, step_id=comma)


def test_step_marker_config_reaches_the_reward_model_scorer(tiny_ppo_args, tmp_path, tokenizer):
    args = [*tiny_ppo_args, "model.device=cpu", f"output_dir={tmp_path}"]
    trainer = PPOTrainer.from_config(build_config(overrides=[*args, "model.step_marker=','"]))
    assert trainer.scorer.step_id == tokenizer.convert_tokens_to_ids(",")
    with pytest.raises(TetherError, match=r"model.step_marker '1\+' is 2 tokens of the policy's tokenizer"):
        PPOTrainer.from_config(build_config(overrides=[*args, "model.step_marker=1+"]))


# ---- the built-in steps task -------------------------------------------------------------------------------


def test_steps_task_solves_and_checks_each_step():
    assert steps_task.solve("3+4*2-5=") == 6 and steps_task.solve("2*9-6*9=") == -36
    assert steps_task.check_steps("3+4*2-5=", "4*2=8, 3+8=11, 11-5=6. 6") == [(5, True), (13, True), (21, True)]
    # precedence ignored: the first step is not the one due; the next is judged on the expression it left (7*2-5)
    assert steps_task.check_steps("3+4*2-5=", "3+4=7, 7*2=14, 14-5=9. 9") == [(5, False), (13, True), (21, True)]
    # an arithmetic slip costs its own step only
    assert steps_task.check_steps("3+4*2-5=", "4*2=9, 3+9=12, 12-5=7. 7") == [(5, False), (13, True), (21, True)]
    # a step that matches nothing ends the checking
    assert steps_task.check_steps("3+4*2-5=", "4*2=8, 1+1=2, 3+8=11. 11") == [(5, True), (12, False), (20, False)]
    assert steps_task.gold_reward(["3+4*2-5="] * 3, ["4*2=8, 3+8=11, 11-5=6. 6", "x. 6", "6"]) == [1.0, 1.0, 0.0]
    response = "4*2=9, 3+9=12, 12-5=7. 7"
    assert steps_task.step_reward(["3+4*2-5="] * 2, [response, ""]) == [[(13, 0.25), (21, 0.25), (24, 0.0)], 0.0]


def test_steps_task_sft_data_slips_at_its_rates_and_avoids_held_out_prompts():
    train, held_out = steps_task.split_prompts(500, 100, seed=0)
    assert not set(train) & set(held_out) and len(set(train)) == 500
    records = steps_task.sft_records(3000, seed=0, exclude=set(held_out))
    assert not {r["prompt"] for r in records} & set(held_out)
    marks = [c for r in records for _, c in steps_task.check_steps(r["prompt"], r["response"])]
    assert 0.80 < sum(marks) / len(marks) < 0.90  # 12% arithmetic slips, plus precedence slips
    clean = random.Random(0)
    assert all(steps_task.is_correct(p, steps_task.assistant_response(p, clean, 0.0, 0.0)) for p in train[:200])
    assert set("".join(r["prompt"] + r["response"] for r in records)) <= set(steps_task.ALPHABET + "=")


def test_steps_task_step_reward_lands_on_the_last_digit_of_each_correct_step(tokenizer):
    prompts, responses = ["3+4*2-5="] * 2, ["4*2=8, 3+8=11, 11-5=6. 6", "4*2=9, 3+9=12, 12-5=7. 7"]
    raw, steps = score(tokenizer, steps_task.step_reward, prompts, responses)
    assert raw.tolist() == [1.0, 0.0]
    assert steps[0].nonzero().flatten().tolist() == [4, 12, 20]  # '8', the second '1' of 11, '6'
    assert steps[1].nonzero().flatten().tolist() == [12, 20] and steps.max() == steps_task.STEP_WEIGHT


# ---- end to end ------------------------------------------------------------------------------------------


STEP_REWARDS = """
def steps(prompts, responses):
    # 0.1 on every digit, the outcome 1 for a short response, a plain number for an empty one
    return [[(i + 1, 0.1) for i, c in enumerate(r[:-1]) if c.isdigit()] + [(len(r), float(len(r) < 4))] if r else 0.0
            for r in responses]
"""


def test_a_tiny_ppo_run_with_a_step_reward_function(tiny_ppo_args, tmp_path, monkeypatch, tokenizer):
    (tmp_path / "step_rewards_fn.py").write_text(STEP_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "step_rewards_fn", raising=False)
    config = build_config(
        overrides=[
            *tiny_ppo_args,
            "model.reward_model=step_rewards_fn:steps",
            "model.device=cpu",
            "ppo.steps=3",
            "sampling.max_new_tokens=12",
            f"output_dir={tmp_path}",
        ]
    )
    torch.manual_seed(0)
    trainer = PPOTrainer.from_config(config)
    seen = []

    def check(trainer, rollout):
        prompts, responses = decode_texts(
            trainer.tokenizer, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
        )
        from step_rewards_fn import steps

        want = [sum(s for _, s in r) if isinstance(r, list) else r for r in steps(prompts, responses)]
        total = rollout.raw_scores + (0 if rollout.step_scores is None else rollout.step_scores.sum(-1))
        torch.testing.assert_close(total, torch.tensor(want))
        seen.append(rollout)

    trainer.train(PROMPTS, tmp_path, echo=lambda *a: None, on_step=check)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["loss/total"]) for r in rows)
    with_steps = [(row, r) for row, r in zip(rows, seen) if r.step_scores is not None]
    assert with_steps, "the untrained policy writes digits: some steps were scored"
    for row, rollout in with_steps:
        mask = rollout.response_mask.float()
        assert row["reward/steps"] == pytest.approx((rollout.step_scores * mask).sum(-1).mean().item())
        # the step scores are in the rewards, where they stand (GAE then carries them back)
        last = mask.sum(-1).long() - 1
        kl_part = -trainer.kl_ctl.value * rollout.kl
        expected = kl_part + rollout.step_scores
        expected[torch.arange(len(rollout)), last] += rollout.scores
        torch.testing.assert_close(rollout.rewards, expected * mask)
