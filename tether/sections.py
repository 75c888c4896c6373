"""The sections of a run's configuration, one dataclass per concern (:class:`tether.config.RunConfig` holds them).

Every field has one docstring line below it; `tether <command> --help` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    policy: str = "tiny"
    """Policy: a local Hugging Face causal-LM folder; 'tiny' (a new, untrained GPT-2) is only for tether sft."""
    tokenizer: str = ""
    """Tokenizer folder; empty means the policy folder (or the built-in character tokenizer for 'tiny')."""
    reward_model: str = ""
    """Reward model: a sequence-classification folder, or a Python callable (module:function or file.py:function)."""
    step_marker: str = ""
    """A reward model that scores steps: its score is also read at every response token equal to this (one) token."""
    reference: str = ""
    """Frozen reference policy folder; empty means a copy of model.policy (iterative RLHF keeps the first policy)."""
    gold_reward: str = ""
    """A held-out judge (reward-model folder or module:function) scored on every rollout, never trained on."""
    value_model: Literal["head", "separate"] = "head"
    """Value model: a scalar 'head' on the policy trunk, or a 'separate' critic model."""
    value_init: str = ""
    """Folder a separate critic starts from; empty means the reward model folder, else the policy."""
    trust_remote_code: bool = False
    """Allow model folders to run their own Python code (off unless you trust the folder)."""
    device: str = "auto"
    """Device: 'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision: bfloat16 = bf16 autocast, float32 master weights, bf16 frozen roles and saved models (no float16)."""
    master_weights: Literal["float32", "dtype"] = "float32"
    """Trained weights and Adam state: float32, or 'dtype' (model.dtype: less memory; small updates round away)."""
    lora_r: int = 0
    """LoRA rank; 0 = train all weights."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the adapter's update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA adapter's input (0 keeps log-probs reproducible)."""
    lora_target_modules: str = ""
    """Comma-separated module names; empty = peft's default for the architecture."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (trained policy and separate critic): less memory, slower steps."""
    offload_frozen: bool = False
    """Reference and reward model off the device except while a rollout is scored (GPU: to CPU; CPU: to a file)."""
    compile: bool = False
    """torch.compile the trained models' forward for PPO's update (one process; the first updates pay the compile)."""
    parallel_critic: bool | None = None
    """A separate critic's update pass beside the policy's, a CPU core each; None: auto (CPU, under 50M parameters)."""
    cpu_memory: Literal["reuse", "release"] = "reuse"
    """On a CPU (Linux): 'reuse' keeps freed memory for the next step (faster, ~10% more resident); 'release' frees."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    """Longest response, in tokens; a response that reaches it without EOS is 'truncated'."""
    temperature: float = 1.0
    """Sampling temperature; log-probs of policy and reference use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off; other values make the sampler differ from the scored policy)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    min_new_tokens: int = 0
    """Shortest response: stop tokens are held back until this many tokens are sampled (0 = off)."""
    fast_decoding: bool = True
    """oneDNN-packed weights on the CPU; for Llama families a lean static-cache forward (on CUDA a CUDA graph)."""
    compile: bool = False
    """With fast_decoding on a Llama family (CPU: float32): torch.compile the one-token step (first rollout pays; on
    AVX-512 CPUs it also builds a small-batch multiply from C++, once per machine)."""
    max_prompt_length: int = 128
    """Prompts longer than this many tokens are cut from the left."""
    sampler: str = ""
    """A sampler in place of tether's (an engine's client): 'module:Class' or 'file.py:Class', built once."""


@dataclass
class SFTConfig:
    data: str = ""
    """{"prompt", "response"} records: a JSONL file, a datasets folder or a .parquet file."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """Examples per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), with linear warm-up and cosine decay."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_length: int = 128
    """Prompt + response tokens kept per example."""
    save_every: int = 0
    """Write a checkpoint (for `tether sft --resume RUN`) every this many steps; 0 = only on SIGINT/SIGTERM."""


@dataclass
class RewardConfig:
    data: str = ""
    """{"prompt", "chosen", "rejected"} pairs: a JSONL file, a datasets folder or a .parquet file."""
    init: str = ""
    """Folder the reward model starts from (its trunk); empty means the policy folder."""
    eval_fraction: float = 0.1
    """Fraction of pairs held out to measure pairwise accuracy and margin."""
    epochs: int = 2
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), linearly decayed to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int = 128
    """Prompt + response tokens kept per sequence."""
    center_coef: float = 0.0
    """Weight of mean((r_chosen + r_rejected)^2), which keeps scores centred (0 = off)."""
    max_length_gap: int | None = None
    """Length-balanced training: keep pairs with |len(chosen) - len(rejected)| below this many tokens (none = all)."""
    save_every: int = 0
    """Write a checkpoint (for `tether reward --resume RUN`) every this many steps; 0 = only on SIGINT/SIGTERM."""


