"""The tutorial's TRL snippet ("使用 TRL 函式庫" in ppo-rlhf-tutorial.md) running on tether.

The code inside ``main`` is the tutorial's, with three kinds of change, each marked ``# tether:``:
- the imports: ``from tether import ...`` instead of ``from trl import ...``;
- local folders in a temporary directory instead of hub names: a 2-layer GPT-2 with a character tokenizer as
  "sft_model", and as "reward_model" either a rule that pays the fraction of '7' characters (default; PPO learns it
  within ~10 steps on a CPU) or a randomly initialised sequence-classification model (``--reward model``);
- sizes for a CPU: batch 16, 8 new tokens, and a learning rate for a model trained from scratch.

Run: ``python examples/tutorial_trl.py --steps 20``. Nothing is written outside the temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
from types import SimpleNamespace

import torch
import transformers
from torch.utils.data import DataLoader, RandomSampler
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2LMHeadModel

from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # tether: was `from trl import ...`
from tether.demo.task import ALPHABET, all_prompts
from tether.models import char_tokenizer, new_scalar_model, tiny_config


class SevensRewardModel(torch.nn.Module):
    """A rule with a sequence classifier's call interface: ``logits`` (B, 1) = fraction of '7' among real tokens.

    Args:
        tokenizer: the character tokenizer (to find the id of '7').
    """

    def __init__(self, tokenizer):
        super().__init__()
        self.seven = tokenizer.convert_tokens_to_ids("7")

    def forward(self, input_ids, attention_mask, **kwargs):
        real = attention_mask.bool()
        fraction = ((input_ids == self.seven) & real).sum(-1) / real.sum(-1).clamp(min=1)
        return SimpleNamespace(logits=fraction.float()[:, None])


def build_folders(root: str, seed: int) -> tuple[str, str]:
    """Save a tiny GPT-2 policy ("sft_model") and a random one-output classifier ("reward_model") under ``root``."""
    torch.manual_seed(seed)
    tok = char_tokenizer(ALPHABET)
    sft, rm = f"{root}/sft_model", f"{root}/reward_model"
    GPT2LMHeadModel(tiny_config(len(tok), tok.pad_token_id, tok.eos_token_id)).save_pretrained(sft)
    tok.save_pretrained(sft)
    reward = new_scalar_model(sft)
    reward.config.pad_token_id = tok.pad_token_id
    reward.save_pretrained(rm)
    tok.save_pretrained(rm)
    return sft, rm


def main(steps: int = 20, seed: int = 0, reward: str = "sevens") -> list[dict]:
    """Run the tutorial's loop for ``steps`` batches; returns the stats of every step."""
    history = []
    with tempfile.TemporaryDirectory() as root:
        sft_model, reward_folder = build_folders(root, seed)  # tether: local folders instead of hub names
        # Prompts without a '7', so that only the response can earn the '7' reward.
        prompts_data = [{"prompt": p} for p in all_prompts() if "7" not in p]
        sampler = RandomSampler(
            prompts_data, replacement=True, num_samples=steps * 16, generator=torch.Generator().manual_seed(seed)
        )
        dataloader = DataLoader(prompts_data, batch_size=16, sampler=sampler)

        # ===== 模型設定 =====

        # Policy model（含 value head）
        model = AutoModelForCausalLMWithValueHead.from_pretrained(sft_model)

        # Reference model（同結構，凍結）
        ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(sft_model)
        ref_model.eval()

        # Reward model（Sequence Classification）
        tokenizer = AutoTokenizer.from_pretrained(sft_model)
        if reward == "model":
            reward_model = AutoModelForSequenceClassification.from_pretrained(reward_folder)
        else:  # tether: a rule with the same call interface
            reward_model = SevensRewardModel(tokenizer)
        reward_model.eval()

        # Tokenizer
        tokenizer.pad_token = tokenizer.eos_token

        # ===== PPO 配置 =====
        ppo_config = PPOConfig(
            model_name="sft_model",
            learning_rate=3e-3,  # tether: a from-scratch tiny model (the tutorial: 1.4e-5)
            batch_size=16,  # tether: CPU sizes (the tutorial: 256 and 64)
            mini_batch_size=4,
            ppo_epochs=4,
            # PPO 核心參數
            cliprange=0.2,
            vf_coef=0.5,
            init_kl_coef=0.01,
            # Adaptive KL
            target_kl=6.0,
            adap_kl_ctrl=True,
            # 穩定性
            cliprange_value=0.2,
            max_grad_norm=1.0,
            seed=seed,  # tether: reproducible runs
        )

        # ===== 初始化 PPO Trainer =====
        ppo_trainer = PPOTrainer(
            config=ppo_config,
            model=model,
            ref_model=ref_model,
            tokenizer=tokenizer,
        )

        # ===== 訓練迴圈 =====
        for batch in dataloader:
            prompts = batch["prompt"]

            # Encode prompts
            query_tensors = tokenizer(
                prompts,
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).input_ids

            # Rollout（產生回應）
            response_tensors = ppo_trainer.generate(
                query_tensors,
                max_new_tokens=8,  # tether: the tutorial: 128
                do_sample=True,
                top_p=0.9,
                temperature=1.0,
            )

            # Decode
            responses = tokenizer.batch_decode(
                response_tensors,
                skip_special_tokens=True,
            )

            # ===== Reward 計算 =====
            # 一般是 prompt + response
            reward_texts = [p + r for p, r in zip(prompts, responses)]

            reward_inputs = tokenizer(
                reward_texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
            )

            with torch.no_grad():
                reward_outputs = reward_model(**reward_inputs)
                rewards = reward_outputs.logits.squeeze(-1)

            # ===== PPO Update =====
            stats = ppo_trainer.step(
                query_tensors,
                response_tensors,
                rewards,
            )

            # ===== 監控 =====
            print(f"Mean reward: {stats['ppo/mean_scores']:.2f}")
            print(f"Mean KL: {stats['objective/kl']:.4f}")
            history.append(stats)
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="PPO steps (batches of 16 prompts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reward",
        choices=["sevens", "model"],
        default="sevens",
        help="'sevens': fraction of '7' characters; 'model': a random sequence classifier",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model runs fastest on one thread
    transformers.utils.logging.set_verbosity_error()  # the new reward head's load report, a padding false alarm
    transformers.utils.logging.disable_progress_bar()
    main(args.steps, args.seed, args.reward)
