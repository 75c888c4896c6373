"""TRL's legacy ``PPOConfig`` (v0.11 names and defaults), mapped onto tether's :class:`RunConfig`."""

from __future__ import annotations

import difflib
import math
import sys
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from tether.config import RunConfig
from tether.errors import TetherError

KL_PENALTIES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "mse", "k2": "k2", "k3": "k3"}
# Accepted for compatibility but without effect in tether (a warning names them when given a non-default value).
NO_EFFECT = (
    "exp_name",
    "log_with",
    "task_name",
    "query_dataset",
    "reward_model",
    "remove_unused_columns",
    "tracker_kwargs",
    "project_kwargs",
    "push_to_hub_if_best_kwargs",
    "tracker_project_name",
    "optimize_cuda_cache",
    "optimize_device_cache",
    "compare_steps",
    "ratio_threshold",
    "gradient_checkpointing",
)


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


class UnknownArgumentError(TetherError, TypeError):
    """An unknown keyword argument (a TetherError that is also a TypeError, as a wrong keyword is in Python)."""


@dataclass(init=False)
class PPOConfig:
    """TRL's legacy ``PPOConfig`` (v0.11 names and defaults); :meth:`to_run_config` maps it onto :class:`RunConfig`.

    Only keyword arguments are accepted; an unknown one raises :class:`UnknownArgumentError` naming it.
    ``target`` is the adaptive-KL target; ``target_kl`` (TRL's early-stopping threshold) sets that target when
    ``target`` keeps its default, as the tutorial uses it. Tracking-only fields (``log_with``, ...) have no effect.
    Of ``accelerator_kwargs``, accelerate's ``cpu=True`` (run on the CPU) and ``mixed_precision="bf16"`` (tether's
    ``model.dtype=bfloat16``: bf16 autocast on float32 master weights) are honoured; other keys have no effect.

    Attributes:
        TRL v0.11's fields; docs/migration.md gives each one's default and its tether equivalent. Three more are
        tether's: ``kl_stop`` (None = off), ``kl_stop_action`` and ``kl_stop_lr_factor``, the ``ppo.*`` fields of
        the same names (see :meth:`PPOTrainer.step`).
    """

    exp_name: str = field(default_factory=lambda: Path(sys.argv[0]).stem)
    seed: int = 0
    log_with: str | None = None
    task_name: str | None = None
    model_name: str = "gpt2"
    query_dataset: str = "stanfordnlp/imdb"
    reward_model: str = "sentiment-analysis:lvwerra/distilbert-imdb"
    remove_unused_columns: bool = True
    tracker_kwargs: dict = field(default_factory=dict)
    accelerator_kwargs: dict = field(default_factory=dict)
    project_kwargs: dict = field(default_factory=dict)
    tracker_project_name: str = "trl"
    push_to_hub_if_best_kwargs: dict = field(default_factory=dict)
    steps: int = 20000
    learning_rate: float = 1.41e-5
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: str = "kl"
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
    # tether additions (not in TRL): the tutorial's KL early stop, acting on PPOTrainer.save_checkpoint's checkpoints
    kl_stop: float | None = None
    kl_stop_action: str = "stop"
    kl_stop_lr_factor: float = 0.5

    def __init__(self, **kwargs):
        known = {f.name: f for f in fields(self)}
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UnknownArgumentError(f"PPOConfig: unknown argument '{key}'{hint}")
        for name, f in known.items():
            setattr(self, name, kwargs[name] if name in kwargs else _default(f))
        self.__post_init__()

    def __post_init__(self):
        if self.kl_penalty not in KL_PENALTIES:
            raise TetherError(
                f"PPOConfig: kl_penalty={self.kl_penalty!r} is not supported; use one of "
                f"{', '.join(KL_PENALTIES)} ('full' is not available)"
            )
        if self.early_stopping:
            raise TetherError("PPOConfig: early_stopping=True is not supported by tether (see docs/migration.md)")
        if self.forward_batch_size is not None:
            warnings.warn("PPOConfig: forward_batch_size is deprecated; it sets mini_batch_size", stacklevel=3)
            self.mini_batch_size = self.forward_batch_size
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise TetherError(f"PPOConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        self.global_backward_batch_size, self.global_batch_size, self.world_size = (
            self.backward_batch_size,
            self.batch_size,
            1,
        )
        if self.batch_size % self.backward_batch_size:
            raise TetherError(
                f"PPOConfig: batch_size={self.batch_size} must be a multiple of mini_batch_size * "
                f"gradient_accumulation_steps = {self.backward_batch_size}"
            )
        precision = self.accelerator_kwargs.get("mixed_precision") or "no"
        if precision not in ("no", "bf16"):
            raise TetherError(
                f"PPOConfig: accelerator_kwargs mixed_precision={precision!r} is not supported (fp16 needs a gradient "
                "scaler, which tether does not have); use 'bf16' or 'no'"
            )
        fields_ = {f.name: f for f in fields(self)}
        ignored = [n for n in NO_EFFECT if n != "exp_name" and getattr(self, n) != _default(fields_[n])]
        honoured = ("cpu", "mixed_precision")
        ignored += [f"accelerator_kwargs[{k!r}]" for k in self.accelerator_kwargs if k not in honoured]
        if ignored:
            warnings.warn(f"PPOConfig: {', '.join(ignored)} accepted but has no effect in tether", stacklevel=3)

    @property
    def kl_target(self) -> float:
        """The adaptive-KL target: ``target``, or ``target_kl`` when only that one differs from its default."""
        return self.target_kl if self.target == 6.0 and self.target_kl != 1.0 else self.target

    def to_run_config(self) -> RunConfig:
        """The equivalent tether :class:`RunConfig` (checked with ``finalize()``).

        TRL's ``mini_batch_size`` is tether's ``micro_batch_size`` (rows per forward/backward) and
        ``mini_batch_size * gradient_accumulation_steps`` is tether's ``mini_batch_size`` (rows per optimizer step).
        TRL had a constant learning rate, Adam's default eps and no score penalties; the values below say so.
        """
        run = RunConfig(seed=self.seed)
        run.model.policy = self.model_name
        run.model.device = "cpu" if self.accelerator_kwargs.get("cpu") else "auto"
        run.model.dtype = "bfloat16" if self.accelerator_kwargs.get("mixed_precision") == "bf16" else "float32"
        p = run.ppo
        p.steps = math.ceil(self.steps / self.batch_size)
        p.rollout_batch_size, p.mini_batch_size, p.micro_batch_size = (
            self.batch_size,
            self.backward_batch_size,
            self.mini_batch_size,
        )
        p.ppo_epochs, p.lr, p.lr_schedule, p.adam_eps = self.ppo_epochs, self.learning_rate, "constant", 1e-8
        p.clip_range, p.value_clip_range, p.vf_coef = self.cliprange, self.cliprange_value, self.vf_coef
        p.kl_coef, p.kl_estimator = self.init_kl_coef, KL_PENALTIES[self.kl_penalty]
        p.kl_control = "adaptive" if self.adap_kl_ctrl else "fixed"
        p.kl_target, p.kl_horizon, p.gamma, p.gae_lambda = self.kl_target, self.horizon, self.gamma, self.lam
        p.whiten_advantages, p.whiten_rewards = True, self.whiten_rewards
        p.score_norm = ("norm" if self.use_score_norm else "scale") if self.use_score_scaling else "none"
        p.score_clip, p.max_grad_norm = self.score_clip, self.max_grad_norm
        p.length_penalty, p.missing_eos_penalty = 0.0, None
        p.kl_stop, p.kl_stop_action, p.kl_stop_lr_factor = self.kl_stop, self.kl_stop_action, self.kl_stop_lr_factor
        run.sampling.temperature = 1.0  # step() scores tokens at temperature 1, as TRL did
        return run.finalize()
