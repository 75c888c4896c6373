"""Pure-maths layer of tether: masked statistics, KL estimators and controllers, reward shaping, GAE, PPO and DPO
losses.

Everything here depends only on torch and takes tensors and plain numbers. Notation: B = batch, T = response
length; ``response_mask`` is (B, T), 1/True on response tokens (EOS included) and 0 on padding.
"""

from tether.algo.advantages import compute_gae
from tether.algo.dpo import dpo_loss
from tether.algo.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    ThresholdKLController,
    kl_controller,
    kl_penalty,
)
from tether.algo.logprobs import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits
from tether.algo.losses import pairwise_reward_loss, ppo_policy_loss, ppo_value_loss
from tether.algo.masked import exact_div, explained_variance, masked_mean, masked_sum, masked_var, masked_whiten
from tether.algo.rewards import last_token_index, shape_rewards
from tether.algo.stats import pearson_correlation

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "ThresholdKLController",
    "kl_controller",
    "compute_gae",
    "dpo_loss",
    "entropy_from_logits",
    "exact_div",
    "explained_variance",
    "kl_penalty",
    "last_token_index",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_reward_loss",
    "pearson_correlation",
    "ppo_policy_loss",
    "ppo_value_loss",
    "shape_rewards",
]
