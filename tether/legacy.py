"""The legacy TRL PPO API (``PPOConfig``, ``PPOTrainer``, ``AutoModelForCausalLMWithValueHead``) on tether's core.

TRL removed this API in v0.12; code written for it (the tutorial's "使用 TRL 函式庫" snippet) runs here with only
its imports changed. ``PPOTrainer.step`` builds a :class:`tether.types.Rollout` from the user's tokens and scores and
runs one iteration of the core :class:`tether.trainers.ppo.PPOTrainer`; its stats are translated to TRL's keys.
Differences from TRL are listed in ``docs/migration.md``.
"""

from __future__ import annotations

import copy
import difflib
import math
import sys
import time
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tether.algo import masked_mean, masked_var
from tether.config import RunConfig
from tether.errors import TetherError
from tether.models import PAD_TOKEN, ActorCritic, disable_dropout, freeze, load_causal_lm, reference_copy
from tether.rollout import Sampling, build_rollout, generate
from tether.trainers.ppo import PPOTrainer as CorePPOTrainer
from tether.types import Rollout

__all__ = ["PPOConfig", "PPOTrainer", "AutoModelForCausalLMWithValueHead"]

VALUE_HEAD_FILE = "value_head.safetensors"
KL_PENALTIES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "mse", "k2": "k2", "k3": "k3"}
# TRL step() keys that are one of the core's stats (tether key -> TRL key); docs/migration.md has the full table.
TRL_NAMES = {
    "kl/ref": "objective/kl",
    "kl/coef": "objective/kl_coef",
    "loss/policy": "ppo/loss/policy",
    "loss/value": "ppo/loss/value",
    "loss/total": "ppo/loss/total",
    "ppo/entropy": "ppo/policy/entropy",
    "ppo/approx_kl": "ppo/policy/approxkl",
    "ppo/clipfrac": "ppo/policy/clipfrac",
    "ppo/returns_mean": "ppo/returns/mean",
    "ppo/value_error": "ppo/val/error",
    "ppo/value_clipfrac": "ppo/val/clipfrac",
    "ppo/vpred_mean": "ppo/val/mean",
    "ppo/lr": "ppo/learning_rate",
    "time/reward": "time/ppo/compute_rewards",
    "time/advantage": "time/ppo/compute_advantages",
    "time/update": "time/ppo/optimize_step",
}
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
        TRL v0.11's fields; docs/migration.md gives each one's default and its tether equivalent.
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
        run.sampling.temperature = 1.0  # step() scores tokens at temperature 1, as TRL did
        return run.finalize()


