"""TRL's legacy ``PPOTrainer``: ``generate``, then ``step(queries, responses, scores)``, on tether's core trainer."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tether.algo import masked_mean, masked_var
from tether.checkpoint import STATE_FILE, list_checkpoints
from tether.errors import GuardStop, TetherError
from tether.legacy.config import PPOConfig
from tether.legacy.value_head import AutoModelForCausalLMWithValueHead
from tether.models import PAD_TOKEN, ActorCritic, freeze, reference_copy
from tether.rollout import Sampling, build_rollout, generate, merge_stops
from tether.trainers.ppo import PPOTrainer as CorePPOTrainer
from tether.types import Rollout

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


# generate() kwargs tether honours (docs/migration.md, "generate(...)"); length_sampler, batch_size, return_prompt,
# generate_ref_response and remove_padding are named parameters
GENERATE_KWARGS = (
    "max_new_tokens",
    "min_new_tokens",
    "min_length",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "eos_token_id",
    "pad_token_id",
)
# generate() kwargs that only concerned TRL's batching or Hugging Face's outputs: accepted, no effect on the samples
GENERATE_IGNORED = ("use_cache", "synced_gpus", "output_scores", "pad_to_multiple_of")
_OFF_POLICY = (
    "tether's sampler has no repetition processors, and PPO scores the unpenalised policy (off-policy samples)"
)
# generate() kwargs refused unless they have a value that changes nothing: name -> (those values, the reason)
GENERATE_REFUSED = {
    "num_beams": ((None, 1), "beam search is not sampling, and PPO needs responses sampled from the policy"),
    "num_return_sequences": ((None, 1), "one response per query; repeat a query to sample it several times"),
    "repetition_penalty": ((None, 1.0), _OFF_POLICY),
    "no_repeat_ngram_size": ((None, 0), _OFF_POLICY),
    "return_dict_in_generate": ((None, False), "generate returns token tensors only, as TRL's batched generate did"),
}


def _whole(value, name: str, lowest: int | None = 0) -> int:
    """``value`` as an int (a whole float such as TRL's ``top_k=0.0`` is fine); TetherError if not whole or too low."""
    try:
        whole = int(value)
        ok = whole == value and (lowest is None or whole >= lowest) and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        bound = "" if lowest is None else f" >= {lowest}"
        raise TetherError(f"generate: {name} must be a whole number{bound}, got {value!r}")
    return whole


def _sampling(kw: dict) -> Sampling:
    """The sampler's settings from ``generate``'s kwargs; ``do_sample=False`` is greedy (sampling from the top-1)."""
    max_new = _whole(kw.get("max_new_tokens", 32), "max_new_tokens", lowest=1)
    min_new = _whole(kw.get("min_new_tokens") or 0, "min_new_tokens")
    if not kw.get("do_sample", True):
        return Sampling(max_new, 1.0, 1.0, 1, min_new)
    temperature, top_p = kw.get("temperature", 1.0), kw.get("top_p", 1.0)
    if temperature is None or temperature <= 0:
        raise TetherError(f"generate: temperature must be > 0, got {temperature}")
    top_k = _whole(kw.get("top_k") or 0, "top_k")  # 0 (or TRL's 0.0): off
    return Sampling(max_new, float(temperature), float(1.0 if top_p is None else top_p), top_k, min_new)


@dataclass
class _Generation:
    """What ``generate``'s kwargs ask for: sampler settings, HF's ``min_length``, stop ids, the padding id."""

    sampling: Sampling
    min_length: int
    stops: list[int]
    fill_id: int

    def for_batch(self, width: int, length_sampler=None) -> Sampling:
        """The settings for one left-padded batch ``width`` tokens wide: ``length_sampler()`` gives max_new_tokens,
        and ``min_length`` (prompt + response, as in HF) becomes ``min_length - width`` new tokens, as TRL got."""
        max_new = self.sampling.max_new_tokens if length_sampler is None else int(length_sampler())
        min_new = max(self.sampling.min_new_tokens, self.min_length - width)
        return replace(self.sampling, max_new_tokens=max_new, min_new_tokens=min_new)


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
        self._checkpoints: Path | None = None  # where save_checkpoint writes and the KL guard restores from
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
        self,
        query_tensor,
        length_sampler=None,
        batch_size: int = 4,
        return_prompt: bool = True,
        generate_ref_response: bool = False,
        remove_padding: bool = True,
        **generation_kwargs,
    ):
        """Sample one response per query, left-padding internally; each stops after its first stop token (kept).

        ``query_tensor`` is a 1-D tensor (returns a (1, L) tensor), or a list of 1-D tensors / a padded 2-D tensor
        (returns a list of 1-D tensors); lists are generated ``batch_size`` queries at a time, tensors at once.
        With ``return_prompt=True`` (TRL's default) each result is query + response. ``length_sampler()`` sets
        ``max_new_tokens`` per batch. ``generate_ref_response=True`` also samples the reference model and returns
        ``(responses, ref_responses)``. ``remove_padding=False`` keeps each batch's padding after the stop token
        (filled with ``pad_token_id``), as TRL did. ``generation_kwargs``: see :data:`GENERATE_KWARGS`,
        :data:`GENERATE_IGNORED` and :data:`GENERATE_REFUSED` (docs/migration.md has the table).
        """
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1
        queries = self._rows([query_tensor] if single else query_tensor, "queries", strip_padding=True)
        gen = self._generation(dict(generation_kwargs))
        if isinstance(query_tensor, torch.Tensor):  # a padded batch is generated at once, as TRL did for tensors
            batch_size = max(batch_size, len(queries))
        models = [self.model.pretrained_model] + ([self.core.reference] if generate_ref_response else [])
        outs = []
        for model in models:  # the policy's batches first, then the reference's, as TRL did
            out = self._generate_batched(
                model, queries, gen, length_sampler, batch_size, return_prompt, remove_padding
            )
            outs.append(out[0][None] if single else out)
        return tuple(outs) if generate_ref_response else outs[0]

    def _generate_batched(self, model, queries, gen, length_sampler, batch_size, return_prompt, remove_padding):
        """One response per query from ``model``, ``batch_size`` queries at a time (TRL's ``_generate_batched``)."""
        out = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            ids, mask = self._left_pad(chunk)
            sampling = gen.for_batch(ids.shape[1], length_sampler)
            resp, resp_mask = generate(model, ids, mask, sampling, gen.stops, self.pad_id, self.placement.autocast)
            for q, r, m in zip(chunk, resp.cpu(), resp_mask.cpu()):
                r = r.masked_fill(m == 0, gen.fill_id) if not remove_padding else r[: int(m.sum())]
                out.append(torch.cat([q, r]) if return_prompt else r)
        return out

    def _generation(self, kw: dict) -> _Generation:
        """Check ``generate``'s kwargs (one-line TetherError for a refused or unknown one) and collect them."""
        for name, (no_op, reason) in GENERATE_REFUSED.items():
            if name in kw and kw.pop(name) not in no_op:
                raise TetherError(f"generate: {name} is not supported: {reason}")
        for name in GENERATE_IGNORED:
            kw.pop(name, None)
        known = {name: kw.pop(name) for name in GENERATE_KWARGS if name in kw}
        if kw:
            raise TetherError(
                f"generate: unsupported argument(s) {', '.join(sorted(kw))}; supported: "
                f"{', '.join(GENERATE_KWARGS + GENERATE_IGNORED)} (docs/migration.md)"
            )
        return _Generation(
            sampling=_sampling(known),
            min_length=_whole(known.get("min_length") or 0, "min_length", lowest=None),  # <= 0: off (TRL's -1)
            stops=self._stops(known.get("eos_token_id")),
            fill_id=self._fill_id(known.get("pad_token_id")),
        )

    def _stops(self, eos_token_id) -> list[int]:
        """Stop ids: the user's ``eos_token_id`` (an int or a list) after the tokenizer's EOS, which always stops
        (TRL cut responses at it); by default the policy's ``generation_config`` ids too, as HF generate used."""
        if eos_token_id is None:
            return list(self.core.stops)
        given = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        return merge_stops(self.eos_id, [_whole(i, "eos_token_id") for i in given])

    def _fill_id(self, pad_token_id) -> int:
        """The id after the stop token when ``remove_padding=False``: ``pad_token_id``, else the tokenizer's pad or
        EOS (tether's own padding is internal and never returned)."""
        if pad_token_id is not None:
            return _whole(pad_token_id, "pad_token_id")
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else pad

    # ---- one PPO iteration ------------------------------------------------------------------------------------------
    def step(self, queries, responses, scores, response_masks=None) -> dict:
        """One PPO iteration on the given batch; returns TRL's stats keys plus tether's own (docs/migration.md).

        Args:
            queries: ``config.batch_size`` 1-D token tensors, or the padded 2-D tensor the tokenizer returned.
            responses: ``config.batch_size`` 1-D token tensors. When every response starts with its query (as
                ``generate(return_prompt=True)`` returns them), the query part is removed first.
            scores: ``config.batch_size`` scalars (0-d or 1-element tensors, or floats), or a 1-D tensor. A
                non-finite score is replaced by the mean of the finite ones (counted in ``guard/nonfinite_scores``).
            response_masks: optional 1-D masks multiplied into the response mask (TRL's argument).

        With ``config.kl_stop`` set, a KL to the reference above it restores the newest stable checkpoint written
        by :meth:`save_checkpoint`, then raises :class:`tether.errors.GuardStop` (``kl_stop_action="stop"``) or
        continues with the learning rate times ``kl_stop_lr_factor`` (``"rollback"``, with a warning).
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
        sampled_from = self.core.iteration
        rollout, core_stats = self.core.step(rollout)
        core_stats |= self._guard(core_stats, sampled_from)
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

    # ---- checkpoints and the KL guard (tether additions) -------------------------------------------------------
    def save_checkpoint(self, folder) -> Path:
        """Write ``folder/step_N`` (N = ``step`` calls so far): the model and value head, Adam, the KL controller,
        the score normaliser and every RNG, so :meth:`load_checkpoint` continues exactly; keeps the newest 3 and
        the newest stable one. These are also what ``PPOConfig.kl_stop`` restores."""
        self._checkpoints = Path(folder)
        return self.core.save(self._checkpoints)

    def load_checkpoint(self, path) -> int:
        """Continue from ``path``: a ``step_N`` folder, or a folder of them (the newest is used). Returns N, the
        number of ``step`` calls done then (your loop's own position, e.g. its dataloader, is yours to restore)."""
        path = Path(path)
        found = [path] if (path / STATE_FILE).is_file() else list_checkpoints(path)
        if not found:
            raise TetherError(f"load_checkpoint: no checkpoint at {path}")
        self._checkpoints = found[-1].parent
        return self.core.restore(found[-1])["iteration"]

    def _guard(self, core_stats: dict, sampled_from: int) -> dict:
        """``kl_stop``: above it, restore the newest stable checkpoint, then raise :class:`GuardStop`
        (``kl_stop_action="stop"``) or go on at a lower learning rate (``"rollback"``)."""
        if self.run_config.ppo.kl_stop is None:
            return {}
        messages = []
        stats = self.core.apply_guards(core_stats, sampled_from, self._checkpoints, echo=messages.append)
        if self.core.stopped:
            raise GuardStop(f"PPOTrainer.step: {messages[-1]}")
        for message in messages:
            warnings.warn(f"PPOTrainer.step: {message}", stacklevel=3)
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
