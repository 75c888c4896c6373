"""Typed run configuration: one dataclass per concern (:mod:`tether.sections`), a YAML file, and dotted overrides.

Every field has one docstring line below it; `tether <command> --help` prints them. A config is built as
``defaults -> YAML file -> dotted overrides (ppo.clip_range=0.1)``; unknown keys, bad values and broken batch-size
relations are :class:`TetherError` s that name the field. The tutorial's TRL names (``cliprange``, ``init_kl_coef``,
``lam`` ...) are accepted as aliases of the canonical names (``docs/migration.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tether.errors import TetherError
from tether.fields import field_types, flat_keys, is_dataclass_type, load_yaml, override_value, parse_scalar
from tether.sections import (
    STAGE_FIXED,
    DemoConfig,
    DistributedConfig,
    DPOConfig,
    IterateConfig,
    LoggingConfig,
    ModelConfig,
    PPOParams,
    RewardConfig,
    SamplingConfig,
    SFTConfig,
    Stage,
)


@dataclass
class RunConfig:
    seed: int = 0
    """Random seed for torch, python and data order."""
    output_dir: str = ""
    """Run folder; empty means runs/<command>-<timestamp>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOParams = field(default_factory=PPOParams)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    stages: list[Stage] = field(default_factory=list)
    """PPO stages run in order, each {name, steps, ppo overrides}; when given, ppo.steps is their total."""

    def finalize(self) -> RunConfig:
        """Check the relations between fields; raise TetherError naming the field. Returns self."""
        ppo = self.ppo
        if self.stages:
            ppo.steps = sum(stage.steps for stage in self.stages)
        micro = ppo.micro_batch_size or ppo.mini_batch_size
        for name, value in [
            ("ppo.rollout_batch_size", ppo.rollout_batch_size),
            ("ppo.mini_batch_size", ppo.mini_batch_size),
            ("ppo.ppo_epochs", ppo.ppo_epochs),
            ("sampling.max_new_tokens", self.sampling.max_new_tokens),
            ("sft.batch_size", self.sft.batch_size),
            ("reward.batch_size", self.reward.batch_size),
            ("dpo.batch_size", self.dpo.batch_size),
            ("dpo.epochs", self.dpo.epochs),
            ("dpo.beta", self.dpo.beta),
            ("distributed.timeout_minutes", self.distributed.timeout_minutes),
        ]:
            if value <= 0:
                raise TetherError(f"{name} must be positive, got {value}")
        if ppo.rollout_batch_size % ppo.mini_batch_size:
            raise TetherError(
                f"ppo.mini_batch_size={ppo.mini_batch_size} must divide "
                f"ppo.rollout_batch_size={ppo.rollout_batch_size}"
            )
        if ppo.mini_batch_size % micro:
            raise TetherError(f"ppo.micro_batch_size={micro} must divide ppo.mini_batch_size={ppo.mini_batch_size}")
        if self.sampling.temperature <= 0:
            raise TetherError(f"sampling.temperature must be > 0, got {self.sampling.temperature}")
        if not 0 < self.sampling.top_p <= 1:
            raise TetherError(f"sampling.top_p must be in (0, 1], got {self.sampling.top_p}")
        if not 0 < self.reward.eval_fraction < 1:
            raise TetherError(f"reward.eval_fraction must be in (0, 1), got {self.reward.eval_fraction}")
        if not 0 < self.dpo.eval_fraction < 1:
            raise TetherError(f"dpo.eval_fraction must be in (0, 1), got {self.dpo.eval_fraction}")
        if not 0 <= self.dpo.label_smoothing < 0.5:
            raise TetherError(f"dpo.label_smoothing must be in [0, 0.5), got {self.dpo.label_smoothing}")
        lrs = [("sft.lr", self.sft.lr), ("reward.lr", self.reward.lr), ("dpo.lr", self.dpo.lr), ("ppo.lr", ppo.lr)]
        for name, lr in lrs:
            if not 0 <= lr < float("inf"):  # 0 is allowed: it freezes the weights (a diagnostic run)
                raise TetherError(f"{name} must be a learning rate >= 0, got {lr}")
        if self.reward.max_length_gap is not None and self.reward.max_length_gap <= 0:
            raise TetherError(f"reward.max_length_gap must be positive (or none), got {self.reward.max_length_gap}")
        if ppo.alarm_window < 1:
            raise TetherError(f"ppo.alarm_window must be positive, got {ppo.alarm_window}")
        if ppo.max_turns < 1:
            raise TetherError(f"ppo.max_turns must be positive, got {ppo.max_turns}")
        if ppo.env and (self.model.reward_model or self.model.gold_reward):
            raise TetherError(
                "ppo.env: the environment's rewards are the reward; leave model.reward_model and gold_reward empty"
            )
        if self.iterate.rounds < 1 or self.iterate.pairs < 1 or self.iterate.steps < 1:
            raise TetherError("iterate.rounds, iterate.pairs and iterate.steps must be positive")
        if self.model.compile and self.model.gradient_checkpointing:
            raise TetherError("model.compile and model.gradient_checkpointing: set one of them, not both")
        if ppo.score_norm in ("batch", "batch_scale") and ppo.rollout_batch_size < 2:
            raise TetherError(f"ppo.score_norm={ppo.score_norm} needs ppo.rollout_batch_size >= 2 (a batch std)")
        return self


