"""TRL's legacy ``PPOConfig`` (v0.11 names, order and defaults), mapped onto tether's :class:`RunConfig`."""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from tether.config import RunConfig
from tether.errors import TetherError
from tether.legacy.errors import LegacyValueError, UnknownArgumentError

# TRL's kl_penalty names (and tether's estimator names) -> tether's ppo.kl_estimator; "full" is the legacy engine's
KL_PENALTIES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "mse", "k2": "k2", "k3": "k3", "full": "full"}
# Used by TRL only to label tracker runs (its docs say so): recorded, no effect, no warning.
TRACKING_ONLY = ("exp_name", "task_name", "model_name", "query_dataset", "reward_model")
# Accepted for compatibility but without effect in tether (a warning names them when given a non-default value).
NO_EFFECT = (
    "log_with",
    "tracker_kwargs",
    "project_kwargs",
    "push_to_hub_if_best_kwargs",
    "tracker_project_name",
    "compare_steps",
)
# Filled in by PPOConfig itself (and PPOTrainer), as TRL filled them: any value given is replaced.
RUNTIME = (
    "world_size",
    "is_encoder_decoder",
    "is_peft_model",
    "backward_batch_size",
    "global_backward_batch_size",
    "global_batch_size",
)
JSONDict = dict | str | None  # a dict, or its JSON text (how a command line gives it)


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass(init=False)
class PPOConfig:
    """TRL's legacy ``PPOConfig`` (v0.11 names, field order and defaults); :meth:`to_run_config` maps it onto
    :class:`RunConfig`.

    Arguments are TRL's, by keyword or in TRL's order; an unknown one raises :class:`UnknownArgumentError` naming
    it, a bad value :class:`LegacyValueError` (a ``ValueError``, as in TRL). The values are checked again when a
    :class:`PPOTrainer` is built and at each ``step``, so fields changed after construction are checked too.
    ``HfArgumentParser`` parses it (dict fields take JSON text). TRL's tracking fields (``exp_name``,
    ``reward_model``, ``log_with``, ...) have no effect; a warning names those that did something in TRL. Of
    ``accelerator_kwargs``, ``cpu=True`` (run on the CPU) and ``mixed_precision="bf16"`` (bf16 autocast on float32
    master weights) are honoured; other keys have no effect.

    Attributes:
        TRL v0.11's fields; docs/migration.md gives each one's default and its tether equivalent. Three more are
        tether's: ``kl_stop`` (None = off), ``kl_stop_action`` and ``kl_stop_lr_factor``, the ``ppo.*`` fields of
        the same names (see :meth:`PPOTrainer.step`).
    """

    exp_name: str = field(default_factory=lambda: os.path.basename(sys.argv[0])[: -len(".py")])
    seed: int = 0
    log_with: Literal["wandb", "tensorboard"] | None = None
    task_name: str | None = None
    model_name: str = "gpt2"
    query_dataset: str = "stanfordnlp/imdb"
    reward_model: str = "sentiment-analysis:lvwerra/distilbert-imdb"
    remove_unused_columns: bool = True
    tracker_kwargs: JSONDict = field(default_factory=dict)
    accelerator_kwargs: JSONDict = field(default_factory=dict)
    project_kwargs: JSONDict = field(default_factory=dict)
    tracker_project_name: str = "trl"
    push_to_hub_if_best_kwargs: JSONDict = field(default_factory=dict)
    steps: int = 20000
    learning_rate: float = 1.41e-5
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: Literal["kl", "abs", "mse", "full", "k1", "k2", "k3"] = "kl"
    target: float = 6.0
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    batch_size: int = 128
    forward_batch_size: int | None = None
    mini_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    world_size: int | None = None
    ppo_epochs: int = 4
    max_grad_norm: float | None = None
    optimize_cuda_cache: bool | None = None
    optimize_device_cache: bool = False
    early_stopping: bool = False
    target_kl: float = 1.0
    compare_steps: int = 1
    ratio_threshold: float = 10.0
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: float | None = None
    whiten_rewards: bool = False
    gradient_checkpointing: bool = False
    is_encoder_decoder: bool | None = None
    is_peft_model: bool | None = None
    backward_batch_size: int | None = None
    global_backward_batch_size: int | None = None
    global_batch_size: int | None = None
    dataset_num_proc: int | None = None
    # tether additions (not in TRL): the tutorial's KL early stop, acting on PPOTrainer.save_checkpoint's checkpoints
    kl_stop: float | None = None
    kl_stop_action: Literal["stop", "rollback"] = "stop"
    kl_stop_lr_factor: float = 0.5

    def __init__(self, *args, **kwargs):
        known = {f.name: f for f in fields(self)}
        if len(args) > len(known):
            raise UnknownArgumentError(f"PPOConfig: takes at most {len(known)} positional arguments")
        for name, value in zip(known, args):
            if name in kwargs:
                raise UnknownArgumentError(f"PPOConfig: got two values for argument '{name}'")
            kwargs[name] = value
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UnknownArgumentError(f"PPOConfig: unknown argument '{key}'{hint}")
        for name, f in known.items():
            setattr(self, name, kwargs[name] if name in kwargs else _default(f))
        self.__post_init__()

    def __post_init__(self):
        if self.forward_batch_size is not None:
            warnings.warn("PPOConfig: forward_batch_size is deprecated; it sets mini_batch_size", stacklevel=3)
            self.mini_batch_size = self.forward_batch_size
        self.check()
        fields_ = {f.name: f for f in fields(self)}
        ignored = [n for n in NO_EFFECT if getattr(self, n) != _default(fields_[n])]
        honoured = ("cpu", "mixed_precision")
        ignored += [f"accelerator_kwargs[{k!r}]" for k in self.accelerator_kwargs if k not in honoured]
        if ignored:
            warnings.warn(f"PPOConfig: {', '.join(ignored)} accepted but has no effect in tether", stacklevel=3)

    def check(self) -> PPOConfig:
        """Check every value (again) and fill in the runtime fields; LegacyValueError (a ValueError) if one is bad."""
        for name in ("tracker_kwargs", "accelerator_kwargs", "project_kwargs", "push_to_hub_if_best_kwargs"):
            setattr(self, name, _json_dict(getattr(self, name), name))
        if self.kl_penalty not in KL_PENALTIES:
            raise LegacyValueError(
                f"PPOConfig: kl_penalty={self.kl_penalty!r} is not one of {', '.join(map(repr, KL_PENALTIES))}"
            )
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LegacyValueError(f"PPOConfig: {name} must be a positive integer, got {value!r}")
        if self.kl_stop_action not in ("stop", "rollback"):
            raise LegacyValueError(f"PPOConfig: kl_stop_action={self.kl_stop_action!r} is not 'stop' or 'rollback'")
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % self.backward_batch_size:
            raise LegacyValueError(
                f"PPOConfig: batch_size={self.batch_size} must be a multiple of mini_batch_size * "
                f"gradient_accumulation_steps = {self.mini_batch_size} * {self.gradient_accumulation_steps}"
            )
        self.world_size = 1
        self.global_backward_batch_size, self.global_batch_size = self.backward_batch_size, self.batch_size
        self.total_ppo_epochs = math.ceil(self.steps / self.batch_size)
        precision = self.accelerator_kwargs.get("mixed_precision") or "no"
        if precision not in ("no", "bf16"):
            raise LegacyValueError(
                f"PPOConfig: accelerator_kwargs mixed_precision={precision!r} is not supported (fp16 needs a gradient "
                "scaler, which tether does not have); use 'bf16' or 'no'"
            )
        return self

    def to_dict(self) -> dict:
        """Every field (and runtime value) as a flat dict; nested dicts become ``outer/inner`` keys, as in TRL."""
        flat = {}
        for key, value in vars(self).items():
            if isinstance(value, dict):
                flat.update({f"{key}/{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat

    @property
    def kl_target(self) -> float:
        """The adaptive controller's target KL (TRL's ``target``; ``target_kl`` is the early-stopping threshold)."""
        return self.target

    def to_run_config(self) -> RunConfig:
        """The equivalent tether :class:`RunConfig` (checked with ``finalize()``; LegacyValueError if invalid).

        TRL's ``mini_batch_size`` is tether's ``micro_batch_size`` (rows per forward/backward) and
        ``mini_batch_size * gradient_accumulation_steps`` is tether's ``mini_batch_size`` (rows per optimizer step).
        TRL had a constant learning rate, Adam's default eps and no score penalties; the values below say so.
        ``kl_penalty="full"`` has no core estimator: the legacy trainer computes it and the core gets ``k1``.
        """
        self.check()
        run = RunConfig(seed=self.seed)
        run.model.policy = self.model_name
        run.model.device = "cpu" if self.accelerator_kwargs.get("cpu") else "auto"
        run.model.dtype = "bfloat16" if self.accelerator_kwargs.get("mixed_precision") == "bf16" else "float32"
        run.model.gradient_checkpointing = bool(self.gradient_checkpointing)
        p = run.ppo
        p.steps = self.total_ppo_epochs
        p.rollout_batch_size, p.mini_batch_size, p.micro_batch_size = (
            self.batch_size,
            self.backward_batch_size,
            self.mini_batch_size,
        )
        p.ppo_epochs, p.lr, p.lr_schedule, p.adam_eps = self.ppo_epochs, self.learning_rate, "constant", 1e-8
        p.clip_range, p.value_clip_range, p.vf_coef = self.cliprange, self.cliprange_value, self.vf_coef
        p.kl_coef = self.init_kl_coef
        p.kl_estimator = "k1" if self.kl_penalty == "full" else KL_PENALTIES[self.kl_penalty]
        p.kl_control = "adaptive" if self.adap_kl_ctrl else "fixed"
        p.kl_target, p.kl_horizon, p.gamma, p.gae_lambda = self.kl_target, self.horizon, self.gamma, self.lam
        p.whiten_advantages, p.whiten_rewards = True, self.whiten_rewards
        p.score_norm = ("norm" if self.use_score_norm else "scale") if self.use_score_scaling else "none"
        p.score_clip, p.max_grad_norm = self.score_clip, self.max_grad_norm
        p.length_penalty, p.missing_eos_penalty = 0.0, None
        p.kl_stop, p.kl_stop_action, p.kl_stop_lr_factor = self.kl_stop, self.kl_stop_action, self.kl_stop_lr_factor
        run.sampling.temperature = 1.0  # step() scores tokens at temperature 1, as TRL did
        try:
            return run.finalize()
        except TetherError as e:
            raise LegacyValueError(f"PPOConfig: {e}") from None


def _json_dict(value, name: str) -> dict:
    """``value`` as a dict: None is empty, a string is parsed as JSON (a command line's ``--accelerator_kwargs``)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise LegacyValueError(f"PPOConfig: {name} is not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise LegacyValueError(f"PPOConfig: {name} must be a dict (or its JSON text), got {type(value).__name__}")
    return value