@dataclass
class DPOConfig:
    data: str = ""
    """{"prompt", "chosen", "rejected"} pairs: a JSONL file, a datasets folder or a .parquet file."""
    beta: float = 0.1
    """Inverse temperature of DPO's implicit reward beta * log(pi / pi_ref): larger stays closer to the reference."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a pair's label is flipped (0 = plain DPO)."""
    epochs: int = 1
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (AdamW), with linear warm-up and linear decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int = 128
    """Prompt + response tokens kept per sequence."""
    eval_fraction: float = 0.1
    """Fraction of pairs held out to measure DPO's accuracy and margin (the same split as reward.eval_fraction)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    save_every: int = 0
    """Write a checkpoint (for `tether dpo --resume RUN`) every this many steps; 0 = only on SIGINT/SIGTERM."""


@dataclass
class PPOParams:
    prompts: str = ""
    """{"prompt"} records to sample rollouts from: a JSONL file, a datasets folder or a .parquet file."""
    env: str = ""
    """An environment that answers each turn (module:Class or file.py:Class); its rewards replace the reward model."""
    max_turns: int = 4
    """With ppo.env: the most policy turns per episode (the environment may end it sooner)."""
    steps: int = 100
    """PPO iterations; each is one rollout batch and ppo_epochs of updates."""
    rollout_batch_size: int = 64
    """Prompts (= responses) sampled per iteration."""
    mini_batch_size: int = 16
    """Responses per optimizer step; divides rollout_batch_size."""
    micro_batch_size: int = 0
    """Responses per forward/backward (gradient accumulation); 0 means mini_batch_size."""
    ppo_epochs: int = 4
    """Passes over each rollout batch, each in a fresh random order."""
    lr: float = 1e-5
    """Policy (and value) learning rate for Adam."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate schedule over all optimizer steps (linear decays to 0)."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip_range: float | None = 0.2
    """Value clip around the rollout values (none = no value clipping)."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    kl_coef: float = 0.05
    """KL penalty coefficient beta (the starting value when kl_control is adaptive or threshold)."""
    kl_estimator: Literal["k1", "k2", "k3", "kl", "abs", "mse"] = "k1"
    """Per-token KL estimator in the reward (TRL names: kl = k1, mse = k2, abs = |k1|)."""
    kl_control: Literal["fixed", "adaptive", "threshold"] = "fixed"
    """KL coefficient control: fixed, adaptive (Ziegler) or threshold (x1.5 above 1.5 target, x0.75 below 0.5)."""
    kl_target: float = 6.0
    """Target sequence-level KL to the reference, in nats, for the adaptive and threshold controllers."""
    kl_horizon: float = 10000.0
    """Horizon of the adaptive KL controller, in episodes."""
    gamma: float = 1.0
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the rollout batch's response tokens."""
    whiten_rewards: bool = False
    """Rescale per-token rewards to std 1 (mean kept) before GAE."""
    score_norm: Literal["none", "batch", "batch_scale", "scale", "norm"] = "none"
    """Per batch: 'batch' (the tutorial's normalize_rewards) or 'batch_scale' (mean kept); running: 'scale', 'norm'."""
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip] after scaling (none = off)."""
    length_penalty: float = 0.0
    """Length-bias remedy: subtract length_penalty * response tokens from each score."""
    length_norm: Literal["none", "sqrt"] = "none"
    """Length-bias remedy: 'sqrt' divides each raw score by sqrt(response tokens), before penalties and scaling."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of a response that never stops (none = off)."""
    max_grad_norm: float | None = 1.0
    """Clip each trained model's gradient norm: the policy's (with a value head), a separate critic's (none = off)."""
    save_every: int = 0
    """Write a full checkpoint every this many iterations (0 = only at the start and the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept: the newest this many plus the newest stable one (0 = keep all)."""
    kl_stop: float | None = 10.0
    """KL guard: when KL to the reference exceeds this (nats), restore the last stable checkpoint (none = off)."""
    kl_stop_action: Literal["stop", "rollback"] = "stop"
    """After the KL guard restores: stop the run, or continue with the learning rate times kl_stop_lr_factor."""
    kl_stop_lr_factor: float = 0.5
    """Learning-rate multiplier applied at each rollback (kl_stop_action=rollback)."""
    max_bad_steps: int = 3
    """Non-finite guard: this many skipped (non-finite) optimizer steps in a row trigger the KL guard's restore."""
    on_alarm: Literal["warn", "stop", "rollback"] = "warn"
    """When a reward-hacking alarm starts: log it, stop, or restore the newest checkpoint from before it and stop."""
    alarm_window: int = 5
    """Iterations averaged by the alarms, both for the run's start and for now."""
    alarm_length_growth: float = 0.3
    """Length alarm: the score rose while mean response length grew by more than this fraction of its start."""
    alarm_repeat_growth: float = 0.1
    """Repetition alarm: the score rose while collapse/repeat_fraction rose by more than this."""
    alarm_filler_growth: float = 0.25
    """Filler alarm: the score rose while filler phrases per response rose by more than this."""
    alarm_gold_drop: float = 0.1
    """Proxy-vs-gold alarm: gold/score fell this far below its best while the score rose past its level then."""
    filler_phrases: str = "非常感謝您的提問|謝謝|請|thank you|thanks|please|great question|sure!|happy to help"
    """Politeness/filler phrases counted in response/filler ('|'-separated, case-insensitive)."""


