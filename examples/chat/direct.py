"""A chat-model example: questions with a yes/no answer, a Python reward for answering them directly, and
preference pairs for training a reward model on the same taste (docs/real-models.md).

    python examples/chat/direct.py OUT_DIR    # writes OUT_DIR/prompts.jsonl, OUT_DIR/pairs.jsonl, OUT_DIR/eval.jsonl

Everything is generated here from small word lists: no download.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

FACTS = [  # (statement as a question, true?)
    ("Is the sky blue on a clear day", True),
    ("Is water wet", True),
    ("Is the sun a star", True),
    ("Is the moon made of cheese", False),
    ("Can fish breathe underwater", True),
    ("Can penguins fly", False),
    ("Is ice colder than steam", True),
    ("Do plants need light to grow", True),
    ("Is Paris the capital of France", True),
    ("Is Tokyo in China", False),
    ("Is two plus two equal to five", False),
    ("Do cats bark", False),
    ("Is the Pacific an ocean", True),
    ("Is gold a metal", True),
    ("Can humans breathe in space without help", False),
    ("Is a tomato a fruit", True),
    ("Do spiders have eight legs", True),
    ("Is the Earth flat", False),
    ("Is snow cold", True),
    ("Do bees make honey", True),
    ("Is the Sahara a forest", False),
    ("Can a car run without fuel or a battery", False),
    ("Is English a language", True),
    ("Do trees grow leaves", True),
    ("Is the number seven even", False),
    ("Is a whale a mammal", True),
    ("Does the sun rise in the west", False),
    ("Is glass transparent", True),
    ("Do birds have feathers", True),
    ("Is a square round", False),
    ("Can dogs swim", True),
    ("Is Mount Everest a mountain", True),
]
STYLES = ["{q}?", "Quick question: {q}?", "{q}? Please answer.", "I wonder, {q_lower}?"]
HEDGES = [
    "That is an interesting question that many people ask.",
    "There are many ways to think about this question.",
    "It depends on how you look at it, and there are several factors to consider.",
]


def prompt(question: str, style: str) -> list[dict]:
    text = style.format(q=question, q_lower=question[0].lower() + question[1:])
    return [{"role": "user", "content": text}]


def direct_answer_score(prompts, responses) -> list[float]:
    """1 for an answer that starts with Yes or No, plus 0.5 when it is at most 30 words; 0 otherwise."""
    scores = []
    for response in responses:
        words = response.split()
        direct = bool(re.match(r"\s*(yes|no)\b", response, re.IGNORECASE))
        scores.append(float(direct) + 0.5 * (direct and len(words) <= 30))
    return scores


def write(out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    held_out = set(rng.sample(range(len(FACTS)), 8))
    train = [f for i, f in enumerate(FACTS) if i not in held_out]
    evals = [f for i, f in enumerate(FACTS) if i in held_out]
    rows = {
        "prompts.jsonl": [{"prompt": prompt(q, s)} for q, _ in train for s in STYLES],
        "eval.jsonl": [{"prompt": prompt(q, STYLES[0])} for q, _ in evals],
        "pairs.jsonl": [
            {
                "prompt": prompt(q, s),
                "chosen": [{"role": "assistant", "content": "Yes, it is." if true else "No, it is not."}],
                "rejected": [{"role": "assistant", "content": rng.choice(HEDGES)}],
            }
            for q, true in train
            for s in STYLES
        ],
    }
    for name, records in rows.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "data/chat"))