# The tutorial's (legacy TRL) spellings, accepted anywhere a key is read. See docs/migration.md.
ALIASES: dict[str, str] = {
    "ppo.cliprange": "ppo.clip_range",
    "ppo.cliprange_value": "ppo.value_clip_range",
    "ppo.init_kl_coef": "ppo.kl_coef",
    "ppo.adap_kl_ctrl": "ppo.adaptive_kl",
    "ppo.kl_ctrl": "ppo.kl_control",
    "ppo.target": "ppo.kl_target",
    "ppo.target_kl": "ppo.kl_target",
    "ppo.horizon": "ppo.kl_horizon",
    "ppo.lam": "ppo.gae_lambda",
    "ppo.kl_penalty": "ppo.kl_estimator",
    "ppo.learning_rate": "ppo.lr",
    "ppo.batch_size": "ppo.rollout_batch_size",
    "ppo.clip_epsilon": "ppo.clip_range",
    "ppo.beta": "ppo.kl_coef",
    "model.model_name": "model.policy",
}


# Switches that became a choice: ``ppo.adaptive_kl=true`` is ``ppo.kl_control=adaptive`` (false: fixed).
SWITCH_ALIASES: dict[str, tuple[str, str, str]] = {"ppo.adaptive_kl": ("ppo.kl_control", "adaptive", "fixed")}


def canonical_key(key: str) -> str:
    """Map a dotted key (possibly a TRL alias, possibly without its section) to the canonical dotted key."""
    return ALIASES.get(key, key)


def set_value(config: Any, dotted: str, raw: Any, source: str = "") -> None:
    """Set ``config.<dotted>`` from a raw value, converting and validating it; errors name ``source`` and key."""
    where = f"{source}: " if source else ""
    key = canonical_key(dotted)
    if key in SWITCH_ALIASES:
        target_key, on, off = SWITCH_ALIASES[key]
        try:
            flag = parse_scalar(bool, raw, key)
        except TetherError as e:
            raise TetherError(f"{where}{e}") from None
        return set_value(config, target_key, on if flag else off, source)
    if key == "stages":
        config.stages = parse_stages(raw, f"{where}stages")
        return
    *path, name = key.split(".")
    target = config
    for part in path:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise TetherError(f"{where}unknown config key '{dotted}'")
        target = getattr(target, part)
    hints = field_types(type(target)) if dataclasses.is_dataclass(target) else {}
    if name not in hints:
        raise TetherError(f"{where}unknown config key '{dotted}'{_suggest(config, dotted)}")
    tp = hints[name]
    if is_dataclass_type(tp):
        if not isinstance(raw, dict):
            raise TetherError(f"{where}'{dotted}' is a section; give it a mapping of fields")
        for sub, value in raw.items():
            set_value(config, f"{key}.{sub}", value, source)
        return
    try:
        setattr(target, name, parse_scalar(tp, raw, key))
    except TetherError as e:
        raise TetherError(f"{where}{e}") from None


def parse_stages(raw: Any, where: str) -> list[Stage]:
    """``stages:`` as written in YAML: a list of {name, steps, <ppo field>: value ...} (or {..., overrides: {...}})."""
    if not isinstance(raw, list):
        raise TetherError(f"{where}: expected a list of stages, each with a name, steps and ppo overrides")
    stages = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise TetherError(f"{at}: expected a mapping with name, steps and ppo overrides")
        item = dict(item)
        name = parse_scalar(str, item.pop("name", f"stage{i + 1}"), f"{at}.name")
        steps = parse_scalar(int, item.pop("steps", None), f"{at}.steps")
        if steps <= 0:
            raise TetherError(f"{at}.steps must be positive, got {steps}")
        probe, overrides = PPOParams(), {}
        for key, value in {**item.pop("overrides", {}), **item}.items():
            key = canonical_key(f"ppo.{key}").removeprefix("ppo.")  # the tutorial's names (init_kl_coef ...) too
            if key in STAGE_FIXED:
                raise TetherError(f"{at}.{key}: fixed for the whole run; a stage cannot change it")
            set_value(probe, key, value, at)
            overrides[key] = getattr(probe, key)
        stages.append(Stage(name, steps, overrides))
    return stages


def _suggest(config: Any, dotted: str) -> str:
    last = dotted.split(".")[-1]
    hits = [k for k in flat_keys(config) if k.split(".")[-1] == last]
    return f" (did you mean '{hits[0]}'?)" if hits else ""


def build_config(config_file: str | None = None, overrides: list[str] | None = None, base: RunConfig | None = None):
    """Defaults (or ``base``) -> YAML file -> ``key=value`` overrides -> finalize()."""
    config = base if base is not None else RunConfig()
    if config_file:
        for key, value in load_yaml(config_file).items():
            set_value(config, key, value, source=str(config_file))
    for item in overrides or []:
        if "=" not in item:
            raise TetherError(f"override '{item}' must look like section.field=value")
        key, raw = item.split("=", 1)
        set_value(config, key.strip().lstrip("-"), override_value(raw), source="command line")
    return config.finalize()
