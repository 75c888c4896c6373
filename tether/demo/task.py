"""The embedded task: a tiny arithmetic assistant, and a programmatic gold judge standing in for people.

Prompts are single-digit sums, differences and products (``7*8=``). The assistant's habits, which the SFT data
teaches it, are the tutorial's failure modes in miniature: 40% of the time it *evades* instead of answering ("Hmm,
hard to say.", or the tutorial's empty courtesy "Sure! Happy to help!"), half of its answers are padded with
politeness ("Great question! It is 56."), and 3% of the answers in its data are wrong. The SFT data covers every
prompt (arithmetic is the assistant's prior knowledge); the held-out prompts are never used for preference pairs or
PPO, so they test whether the learned *behaviour* transfers.

The gold judge prefers what a person would: the right number, said once, without filler.
``gold = 1[correct] - 0.01 * filler characters`` (filler capped at 30), so a gold point is a point of correctness.
"""

from __future__ import annotations

import math
import random
import re

from tether.alarms import count_phrases

OPS = "+-*"
ALPHABET = "0123456789+-*=.,!?' " + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
EVASIONS = ["I am not sure.", "Hmm, hard to say.", "Let me think... not sure.", "Sure! Happy to help!"]
PREFIXES = ["Sure! ", "Great question! "]
ANSWERS = ["{}", "It is {}."]
POLITE = ["Sure!", "Great question!", "Happy to help!"]  # the filler phrases of the assistant's habits
FILLER_WEIGHT = 0.01
FILLER_CAP = 30


def all_prompts() -> list[str]:
    """Every prompt of the task: 10 x 10 operand pairs for each of + - *."""
    return [f"{a}{op}{b}=" for op in OPS for a in range(10) for b in range(10)]


def solve(prompt: str) -> int:
    """The true value of a prompt such as '7*8='."""
    match = re.fullmatch(r"(\d)([-+*])(\d)=", prompt)
    if match is None:
        raise ValueError(f"not a task prompt: {prompt!r}")
    a, op, b = int(match[1]), match[2], int(match[3])
    return a + b if op == "+" else a - b if op == "-" else a * b


def split_prompts(eval_count: int, seed: int) -> tuple[list[str], list[str]]:
    """(train prompts, held-out eval prompts); eval prompts are never used for preference pairs or PPO."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    return prompts[eval_count:], prompts[:eval_count]


def _wrong(truth: int, rng: random.Random) -> int:
    return truth + rng.choice([-10, -2, -1, 1, 2, 10])


def assistant_response(prompt: str, rng: random.Random) -> str:
    """One response in the SFT assistant's style: 40% evasive (no answer), else an answer that is 97% right and
    padded with politeness half of the time."""
    if rng.random() < 0.4:
        return rng.choice(EVASIONS)
    truth = solve(prompt)
    value = truth if rng.random() < 0.97 else _wrong(truth, rng)
    prefix = rng.choice(PREFIXES) if rng.random() < 0.5 else ""
    return prefix + rng.choice(ANSWERS).format(value)


def sft_records(count: int, seed: int) -> list[dict]:
    """Supervised examples over all prompts (the assistant's habits, right and wrong alike)."""
    rng = random.Random(seed)
    prompts = all_prompts()
    return [{"prompt": p, "response": assistant_response(p, rng)} for p in (rng.choice(prompts) for _ in range(count))]


def is_correct(prompt: str, response: str) -> bool:
    """True when the response states exactly one number and it is the right one."""
    numbers = set(re.findall(r"-?\d+", response))
    return numbers == {str(solve(prompt))}


def filler_chars(prompt: str, response: str) -> int:
    """Characters beyond the bare answer (at least 0)."""
    return max(0, len(response.strip()) - len(str(solve(prompt))))


def gold_score(prompt: str, response: str) -> float:
    """The gold judge: 1 for a correct answer, minus 0.01 per filler character (at most 0.3)."""
    return float(is_correct(prompt, response)) - FILLER_WEIGHT * min(filler_chars(prompt, response), FILLER_CAP)


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold judge as a reward function (usable as model.reward_model='tether.demo.task:gold_reward')."""
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def bias_feature(bias: str, response: str) -> float:
    """What a biased labeller rewards beyond gold: tens of characters ('length') or filler phrases ('politeness')."""
    if bias == "length":
        return len(response.strip()) / 10
    if bias == "politeness":
        return count_phrases(response, POLITE)
    return 0.0


def balanced(bias: str, a: str, b: str) -> bool:
    """Whether a pair leaves a biased labeller nothing to prefer: lengths within 3 characters ('length'), the same
    number of filler phrases ('politeness'). The tutorial's remedy 3, balanced preference data."""
    if bias == "length":
        return abs(len(a.strip()) - len(b.strip())) < 3
    return bias_feature(bias, a) == bias_feature(bias, b)


def label_pair(
    prompt: str, a: str, b: str, noise: float, rng: random.Random, bias: str = "none", strength: float = 0.0
) -> dict:
    """A preference record for responses a, b: the labeller prefers a with P = sigmoid((u_a - u_b) / noise), where
    u = gold + strength * bias_feature (u = gold without a bias)."""
    gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
    u_a, u_b = (g + strength * bias_feature(bias, r) for g, r in ((gold_a, a), (gold_b, b)))
    p_a = 1.0 / (1.0 + math.exp(-(u_a - u_b) / noise))
    if rng.random() < p_a:
        return {"prompt": prompt, "chosen": a, "rejected": b, "chosen_gold": gold_a, "rejected_gold": gold_b}
    return {"prompt": prompt, "chosen": b, "rejected": a, "chosen_gold": gold_b, "rejected_gold": gold_a}


def sentence_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A changed wish (the tutorial's reward that changes over time): the right number, said as a sentence.
    1 for a correct 'It is N.', 0.5 for a correct answer in any other form, 0 otherwise."""
    return [
        float(is_correct(p, r)) * (1.0 if r.strip() == f"It is {solve(p)}." else 0.5)
        for p, r in zip(prompts, responses)
    ]