@dataclass
class LoggingConfig:
    print_every: int = 10
    """Print a metrics line every this many steps (on a terminal, the live progress bar shows key metrics instead)."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; its own settings decide online or offline)."""
    trackio: bool = False
    """Also log to trackio (needs the trackio package; local unless trackio is told otherwise)."""
    project: str = "tether"
    """Project name the wandb / trackio run is filed under."""


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: 'ddp' (every process holds the trained model) or 'fsdp' (its weights, gradients and Adam state
    split over the processes with fully_shard; not with model.lora_r)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend under torchrun: 'auto' is nccl when the models are on CUDA, else gloo."""
    timeout_minutes: float = 30.0
    """How long a process waits for the others at a collective before the run fails."""


@dataclass
class DemoConfig:
    sft_examples: int = 6000
    """Synthetic {"prompt", "response"} examples the starting model is fine-tuned on."""
    preference_pairs: int = 2400
    """Response pairs sampled from the SFT model and labelled by the gold judge."""
    label_noise: float = 0.05
    """Bradley-Terry temperature of the simulated labeller: P(a > b) = sigmoid((gold_a - gold_b) / label_noise)."""
    eval_prompts: int = 60
    """Held-out prompts (never used for reward-model pairs or PPO) for the before/after evaluation."""
    eval_samples: int = 4
    """Responses sampled per held-out prompt in the evaluation."""
    sft_model: str = ""
    """Start from this SFT model folder (an earlier demo's sft/model with the same seed) instead of training one."""
    bias: Literal["none", "length", "politeness"] = "none"
    """A biased labeller: 'length' prefers longer responses, 'politeness' filler phrases (turns ppo.kl_stop off)."""
    bias_strength: float = 3.0
    """How much the bias weighs, in gold points: per 10 characters (length) or per filler phrase (politeness)."""
    remedy: Literal["none", "length_penalty", "sqrt_length", "balanced_pairs", "iterate"] = "none"
    """The tutorial's remedy applied to the run (docs/reward-hacking.md says what each one sets)."""


@dataclass
class IterateConfig:
    rounds: int = 1
    """Rounds of: sample, label new pairs, retrain the reward model on old + new pairs, continue PPO."""
    pairs: int = 600
    """New preference pairs labelled per round, each two responses to one prompt (see compare)."""
    compare: Literal["reference", "policy"] = "reference"
    """A pair is the current policy's response and the reference's ('reference'), or two of the policy's."""
    labeller: str = "gold"
    """Who labels new pairs: 'gold' (built-in task), 'review' (ratings of tether review) or module:function."""
    steps: int = 30
    """PPO iterations per round."""


@dataclass
class Stage:
    name: str = ""
    """Stage name, logged as the run goes through it (e.g. warmup, main, fine-tune)."""
    steps: int = 0
    """PPO iterations in this stage."""
    overrides: dict = field(default_factory=dict)
    """ppo.* fields this stage changes (lr, clip_range, kl_coef, ppo_epochs ...); written flat in YAML."""


STAGE_FIXED = ("prompts", "env", "steps", "rollout_batch_size", "mini_batch_size", "micro_batch_size", "kl_control")
