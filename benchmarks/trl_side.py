"""TRL half of the tether-vs-TRL PPO speed benchmark.

Runs TRL's own PPO loop (`trl.experimental.ppo.PPOTrainer`, TRL 1.12) for
`--warmup + --iterations` iterations in a single `trainer.train()` call and
times each iteration and its phases:

- generate: TRL's `batch_generation` call (HF `generate` with output_scores);
- score:    the rollout's no-grad passes: reference `forward`, value-model
            `get_reward` and reward-model `get_reward`;
- update:   from the end of the last rollout pass to the end of the
            iteration (advantages, PPO epochs x minibatches, metrics, TRL's
            cleanup and the next prompt batch).

An iteration runs from the start of one `batch_generation` call to the start of
the next (a `TrainerCallback`'s `on_train_end` closes the last), so the phases
cover all of it but the log-softmaxes between the rollout passes. Timing comes
from wrapping TRL's module-level `batch_generation`, `forward` and `get_reward`.

Each iteration works on exactly `--batch` prompts and `--batch x --new-tokens`
new tokens: with `stop_token=None`, TRL clears the policy's
`generation_config.eos_token_id`, so `generate` has no EOS criterion and always
runs `max_new_tokens` steps; the generate wrapper checks this.

The policy and its reference are loaded from `--policy`; the reward model and
the critic are both loaded from `--reward` (as TRL's PPO example does).
Weights are fp32; `--bf16` turns on accelerate's bf16 mixed precision, which
TRL applies to the update's policy+value pass only (generation and the rollout
passes use the bare fp32 models).

Called by the benchmark orchestrator with the TRL venv's interpreter:

    /work/trl-venv/bin/python benchmarks/trl_side.py --policy DIR --reward DIR \
        --prompts FILE.jsonl --batch 16 --mini-batches 2 --epochs 2 \
        --new-tokens 32 --iterations 4 --warmup 1 --seed 0 --threads 2 [--bf16]

It prints one JSON line on stdout (lists cover the measured, post-warmup
iterations only); everything else goes to stderr.
"""

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import transformers
import trl
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
    set_seed,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="HF causal-LM folder with its tokenizer")
    parser.add_argument("--reward", required=True, help="HF sequence-classification folder, num_labels=1")
    parser.add_argument("--prompts", required=True, help='JSONL of {"input_ids": [...]}, all the same length')
    parser.add_argument("--batch", type=int, required=True, help="prompts per iteration")
    parser.add_argument("--mini-batches", type=int, required=True, help="minibatches per PPO epoch")
    parser.add_argument("--epochs", type=int, required=True, help="PPO epochs per iteration")
    parser.add_argument("--new-tokens", type=int, required=True, help="new tokens per prompt")
    parser.add_argument("--iterations", type=int, required=True, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured iterations run first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    parser.add_argument("--bf16", action="store_true", help="accelerate bf16 mixed precision")
    args = parser.parse_args()
    if args.batch % args.mini_batches:
        parser.error("--batch must be a multiple of --mini-batches")
    if args.iterations < 1 or args.warmup < 0:
        parser.error("need --iterations >= 1 and --warmup >= 0")
    return args


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseTimer(TrainerCallback):
    """Times TRL's rollout functions and splits `train()` into PPO iterations.

    An iteration runs from the start of one `batch_generation` call to the start
    of the next (or to the end of training), so TRL's per-iteration cleanup
    (`gc.collect()` twice, cache emptying) counts towards the iteration that made it.
    """

    def __init__(self, new_tokens):
        self.new_tokens = new_tokens
        self.records = []
        self.current = None

    def install(self, module):
        """Replace `batch_generation`, `forward` and `get_reward` in TRL's PPO module."""
        module.batch_generation = self._timed(module.batch_generation, self._on_generate)
        module.forward = self._timed(module.forward, self._on_forward)
        module.get_reward = self._timed(module.get_reward, self._on_score)

    @staticmethod
    def _timed(fn, record):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize()
            record(start, time.perf_counter(), args, out)
            return out

        return wrapper

    def _on_generate(self, start, end, args, out):
        queries, query_responses = args[1], out[0]
        width = query_responses.shape[1] - queries.shape[1]
        if width != self.new_tokens:
            raise RuntimeError(f"generate produced {width} new tokens per row, expected {self.new_tokens}")
        self._close_iteration(start)
        self.current = {
            "start": start,
            "generate": end - start,
            "score": 0.0,
            "rollout_end": end,
            "new_tokens": query_responses.shape[0] * width,
        }

    def _on_forward(self, start, end, args, out):
        # The rollout's reference pass runs under no_grad; the update's policy+value passes do not.
        if not torch.is_grad_enabled():
            self._on_score(start, end, args, out)

    def _on_score(self, start, end, args, out):
        self.current["score"] += end - start
        self.current["rollout_end"] = end

    def _close_iteration(self, end):
        if self.current is not None:
            self.current["iteration"] = end - self.current["start"]
            self.current["update"] = end - self.current["rollout_end"]
            self.records.append(self.current)

    def on_train_end(self, args, state, control, **kwargs):
        synchronize()
        self._close_iteration(time.perf_counter())
        self.current = None


def load_prompts(path, batch):
    with open(path) as f:
        rows = [json.loads(line)["input_ids"] for line in f if line.strip()]
    if len(rows) < batch or len({len(row) for row in rows}) != 1:
        raise ValueError(f"{path}: need at least {batch} prompts, all of the same length")
    return rows


def load_tokenizer(path):
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # As TRL's PPO example does, without resizing embeddings: TRL masks pad ids to 0
        # before every forward pass, and an id past the vocabulary can never be sampled.
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def load_causal_lm(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_scalar_head(path):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)


def build_trainer(args, output_dir, timer):
    # TRL's Accelerator takes its mixed precision from the environment only.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if args.bf16 else "no"
    config = PPOConfig(
        output_dir=output_dir,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on CPU without it
        gradient_checkpointing=False,
        # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps;
        # num_mini_batches then splits it, one optimizer step per minibatch.
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=args.mini_batches,
        num_ppo_epochs=args.epochs,
        local_rollout_forward_batch_size=args.batch,
        total_episodes=args.batch * (args.warmup + args.iterations),
        response_length=args.new_tokens,
        temperature=1.0,
        stop_token=None,
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"input_ids": load_prompts(args.prompts, args.batch)})
    trainer = PPOTrainer(
        args=config,
        processing_class=load_tokenizer(args.policy),
        model=load_causal_lm(args.policy),
        ref_model=load_causal_lm(args.policy),
        reward_model=load_scalar_head(args.reward),
        value_model=load_scalar_head(args.reward),
        train_dataset=dataset,
        callbacks=[timer],
    )
    # TRL always shuffles its train loader; feed the prompts in the order given instead.
    trainer.dataloader = DataLoader(
        dataset, batch_size=args.batch, shuffle=False, collate_fn=trainer.data_collator, drop_last=True
    )
    return trainer


def summarize(records, warmup, iterations):
    if len(records) != warmup + iterations:
        raise RuntimeError(f"timed {len(records)} iterations, expected {warmup + iterations}")
    measured = records[warmup:]
    return {
        "side": "trl",
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "iteration_s": [r["iteration"] for r in measured],
        "phases": {phase: [r[phase] for r in measured] for phase in ("generate", "score", "update")},
        "new_tokens": [r["new_tokens"] for r in measured],
        "new_tokens_per_s": statistics.median(r["new_tokens"] / r["generate"] for r in measured),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "warmup": warmup,
    }


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    set_seed(args.seed)
    timer = PhaseTimer(args.new_tokens)
    timer.install(ppo_trainer)
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as output_dir:
        build_trainer(args, output_dir, timer).train()
    print(json.dumps(summarize(timer.records, args.warmup, args.iterations)))


if __name__ == "__main__":
    main()
