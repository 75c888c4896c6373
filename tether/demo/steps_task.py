"""A built-in multi-step task: evaluate ``3+4*2-5=`` in written steps, each step checkable on its own.

The tutorial's situation 3 (前言: 複雜的多步驟推理, "each step has a score, and only the end tells right from
wrong") in miniature. A prompt is 2 or 3 operations on the digits 1-9; the response works it out one operation at
a time, multiplications first, then left to right, and ends with the answer:

    3+4*2-5=   ->   4*2=8, 3+8=11, 11-5=6. 6

The SFT assistant slips: each step's result is off by a little 12% of the time, and 15% of the time it ignores
precedence and works strictly left to right. A slip carries into the steps after it, so the answer is wrong.

- :func:`check_steps` marks each written step correct or not: it must be the operation due next (the first ``*``,
  else the leftmost operation) on the expression as rewritten by the steps before it, with the right result. A
  step after a slip is judged on the slipped expression, so one slip costs one step, not all that follow.
- :func:`gold_reward` is the judge: 1 when the final answer is the true value, else 0.
- :func:`outcome_reward` is the same as a reward function (outcome only); :func:`step_reward` adds
  ``STEP_WEIGHT`` for every correct step, on the token where the step ends (``(end, score)`` pairs, see
  ``tether.rewards.FunctionScorer``).
"""

from __future__ import annotations

import random
import re

ALPHABET = "0123456789+-*=., "
DIGITS = range(1, 10)
STEP_SLIP = 0.12  # a step's result off by a little
ORDER_SLIP = 0.15  # an expression worked strictly left to right, ignoring precedence
STEP_WEIGHT = 0.25  # the step reward: per correct step, on its last token
STEP = re.compile(r"(-?\d+)([-+*])(\d+)=(-?\d+)")
ANSWER = re.compile(r"\. (-?\d+)$")


def random_prompt(rng: random.Random) -> str:
    """A prompt of 2 or 3 operations on the digits 1-9, e.g. ``3+4*2-5=``."""
    ops = [rng.choice("+-*") for _ in range(rng.choice((2, 3)))]
    numbers = [rng.choice(DIGITS) for _ in range(len(ops) + 1)]
    return "".join(f"{n}{op}" for n, op in zip(numbers, ops)) + f"{numbers[-1]}="


def split_prompts(train_count: int, eval_count: int, seed: int) -> tuple[list[str], list[str]]:
    """(PPO prompts, held-out prompts), distinct; held-out prompts are never trained on (SFT data avoids them).
    The held-out prompts are drawn first, so they depend on ``seed`` and ``eval_count`` only."""
    rng, held_out, train = random.Random(seed), {}, {}
    while len(held_out) < eval_count:
        held_out[random_prompt(rng)] = None
    while len(train) < train_count:
        prompt = random_prompt(rng)
        if prompt not in held_out:
            train[prompt] = None
    return list(train), list(held_out)


def parse(prompt: str) -> list:
    """``'3+4*2-5='`` -> ``[3, '+', 4, '*', 2, '-', 5]``."""
    if re.fullmatch(r"\d([-+*]\d)+=", prompt) is None:
        raise ValueError(f"not a steps-task prompt: {prompt!r}")
    return [int(t) if t.isdigit() else t for t in re.findall(r"\d+|[-+*]", prompt)]


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def due(expression: list) -> int:
    """Index of the operator to work out next: the first ``*``, else the leftmost."""
    return expression.index("*") if "*" in expression else 1


def solve(prompt: str) -> int:
    """The true value, with precedence."""
    expression = parse(prompt)
    while len(expression) > 1:
        i = due(expression)
        expression[i - 1 : i + 2] = [apply(*expression[i - 1 : i + 2])]
    return expression[0]


def assistant_response(prompt: str, rng: random.Random, step_slip: float = STEP_SLIP, order_slip: float = ORDER_SLIP):
    """One response in the SFT assistant's style, slips included: ``'4*2=8, 3+8=11, 11-5=6. 6'``."""
    expression, steps = parse(prompt), []
    left_to_right = rng.random() < order_slip
    while len(expression) > 1:
        i = 1 if left_to_right else due(expression)
        a, op, b = expression[i - 1 : i + 2]
        value = apply(a, op, b)
        if rng.random() < step_slip:
            value += rng.choice([-10, -2, -1, 1, 2, 10])
        steps.append(f"{a}{op}{b}={value}")
        expression[i - 1 : i + 2] = [value]
    return ", ".join(steps) + f". {expression[0]}"


def sft_records(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``count`` supervised examples on random prompts (not those in ``exclude``: the held-out ones), in the
    assistant's style, slips included."""
    rng, records = random.Random(seed), []
    while len(records) < count:
        prompt = random_prompt(rng)
        if prompt not in exclude:
            records.append({"prompt": prompt, "response": assistant_response(prompt, rng)})
    return records


def check_steps(prompt: str, response: str) -> list[tuple[int, bool]]:
    """``(end, correct)`` for each written step of ``response``: ``end`` is the exclusive character offset where the
    step ends; correct means it is the operation due next on the expression as the steps before it left it (a step
    that matches no operation there ends the checking: it and the rest are wrong), with the right result."""
    expression, marks = parse(prompt), []
    body = response[: response.rfind(". ")] if ". " in response else response
    for match in STEP.finditer(body):
        a, op, b, written = int(match[1]), match[2], int(match[3]), int(match[4])
        found = [i for i in range(1, len(expression), 2) if expression[i - 1 : i + 2] == [a, op, b]]
        if not found:  # nothing to rewrite: this step and the rest are wrong
            marks += [(m.end(), False) for m in STEP.finditer(body, match.start())]
            break
        i = due(expression) if due(expression) in found else found[0]
        marks.append((match.end(), i == due(expression) and written == apply(a, op, b)))
        expression[i - 1 : i + 2] = [written]
    return marks


def final_answer(response: str) -> int | None:
    """The number after the last ``'. '`` at the end of the response, or None."""
    match = ANSWER.search(response.strip())
    return int(match[1]) if match else None


def is_correct(prompt: str, response: str) -> bool:
    return final_answer(response) == solve(prompt)


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold judge (``model.gold_reward='tether.demo.steps_task:gold_reward'``): 1 for the right final answer."""
    return [float(is_correct(p, r)) for p, r in zip(prompts, responses)]


def outcome_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Outcome-only reward: the gold judge's score, on the last token."""
    return gold_reward(prompts, responses)


def step_reward(prompts: list[str], responses: list[str]) -> list[list[tuple[int, float]]]:
    """Step reward: ``STEP_WEIGHT`` on the token where each correct step ends, plus the outcome on the last token."""
    return [
        [(end, STEP_WEIGHT) for end, correct in check_steps(p, r) if correct] + [(len(r), float(is_correct(p, r)))]
        if r
        else 0.0  # an empty response: no character for a pair to end on
        for p, r in zip(prompts, responses)
    ]