class AutoModelForCausalLMWithValueHead(nn.Module):
    """A causal LM (``.pretrained_model``) with a scalar value head (``.v_head``, a Linear on the last hidden state).

    ``forward`` returns ``(lm_logits, loss, values)`` as in TRL (loss is None without ``labels``). The head starts
    at zero (tether's V = 0 convention; TRL drew it at random).

    Args:
        pretrained_model: a Hugging Face causal LM.
    """

    def __init__(self, pretrained_model: nn.Module):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.v_head = nn.Linear(pretrained_model.get_output_embeddings().in_features, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        self.v_head.to(next(pretrained_model.parameters()).dtype)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        v_head_init_strategy: str | None = None,
        v_head_initializer_range: float = 0.2,
    ):
        """Load a local model folder (safetensors) or wrap a loaded causal LM; restore ``value_head.safetensors``.

        Args:
            pretrained_model_name_or_path: a local Hugging Face causal-LM folder, or a causal-LM module.
            dtype: parameter dtype when loading a folder.
            trust_remote_code: allow the folder's own Python code.
            v_head_init_strategy: None (zeros) or "normal" (N(0, v_head_initializer_range), zero bias).
            v_head_initializer_range: standard deviation for the "normal" strategy.
        """
        if isinstance(pretrained_model_name_or_path, nn.Module):
            model = cls(disable_dropout(pretrained_model_name_or_path))
            folder = None
        else:
            folder = Path(pretrained_model_name_or_path)
            model = cls(load_causal_lm(str(folder), dtype, trust_remote_code))
        if v_head_init_strategy == "normal":
            nn.init.normal_(model.v_head.weight, std=v_head_initializer_range)
        elif v_head_init_strategy is not None:
            raise TetherError(f"v_head_init_strategy={v_head_init_strategy!r}: expected None or 'normal'")
        if folder is not None and (folder / VALUE_HEAD_FILE).is_file():
            model.v_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))
        return model

    def forward(
        self, input_ids=None, past_key_values=None, attention_mask=None, return_past_key_values=False, **kwargs
    ):
        """``(lm_logits (B, L, V) float32, loss or None, values (B, L))`` [+ past_key_values]."""
        kwargs["output_hidden_states"] = True
        out = self.pretrained_model(
            input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs
        )
        hidden = out.hidden_states[-1]
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
        result = (out.logits.float(), getattr(out, "loss", None), values)
        return result + (out.past_key_values,) if return_past_key_values else result

    def generate(self, *args, **kwargs):
        """Hugging Face ``generate`` of the wrapped causal LM."""
        return self.pretrained_model.generate(*args, **kwargs)

    @property
    def config(self):
        """The wrapped model's config."""
        return self.pretrained_model.config

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the LM folder (safetensors) and the value head as ``value_head.safetensors`` inside it."""
        self.pretrained_model.save_pretrained(save_directory, **kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in self.v_head.state_dict().items()}
        save_file(state, str(Path(save_directory) / VALUE_HEAD_FILE))


def _user_scores_only(*args, **kwargs):
    raise TetherError("legacy PPOTrainer: scores come from step(queries, responses, scores), not from a scorer")


class PPOTrainer:
    """TRL's legacy ``PPOTrainer``: the user samples with :meth:`generate`, scores, and calls :meth:`step`.

    Training updates ``model`` (its LM and ``v_head``) in place. ``tokenizer`` is not modified; internally tether
    pads with a token distinct from EOS, so EOS is always a learnable response token.

    Args:
        config: a :class:`PPOConfig`.
        model: the policy, an :class:`AutoModelForCausalLMWithValueHead`.
        ref_model: the frozen reference (a value-head model or a causal LM); None copies ``model``.
        tokenizer: the policy's tokenizer (its ``pad_token`` may equal its ``eos_token``).
        dataset: optional; gives ``self.dataloader`` (batches of ``config.batch_size``, shuffled, last dropped).
        data_collator: ``collate_fn`` of that dataloader.
        optimizer: not supported (tether's Adam is built from the config); likewise ``num_shared_layers``,
            ``lr_scheduler`` and ``training_data_collator``: anything but None raises TetherError.
    """

    def __init__(
        self,
        config: PPOConfig | None = None,
        model=None,
        ref_model=None,
        tokenizer=None,
        dataset=None,
        optimizer=None,
        data_collator=None,
        num_shared_layers=None,
        lr_scheduler=None,
        training_data_collator=None,
    ):
        if not isinstance(config, PPOConfig):
            raise TetherError("PPOTrainer: config must be a tether PPOConfig")
        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            raise TetherError("PPOTrainer: model must be an AutoModelForCausalLMWithValueHead")
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise TetherError("PPOTrainer: a tokenizer with an eos_token is required")
        unsupported = {
            "optimizer": optimizer,
            "num_shared_layers": num_shared_layers,
            "lr_scheduler": lr_scheduler,
            "training_data_collator": training_data_collator,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise TetherError(f"PPOTrainer: {name} is not supported by tether (see docs/migration.md)")
        if ref_model is model:
            raise TetherError("PPOTrainer: ref_model must be a separate copy of the model (or None)")
        torch.manual_seed(config.seed)
        self.config, self.model, self.tokenizer = config, model, tokenizer
        if ref_model is None:
            reference = reference_copy(model.pretrained_model)
        else:
            reference = freeze(getattr(ref_model, "pretrained_model", ref_model))
        self.ref_model = ref_model if ref_model is not None else reference
        self.eos_id = tokenizer.eos_token_id
        internal = copy.deepcopy(tokenizer)
        if internal.pad_token_id is None or internal.pad_token_id == self.eos_id:
            internal.add_special_tokens({"pad_token": PAD_TOKEN})
        self.pad_id = internal.pad_token_id
        actor_critic = ActorCritic(model.pretrained_model)
        actor_critic.value_head = model.v_head  # share the user's head: training updates it in place
        self.run_config = config.to_run_config()
        self.core = CorePPOTrainer(self.run_config, actor_critic, reference, internal, _user_scores_only)
        self.placement, self.device = self.core.placement, self.core.device  # the core placed the models
        self.dataloader = None
        if dataset is not None:
            self.dataloader = torch.utils.data.DataLoader(
                dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, collate_fn=data_collator
            )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The Adam optimizer of the core trainer."""
        return self.core.optimizer

    @property
    def kl_ctl(self):
        """The KL controller (``.value`` is the current coefficient)."""
        return self.core.kl_ctl

    # ---- inputs -----------------------------------------------------------------------------------------------
    def _rows(self, tensors, what: str, strip_padding: bool = False) -> list[torch.Tensor]:
        """A list of 1-D LongTensors from a list of tensors or a (2-D) padded tensor (the user's padding removed)."""
        if isinstance(tensors, torch.Tensor):
            if tensors.dim() != 2:
                raise TetherError(
                    f"{what}: expected a list of 1-D tensors or a 2-D tensor, got shape {tuple(tensors.shape)}"
                )
            rows = [self._strip(r) if strip_padding else r for r in tensors]
        elif isinstance(tensors, (list, tuple)):
            rows = list(tensors)
        else:
            raise TetherError(f"{what}: expected a list of 1-D tensors, got {type(tensors).__name__}")
        for i, r in enumerate(rows):
            if not isinstance(r, torch.Tensor) or r.dim() != 1:
                raise TetherError(f"{what}[{i}]: expected a 1-D tensor of token ids")
            if r.numel() == 0:
                raise TetherError(f"{what}[{i}] is empty")
        return [r.long().cpu() for r in rows]

    def _strip(self, row: torch.Tensor) -> torch.Tensor:
        """Remove the user tokenizer's padding (on its ``padding_side``) from one row of a padded batch."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            return row
        real = (row != pad).nonzero().flatten()
        if real.numel() == 0:
            return row[:0]
        if getattr(self.tokenizer, "padding_side", "right") == "left":
            return row[real[0] :]
        return row[: real[-1] + 1]

    def _left_pad(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eos_id, dtype=torch.long)  # padding: any valid id, masked out
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        return self.placement.move(ids), self.placement.move(mask)

    # ---- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, query_tensor, length_sampler=None, batch_size: int = 4, return_prompt: bool = True, **generation_kwargs
    ):
        """Sample one response per query, left-padding internally; each stops after its first EOS (kept).

        ``query_tensor`` is a 1-D tensor (returns a (1, L) tensor), or a list of 1-D tensors / a padded 2-D tensor
        (returns a list of 1-D tensors); lists are generated ``batch_size`` queries at a time, tensors at once.
        With ``return_prompt=True`` (TRL's default) each result is query + response.
        Generation kwargs: ``max_new_tokens`` (default 32), ``do_sample`` (False = greedy, via top_k=1),
        ``temperature``, ``top_p``, ``top_k`` (default 0: off), ``min_length`` (<= 0 only); others raise.
        """
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1
        queries = self._rows([query_tensor] if single else query_tensor, "queries", strip_padding=True)
        sampling = self._sampling(dict(generation_kwargs))
        if isinstance(query_tensor, torch.Tensor):  # a padded batch is generated at once, as TRL did for tensors
            batch_size = max(batch_size, len(queries))
        out = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            if length_sampler is not None:
                sampling.max_new_tokens = int(length_sampler())
            ids, mask = self._left_pad(chunk)
            resp, resp_mask = generate(
                self.model.pretrained_model, ids, mask, sampling, self.eos_id, self.pad_id, self.placement.autocast
            )
            for q, r, n in zip(chunk, resp.cpu(), resp_mask.sum(-1).tolist()):
                out.append(torch.cat([q, r[:n]]) if return_prompt else r[:n])
        return out[0][None] if single else out

    def _sampling(self, kw: dict) -> Sampling:
        max_new = kw.pop("max_new_tokens", 32)
        do_sample = kw.pop("do_sample", True)
        temperature, top_p, top_k = kw.pop("temperature", 1.0), kw.pop("top_p", 1.0), kw.pop("top_k", 0)
        if (kw.pop("min_length", None) or 0) > 0:
            raise TetherError("generate: min_length > 0 is not supported")
        kw.pop("pad_token_id", None)
        if kw.pop("eos_token_id", self.eos_id) != self.eos_id:
            raise TetherError("generate: eos_token_id must be the tokenizer's eos_token_id")
        if kw:
            raise TetherError(
                f"generate: unsupported argument(s) {', '.join(sorted(kw))}; supported: "
                "max_new_tokens, do_sample, temperature, top_p, top_k"
            )
        if not do_sample:
            return Sampling(max_new, 1.0, 1.0, 1)  # greedy: sampling from the top-1 token is argmax
        if temperature <= 0:
            raise TetherError(f"generate: temperature must be > 0, got {temperature}")
        return Sampling(max_new, float(temperature), float(top_p), int(top_k or 0))

    # ---- one PPO iteration ------------------------------------------------------------------------------------------
    def step(self, queries, responses, scores, response_masks=None) -> dict:
        """One PPO iteration on the given batch; returns TRL's stats keys plus tether's own (docs/migration.md).

        Args:
            queries: ``config.batch_size`` 1-D token tensors, or the padded 2-D tensor the tokenizer returned.
            responses: ``config.batch_size`` 1-D token tensors. When every response starts with its query (as
                ``generate(return_prompt=True)`` returns them), the query part is removed first.
            scores: ``config.batch_size`` scalars (0-d or 1-element tensors, or floats), or a 1-D tensor.
            response_masks: optional 1-D masks multiplied into the response mask (TRL's argument).
        """
        t0 = time.perf_counter()
        n = self.config.batch_size
        queries = self._rows(queries, "queries", strip_padding=True)
        responses = self._rows(responses, "responses")
        scores = self._scores(scores)
        for what, items in (("queries", queries), ("responses", responses), ("scores", scores)):
            if len(items) != n:
                raise TetherError(f"step: got {len(items)} {what}, expected config.batch_size={n}")
        if all(len(r) > len(q) and torch.equal(r[: len(q)], q) for q, r in zip(queries, responses)):
            responses = [r[len(q) :] for q, r in zip(queries, responses)]
        prompt_ids, prompt_mask = self._left_pad(queries)
        width = max(len(r) for r in responses)
        response_ids = torch.full((n, width), self.eos_id, dtype=torch.long)
        response_mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(responses):
            eos = (r == self.eos_id).nonzero().flatten()
            length = int(eos[0]) + 1 if eos.numel() else len(r)
            response_ids[i, : len(r)], response_mask[i, :length] = r, 1
            if response_masks is not None:
                response_mask[i, : len(r)] *= torch.as_tensor(response_masks[i]).long().cpu()[: len(r)]
        response_ids, response_mask = self.placement.move(response_ids), self.placement.move(response_mask)
        raw = self.placement.move(torch.stack(scores))
        rollout = build_rollout(
            self.core.actor_critic,
            self.core.reference,
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            raw,
            1.0,
            self.eos_id,
            self.core.micro_batch_size,
            self.placement.autocast,
        )
        t_forward = time.perf_counter() - t0
        rollout, core_stats = self.core.step(rollout)
        t1 = time.perf_counter()
        stats = self._legacy_stats(rollout, core_stats)
        stats.update(
            {
                "time/ppo/forward_pass": t_forward,
                "time/ppo/calc_stats": time.perf_counter() - t1,
                "time/ppo/total": time.perf_counter() - t0,
            }
        )
        return stats

    def _scores(self, scores) -> list[torch.Tensor]:
        if isinstance(scores, torch.Tensor):
            if scores.dim() != 1:
                raise TetherError(
                    f"step: scores must be a list of scalars or a 1-D tensor, got shape {tuple(scores.shape)}"
                )
            scores = list(scores)
        out = []
        for i, s in enumerate(scores):
            s = torch.as_tensor(s).detach().float().cpu()
            if s.numel() != 1:
                raise TetherError(f"step: scores[{i}] must be a scalar, got shape {tuple(s.shape)}")
            if not torch.isfinite(s).all():
                raise TetherError(f"step: scores[{i}] is not finite ({s.item()})")
            out.append(s.reshape(()))
        return out

    def _legacy_stats(self, rollout: Rollout, core: dict) -> dict:
        """TRL's ``step()`` keys from the completed rollout and the core's stats (numpy arrays for distributions)."""
        mask = rollout.response_mask.float()
        kl_dist = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1)
        coef = core["kl/coef"]
        q_len, r_len = rollout.prompt_mask.sum(-1).float(), mask.sum(-1)
        returns_var = masked_var(rollout.returns, mask, unbiased=bool(mask.sum() > 1)).item()
        scores = rollout.scores
        stats = {TRL_NAMES[k]: core[k] for k in TRL_NAMES} | {
            "objective/kl_dist": kl_dist.cpu().numpy(),
            "objective/logprobs": rollout.logprobs.cpu().numpy(),
            "objective/ref_logprobs": rollout.ref_logprobs.cpu().numpy(),
            "objective/entropy": (-rollout.logprobs * mask).sum(-1).mean().item(),
            "ppo/mean_non_score_reward": masked_mean(-coef * rollout.kl, mask).item(),
            "ppo/mean_scores": scores.mean().item(),
            "ppo/std_scores": scores.std().item() if len(scores) > 1 else 0.0,
            "tokens/queries_len_mean": q_len.mean().item(),
            "tokens/queries_len_std": q_len.std(unbiased=False).item(),
            "tokens/queries_dist": q_len.cpu().numpy(),
            "tokens/responses_len_mean": r_len.mean().item(),
            "tokens/responses_len_std": r_len.std(unbiased=False).item(),
            "tokens/responses_dist": r_len.cpu().numpy(),
            "ppo/policy/advantages": rollout.advantages[mask.bool()].cpu().numpy(),
            "ppo/policy/advantages_mean": masked_mean(rollout.advantages, mask).item(),
            "ppo/returns/var": returns_var,
            "ppo/val/var_explained": 1.0 - core["ppo/value_error"] / returns_var if returns_var > 0 else 0.0,
        }
        return {**{k: float(v) for k, v in core.items()}, **stats}

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log=("query", "response")) -> dict:
        """Add TRL's ``env/reward_mean``, ``env/reward_std`` and ``env/reward_dist`` to ``stats`` (no tracker)."""
        r = torch.stack([torch.as_tensor(x).float().reshape(()) for x in rewards]).cpu()
        stats.update(
            {
                "env/reward_mean": r.mean().item(),
                "env/reward_std": r.std().item() if len(r) > 1 else 0.0,
                "env/reward_dist": r.numpy(),
            }
        )
        return stats

    def save_pretrained(self, save_directory) -> None:
        """Save the model (LM folder + ``value_head.safetensors``) and the user's tokenizer."""
        self.model.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)
