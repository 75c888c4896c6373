"""The four roles of PPO, loaded as ``config.model`` names them: policy + value model (trained), frozen reference,
and the reward (a reward-model folder or a Python function), all placed by one :class:`Placement`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tether.config import RunConfig
from tether.errors import TetherError, first_line
from tether.models import (
    ActorCritic,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    new_scalar_model,
    reference_copy,
)
from tether.precision import Placement
from tether.rewards import FunctionScorer, RewardModelScorer, load_callable, load_reward_function, step_token
from tether.sources import resolve

FUNCTION_SPEC = re.compile(r"[\w./\\-]+:[A-Za-z_]\w*")  # module:function or path/to/file.py:function


@dataclass
class Roles:
    actor_critic: ActorCritic  # the policy and its value model: what PPO trains
    reference: object  # the frozen reference policy (a copy, or the LoRA policy with its adapter off)
    tokenizer: object  # the policy's tokenizer
    scorer: object  # RewardModelScorer or FunctionScorer; None with ppo.env (the environment rewards)
    placement: Placement  # where each role lives, in which precision
    gold: object = None  # a held-out judge (model.gold_reward), scored on rollouts but never trained on


def load_roles(config: RunConfig) -> Roles:
    """Load policy, reference, value model and reward (model or function) as ``config.model`` names them."""
    m = config.model
    if m.policy == "tiny":
        raise TetherError(
            "model.policy=tiny is a new, untrained model for `tether sft`; PPO needs a trained policy folder "
            "(e.g. model.policy=runs/sft-.../model)"
        )
    placement = Placement.from_config(m)
    policy = load_causal_lm(m.policy, placement.trained_dtype, m.trust_remote_code)
    tokenizer = load_tokenizer(m.tokenizer or m.policy, m.trust_remote_code)
    if m.lora_r > 0:  # LoRA: the reference is the same weights with the adapter switched off (no second copy)
        from tether.lora import AdapterDisabledReference, add_lora

        policy = add_lora(policy, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
        reference = AdapterDisabledReference(policy)
    if m.reference:  # a reference of its own (iterative RLHF: the policy moved on, the tether did not)
        reference = load_causal_lm(m.reference, placement.frozen_dtype, m.trust_remote_code)
    elif m.lora_r == 0:
        reference = reference_copy(policy)
    if not m.reward_model and not config.ppo.env:
        raise TetherError("model.reward_model: give a reward model folder or a 'module:function' reward function")
    scorer = (
        load_scorer(m.reward_model, tokenizer, placement, m.trust_remote_code, m.step_marker)
        if m.reward_model
        else None
    )
    gold = load_scorer(m.gold_reward, tokenizer, placement, m.trust_remote_code) if m.gold_reward else None
    critic = None
    if m.value_model == "separate":
        init = m.value_init or (m.reward_model if isinstance(scorer, RewardModelScorer) else m.policy)
        if init == m.reward_model:  # critic starts as the reward model, head included (N+ detail 22)
            critic = load_reward_model(init, placement.trained_dtype, m.trust_remote_code)
        else:
            critic = new_scalar_model(init, placement.trained_dtype, m.trust_remote_code)
    enable_gradient_checkpointing(m.gradient_checkpointing, policy, critic)  # after the reference copy
    return Roles(ActorCritic(policy, critic), reference, tokenizer, scorer, placement, gold)


def load_scorer(spec: str, tokenizer, placement: Placement, trust_remote_code: bool = False, step_marker: str = ""):
    """A reward spec as a scorer: ``module:function`` (or ``file.py:function``) a :class:`FunctionScorer`; a folder,
    ``.gguf`` file or Hub name a :class:`RewardModelScorer` (re-encoding text when its tokenizer differs), reading
    step scores at ``step_marker`` when given."""
    if not Path(spec).is_dir() and FUNCTION_SPEC.fullmatch(spec):
        if step_marker:
            raise TetherError("model.step_marker is for a reward model; a reward function returns (end, score) pairs")
        return FunctionScorer(load_reward_function(spec), spec)
    folder = resolve(spec, "reward model", trust_remote_code=trust_remote_code).folder
    reward_model = load_reward_model(spec, placement.frozen_dtype, trust_remote_code)
    rm_tokenizer = None  # a folder without tokenizer files shares the policy's tokenizer
    if any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        rm_tokenizer = load_tokenizer(spec, trust_remote_code)
        rm_tokenizer = None if rm_tokenizer.get_vocab() == tokenizer.get_vocab() else rm_tokenizer
    step_id = step_token(tokenizer, step_marker) if step_marker else None
    return RewardModelScorer(reward_model, tokenizer.eos_token_id, rm_tokenizer, placement=placement, step_id=step_id)


def load_sampler(spec: str, field: str = "sampling.sampler"):
    """The sampler ``field`` (``sampling.sampler``) names (``module:Class`` or ``file.py:Class``), built once with no
    arguments; None for an empty spec (tether's own). Its errors, in building and in drawing, are one line naming
    it."""
    if not spec:
        return None
    factory = load_callable(spec, field, "Class")
    try:
        engine = factory()
    except Exception as e:  # the user's code: any error becomes one line naming it
        raise TetherError(f"{field} '{spec}': creating it raised {type(e).__name__}: {first_line(e)}") from None
    if not callable(engine):
        raise TetherError(f"{field} '{spec}': {type(engine).__name__} is not callable like tether's sample()")

    def draw(*args):
        try:
            return engine(*args)
        except TetherError:
            raise
        except Exception as e:
            raise TetherError(f"{field} '{spec}': it raised {type(e).__name__}: {first_line(e)}") from None

    return draw
