"""What trimming padding and grouping rows by length save where lengths vary (docs/algorithm.md, "4. Update").

    python benchmarks/padding.py [--iterations 5] [--micro 4] [--out benchmarks/results/padding.json]

The tiny GPT-2 of benchmarks/vs_trl.py (4x256, random weights, a 1,003-token word-level vocabulary) with a separate
critic, 64 prompts of 4-32 words, responses of at most 32 tokens that stop at random (40 of the vocabulary's tokens
end a response, so about 18 tokens on average), minibatches of 16 rows in micro-batches of ``--micro``, 4 epochs,
float32, 2 threads. One trainer, in one process, alternates iterations with the two on and off ("off" hands every
micro-batch and scoring chunk over in row order with all its columns, as before they existed), so the machine's drift
between processes cancels. Reported: the median seconds per iteration, per update and per scoring phase of each.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import vs_trl  # noqa: E402

from tether import rollout as rollout_module  # noqa: E402
from tether import types  # noqa: E402
from tether.config import build_config  # noqa: E402
from tether.tracking import read_metrics  # noqa: E402
from tether.trainers import update as update_module  # noqa: E402
from tether.trainers.ppo import PPOTrainer  # noqa: E402


def in_row_order(prompt_mask: torch.Tensor, response_mask: torch.Tensor, size: int):
    """``types.length_groups`` as it was before it: consecutive rows, every column."""
    for start in range(0, prompt_mask.shape[0], size):
        yield torch.arange(start, min(start + size, prompt_mask.shape[0])), (0, response_mask.shape[1])


def switch(on: bool) -> None:
    """Trimming and length order on or off, where the update and the scoring look them up."""
    for module in (rollout_module, update_module):
        module.length_groups = types.length_groups if on else in_row_order


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=5, help="timed iterations of each, alternating")
    p.add_argument("--micro", type=int, default=4, help="ppo.micro_batch_size")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "padding.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tiny = vs_trl.tiny_folder(work)
        reward = vs_trl.reward_folder(tiny, work)
        rng = random.Random(0)
        lines = vs_trl.prompt_file(tiny, 256, work).read_text().splitlines()
        prompts = [" ".join(json.loads(line)["prompt"].split()[: rng.randint(4, 32)]) for line in lines]
        overrides = [
            f"model.policy={tiny}", f"model.reward_model={reward}", "model.value_model=separate",
            f"model.value_init={reward}", "model.device=cpu", "ppo.steps=1", "ppo.rollout_batch_size=64",
            "ppo.mini_batch_size=16", f"ppo.micro_batch_size={args.micro}", "ppo.ppo_epochs=4",
            "sampling.max_new_tokens=32", "sampling.max_prompt_length=32", "ppo.kl_stop=none", "ppo.save_every=0",
        ]  # fmt: skip
        config = build_config(None, overrides)
        config.output_dir = str(work / "run")
        trainer = PPOTrainer.from_config(config)
        trainer.stops = [*trainer.stops, *range(3, 43)]  # "w0".."w39" end a response too
        trainer.train(prompts, work / "run", echo=lambda *a, **k: None)  # warm-up
        rows = {"off": [], "on": []}
        for i in range(2 * args.iterations):
            mode = "on" if i % 2 else "off"
            switch(mode == "on")
            config.ppo.steps += 1
            trainer.train(prompts, work / "run", echo=lambda *a, **k: None)
            rows[mode].append(read_metrics(work / "run" / "metrics.jsonl")[-1])
        switch(True)
    result = {"micro_batch_size": args.micro, "iterations": args.iterations}
    for mode, records in rows.items():
        result[mode] = {
            "s_per_iter": statistics.median(r["time/step"] for r in records),
            "update_s": statistics.median(r["time/step"] - r["time/rollout"] for r in records),
            "score_s": statistics.median(r["time/score"] for r in records),
            "response_length": statistics.median(r["response/length"] for r in records),
        }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
