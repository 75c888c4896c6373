"""Iterative RLHF: labelling rules by hand, and `tether iterate` end to end on the tiny models."""

import json
import subprocess
import sys

import pytest

import random

import torch

from tether.config import RunConfig
from tether.data import read_jsonl, write_jsonl
from tether.iterate import label_by_scores, sample_pairs
from tether.models import load_causal_lm, load_tokenizer
from tether.precision import Placement
from tether.tracking import read_metrics

PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7=", "3*3=", "8-1=", "5+4=", "6*2="]
LABELLER = "def score(prompts, responses):\n    return [r.count('1') - r.count('0') for r in responses]\n"


def tether(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_label_by_scores_orders_pairs_and_drops_ties():
    triples = [("1+1=", "2", "22"), ("2+2=", "4", "44"), ("3+3=", "6", "x")]
    records = label_by_scores(triples, lambda prompts, responses: [len(r) for r in responses])
    assert records == [
        {"prompt": "1+1=", "chosen": "22", "rejected": "2"},
        {"prompt": "2+2=", "chosen": "44", "rejected": "4"},
    ]  # "6" and "x" score the same: no preference, no pair


def test_pairs_against_the_reference_take_the_second_response_from_it(policy_dir):
    """iterate.compare=reference: each pair is (current policy's response, reference's response)."""
    config = RunConfig()
    config.sampling.max_new_tokens = 6
    config.model.device = "cpu"
    tokenizer, placement = load_tokenizer(policy_dir), Placement.from_config(config.model)
    policy, other = load_causal_lm(policy_dir), load_causal_lm(policy_dir)

    def eos_first(module, inputs, logits):  # a reference that always ends at once: its responses are empty
        logits[..., tokenizer.eos_token_id] += 1e4
        return logits

    other.lm_head.register_forward_hook(eos_first)
    torch.manual_seed(0)
    pairs = sample_pairs(policy, tokenizer, PROMPTS, 20, config, placement, random.Random(0), other=other)
    assert len(pairs) == 20 and all(b == "" and a != "" for _, a, b in pairs)
    both = sample_pairs(policy, tokenizer, PROMPTS, 20, config, placement, random.Random(0))
    assert sum(b != "" for _, _, b in both) > 10  # without a reference, both come from the policy


@pytest.mark.slow
def test_iterate_retrains_the_reward_model_and_continues_ppo_on_the_same_reference(tmp_path, tiny_ppo_args):
    (tmp_path / "labeller.py").write_text(LABELLER)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    old = [{"prompt": p, "chosen": "1", "rejected": "0"} for p in PROMPTS] * 3
    write_jsonl(tmp_path / "pairs.jsonl", old)
    ppo = tether("ppo", *tiny_ppo_args, "ppo.prompts=prompts.jsonl", "ppo.lr=1e-2", "output_dir=first", cwd=tmp_path)
    assert ppo.returncode == 0, ppo.stderr
    result = tether(
        "iterate",
        "first",
        "iterate.labeller=labeller:score",
        "iterate.pairs=24",
        "iterate.steps=2",
        "reward.data=pairs.jsonl",
        "reward.epochs=1",
        "reward.batch_size=8",
        "output_dir=again",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    (report,) = summary["rounds"]
    assert 0 < report["new_pairs"] <= 24 and 0 <= report["rm_accuracy_before"] <= 1
    assert "round 1:" in result.stdout and "reward-model accuracy on held-out new pairs" in result.stdout
    round_dir = tmp_path / "again" / "round-1"
    new = read_jsonl(round_dir / "data" / "new_pairs.jsonl", ("prompt", "chosen", "rejected"))
    held = read_jsonl(round_dir / "data" / "new_held_out.jsonl", ("prompt", "chosen", "rejected"))
    assert len(new) + len(held) == report["new_pairs"]
    for r in new:  # labelled by the user's function: the chosen one scores higher
        assert r["chosen"].count("1") - r["chosen"].count("0") > r["rejected"].count("1") - r["rejected"].count("0")
    assert len(read_jsonl(round_dir / "data" / "pairs.jsonl", ("prompt",))) == len(old) + len(new)  # old + new
    assert (round_dir / "reward" / "model" / "config.json").is_file()
    assert summary["policy"] == str(round_dir / "ppo" / "model")
    # the round starts from the trained policy but is tethered to the first policy: KL > 0 at its first rollout,
    # where a fresh run (policy = reference) starts at exactly 0
    first_kl = read_metrics(tmp_path / "first" / "metrics.jsonl")[0]["kl/ref"]
    round_kl = read_metrics(round_dir / "ppo" / "metrics.jsonl")[0]["kl/ref"]
    assert abs(first_kl) < 1e-5 and abs(round_kl) > 0.01  # the k1 estimate of a sample may be negative


def test_iterate_bad_input_is_one_line(tmp_path, tiny_ppo_args):
    result = tether("iterate", "nowhere", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "tether: nowhere: not a run folder (no config.yaml)"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    result = tether("iterate", "run", cwd=tmp_path)
    assert result.returncode == 2 and "no trained policy" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_iterate_with_review_ratings_as_labels(tmp_path, tiny_ppo_args):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": "1", "rejected": "0"} for p in PROMPTS] * 3)
    assert tether("ppo", *tiny_ppo_args, "ppo.prompts=prompts.jsonl", "output_dir=first", cwd=tmp_path).returncode == 0
    drawn = tether("review", "first", "--prompts", "prompts.jsonl", "-n", "16", "--export", "s.jsonl", cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    for i, sample in enumerate(samples):  # a reviewer who likes every other answer
        sample["rating"] = 5 if i % 2 == 0 else 2
    write_jsonl(tmp_path / "rated.jsonl", samples)
    assert tether("review", "first", "--ratings", "rated.jsonl", cwd=tmp_path).returncode == 0
    args = ["iterate.labeller=review", "iterate.steps=1", "reward.data=pairs.jsonl", "reward.epochs=1"]
    result = tether("iterate", "first", *args, "output_dir=again", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    new = read_jsonl(tmp_path / "again" / "round-1" / "data" / "new_pairs.jsonl", ("prompt", "chosen", "rejected"))
    held = read_jsonl(tmp_path / "again" / "round-1" / "data" / "new_held_out.jsonl", ("prompt",))
    from tether.review import rated_samples

    rating = {(s["prompt"], s["response"]): s["rating"] for s in rated_samples(tmp_path / "first")}
    for r in new:  # every new pair is two reviewed responses, the higher-rated one chosen
        assert rating[(r["prompt"], r["chosen"])] > rating[(r["prompt"], r["rejected"])]
    assert (
        len(new) + len(held) == json.loads((tmp_path / "again" / "summary.json").read_text())["rounds"][0]["new_pairs"]
    )
    again = tether("iterate", "first", *args, "iterate.rounds=2", "output_dir=twice", cwd=tmp_path)
    assert again.returncode == 2 and "ratings exist for one policy only" in again.stderr
