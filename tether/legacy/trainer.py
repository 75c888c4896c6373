"""TRL's legacy ``PPOTrainer``: ``generate``, then ``step(queries, responses, scores)``, on tether's core trainer."""

from __future__ import annotations

import copy
import inspect
import time
import warnings
from pathlib import Path

import torch

from tether.checkpoint import STATE_FILE, list_checkpoints
from tether.errors import GuardStop, TetherError
from tether.legacy.accelerator import SingleDeviceAccelerator
from tether.legacy.arguments import check_arguments, run_config_for, training_collator
from tether.legacy.config import PPOConfig
from tether.legacy.core import set_seed
from tether.legacy.engine import LegacyEngine, full_kl
from tether.legacy.errors import LegacyValueError
from tether.legacy.generation import parse_generation
from tether.legacy.reference import create_reference_model
from tether.legacy.stats import legacy_stats
from tether.lora import AdapterDisabledReference
from tether.models import PAD_TOKEN, ActorCritic, enable_gradient_checkpointing, freeze
from tether.rollout import build_rollout, generate


class PPOTrainer:
    """TRL's legacy ``PPOTrainer``: the user samples with :meth:`generate`, scores, and calls :meth:`step`.

    Training updates ``model`` (its LM and ``v_head``) in place. ``tokenizer`` is not modified; internally tether
    pads with a token distinct from EOS, so EOS is always a learnable response token. Bad arguments raise
    :class:`LegacyValueError` (a ``ValueError``, as in TRL).

    Args:
        config: a :class:`PPOConfig`.
        model: the policy, an :class:`AutoModelForCausalLMWithValueHead`.
        ref_model: the frozen reference (a value-head model or a causal LM). None: a frozen copy of ``model``
            (:func:`create_reference_model`), or for a PEFT model no copy at all: the reference is ``model`` with
            its adapter disabled, and ``ref_model`` stays None (as in TRL).
        tokenizer: the policy's tokenizer (its ``pad_token`` may equal its ``eos_token``).
        dataset: optional; gives ``self.dataloader`` (:meth:`prepare_dataloader`).
        optimizer: a torch optimizer over the model's parameters; None: Adam at ``config.learning_rate``.
        data_collator: ``collate_fn`` of that dataloader.
        num_shared_layers: without ``ref_model``: the first layers frozen in both models (see
            :func:`create_reference_model`).
        lr_scheduler: a torch LR scheduler of ``optimizer``, stepped after each :meth:`step`.
        training_data_collator: None, or a ``DataCollatorForLanguageModeling(mlm=False)`` (what TRL used; tether
            pads queries and responses itself).
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
        check_arguments(config, model, ref_model, tokenizer, optimizer, lr_scheduler)
        config.check()
        set_seed(config.seed)
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.is_peft_model, self.is_encoder_decoder = model.is_peft_model, False
        config.is_peft_model, config.is_encoder_decoder = self.is_peft_model, False
        self.ref_model, reference = self._reference(ref_model, num_shared_layers)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(True, model.pretrained_model)
        self.data_collator = training_collator(training_data_collator, tokenizer)
        self.eos_id = tokenizer.eos_token_id
        internal = copy.deepcopy(tokenizer)
        if internal.pad_token_id is None or internal.pad_token_id == self.eos_id:
            internal.add_special_tokens({"pad_token": PAD_TOKEN})
        self.pad_id = internal.pad_token_id
        actor_critic = ActorCritic(model.pretrained_model)
        actor_critic.value_head = model.v_head  # share the user's head: training updates it in place
        self.run_config = run_config_for(config, model)
        self.core = LegacyEngine(config, self.run_config, actor_critic, reference, internal, optimizer)
        self.lr_scheduler = lr_scheduler
        self.placement, self.device = self.core.placement, self.core.device  # the core placed the models
        self.current_device = self.device
        self.accelerator = SingleDeviceAccelerator(self.placement, config.gradient_accumulation_steps)
        self.is_distributed, self.current_step = False, 0
        self._checkpoints: Path | None = None  # where save_checkpoint writes and the KL guard restores from
        self.dataset = dataset
        self.dataloader = self.prepare_dataloader(dataset, data_collator) if dataset is not None else None

    def _reference(self, ref_model, num_shared_layers):
        """``(self.ref_model, the reference the core scores with)``, as TRL chose them."""
        if self.is_peft_model:
            if ref_model is not None:
                warnings.warn(
                    "PPOTrainer: ref_model is not used with a PEFT model: the reference is the model with its adapter "
                    "disabled (as in TRL)",
                    stacklevel=3,
                )
            return ref_model, AdapterDisabledReference(self.model.pretrained_model)
        if ref_model is not None:
            if num_shared_layers is not None:
                warnings.warn("PPOTrainer: num_shared_layers is ignored when ref_model is given", stacklevel=3)
            return ref_model, freeze(getattr(ref_model, "pretrained_model", ref_model))
        ref_model = create_reference_model(self.model, num_shared_layers=num_shared_layers)
        return ref_model, ref_model.pretrained_model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer: the one given, or Adam at ``config.learning_rate``."""
        return self.core.optimizer

    @property
    def kl_ctl(self):
        """The KL controller (``.value`` is the current coefficient)."""
        return self.core.kl_ctl

    @property
    def running(self):
        """The running moments of the scores (``use_score_scaling``): ``.mean``, ``.std``, ``.count``."""
        return self.core.moments

    def prepare_dataloader(self, dataset, data_collator=None) -> torch.utils.data.DataLoader:
        """Batches of ``config.batch_size``, shuffled, the last partial one dropped. A ``datasets.Dataset`` loses
        the columns ``model.forward`` does not take (except label, query, response) when ``remove_unused_columns``."""
        if (
            hasattr(dataset, "remove_columns")
            and hasattr(dataset, "column_names")
            and self.config.remove_unused_columns
        ):
            keep = set(inspect.signature(self.model.forward).parameters) | {"label", "query", "response"}
            dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=True, drop_last=True, collate_fn=data_collator
        )

    # ---- inputs -----------------------------------------------------------------------------------------------
    def _rows(self, tensors, what: str, strip_padding: bool = False) -> list[torch.Tensor]:
        """A list of 1-D LongTensors from a list of tensors or a (2-D) padded tensor (the user's padding removed)."""
        if isinstance(tensors, torch.Tensor):
            if tensors.dim() != 2:
                raise LegacyValueError(
                    f"{what}: expected a list of 1-D tensors or a 2-D tensor, got shape {tuple(tensors.shape)}"
                )
            rows = [self._strip(r) if strip_padding else r for r in tensors]
        elif isinstance(tensors, (list, tuple)):
            rows = list(tensors)
        else:
            raise LegacyValueError(f"{what}: expected a list of 1-D tensors, got {type(tensors).__name__}")
        for i, r in enumerate(rows):
            if not isinstance(r, torch.Tensor) or r.dim() != 1:
                raise LegacyValueError(f"{what}[{i}]: expected a 1-D tensor of token ids")
            if r.numel() == 0:
                raise LegacyValueError(f"{what}[{i}] is empty")
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
        ``max_new_tokens`` per batch. ``generate_ref_response=True`` also samples the reference (for a PEFT model,
        the model with its adapter disabled) and returns ``(responses, ref_responses)``. ``remove_padding=False``
        keeps each batch's padding after the stop token (filled with ``pad_token_id``), as TRL did.
        ``generation_kwargs``: see :mod:`tether.legacy.generation` (docs/migration.md has the table).
        """
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1
        queries = self._rows([query_tensor] if single else query_tensor, "queries", strip_padding=True)
        pad = self.tokenizer.pad_token_id
        gen = parse_generation(generation_kwargs, self.core.stops, self.eos_id, self.eos_id if pad is None else pad)
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

        The config is checked again first (a field changed since is used, as TRL read it at each step). After the
        update ``lr_scheduler.step()`` runs, if one was given, and with ``optimize_device_cache`` (or
        ``optimize_cuda_cache``) the CUDA cache is emptied. With ``config.kl_stop`` set, a KL to the reference
        above it restores the newest stable checkpoint written by :meth:`save_checkpoint`, then raises
        :class:`tether.errors.GuardStop` (``kl_stop_action="stop"``) or continues with the learning rate times
        ``kl_stop_lr_factor`` (``"rollback"``, with a warning).
        """
        t0 = time.perf_counter()
        self._sync_config()
        n = self.config.batch_size
        queries = self._rows(queries, "queries", strip_padding=True)
        responses = self._rows(responses, "responses")
        scores = self._scores(scores)
        for what, items in (("queries", queries), ("responses", responses), ("scores", scores)):
            if len(items) != n:
                raise LegacyValueError(f"step: got {len(items)} {what}, expected config.batch_size={n}")
        if all(len(r) > len(q) and torch.equal(r[: len(q)], q) for q, r in zip(queries, responses)):
            responses = [r[len(q) :] for q, r in zip(queries, responses)]
        rollout = self._rollout(queries, responses, scores, response_masks)
        t_forward = time.perf_counter() - t0
        sampled_from = self.core.iteration
        rollout, core_stats = self.core.step(rollout)
        core_stats |= self._guard(core_stats, sampled_from)
        t1 = time.perf_counter()
        stats = legacy_stats(rollout, core_stats, self.core.ratios)
        stats.update(
            {
                "time/ppo/forward_pass": t_forward,
                "time/ppo/calc_stats": time.perf_counter() - t1,
                "time/ppo/total": time.perf_counter() - t0,
            }
        )
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        if self.config.optimize_device_cache or self.config.optimize_cuda_cache:
            self.accelerator.free_memory()  # collect garbage and empty the CUDA cache, as TRL did around step()
        return stats

    def _sync_config(self) -> None:
        """Check ``self.config`` again and hand its current PPO settings to the core (the KL controller, optimizer
        and devices stay as they were built, as in TRL)."""
        ppo = self.config.to_run_config().ppo
        self.run_config.ppo = self.core.cfg = ppo
        self.core.micro_batch_size = ppo.micro_batch_size or ppo.mini_batch_size

    def _rollout(self, queries, responses, scores, response_masks):
        """The :class:`tether.types.Rollout` of the user's batch: padding, masks up to the first EOS, old and
        reference log-probs and values (and the full-vocabulary KL for ``kl_penalty="full"``)."""
        n = len(queries)
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
        core = self.core
        args = (core.actor_critic, core.reference, prompt_ids, prompt_mask, response_ids, response_mask)
        rollout = build_rollout(
            *args,
            self.placement.move(torch.stack(scores)),
            1.0,
            self.eos_id,
            core.micro_batch_size,
            core.placement.autocast,
        )
        full = self.config.kl_penalty == "full"
        core.full_kl = (
            full_kl(
                core.actor_critic, core.reference, rollout, core.micro_batch_size, core.placement.autocast, self.eos_id
            )
            if full
            else None
        )
        return rollout

    def _scores(self, scores) -> list[torch.Tensor]:
        if isinstance(scores, torch.Tensor):
            if scores.dim() != 1:
                raise LegacyValueError(
                    f"step: scores must be a list of scalars or a 1-D tensor, got shape {tuple(scores.shape)}"
                )
            scores = list(scores)
        out = []
        for i, s in enumerate(scores):
            s = torch.as_tensor(s).detach().float().cpu()
            if s.numel() != 1:
                raise LegacyValueError(f"step: scores[{i}] must be a scalar, got shape {tuple(s.shape)}")
            out.append(s.reshape(()))
        return out

    # ---- checkpoints and the KL guard (tether additions) -------------------------------------------------------
    def save_checkpoint(self, folder) -> Path:
        """Write ``folder/step_N`` (N = ``step`` calls so far): the model and value head, the optimizer, the KL
        controller, the score normaliser and every RNG, so :meth:`load_checkpoint` continues exactly; keeps the
        newest 3 and the newest stable one. These are also what ``PPOConfig.kl_stop`` restores."""
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

    # ---- logging and saving -------------------------------------------------------------------------------------
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
        """Save the model (TRL's layout: the value head inside the model's safetensors) and the tokenizer."""
        self.model.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)

    def push_to_hub(self, *args, **kwargs):
        """Not offered: tether never uploads. Use :meth:`save_pretrained` and upload the folder yourself."""
        self.model.push_to_hub()
