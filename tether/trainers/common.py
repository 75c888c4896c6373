"""What every trainer shares: seeding, the run folder, learning-rate schedules, progress bars, model saving, and the
checkpoints of the step-counted trainers (SFT, reward model)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from tqdm.auto import tqdm

from tether.checkpoint import (
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    python_rng_state,
    save_checkpoint,
    step_dir,
)
from tether import distributed
from tether.config import RunConfig
from tether.fields import to_dict
from tether.errors import Interrupted, TetherError
from tether.lora import export_policy
from tether.precision import state_dict_in
from tether.tracking import truncate_metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(config: RunConfig, command: str) -> Path:
    """Create the run folder and write the resolved config into it as ``config.yaml`` (rank 0; every rank gets its
    name)."""
    name = config.output_dir or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(distributed.broadcast_object(name))  # rank 0's timestamp on every rank
    if not distributed.is_main():
        distributed.barrier()  # until rank 0 has made it
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise TetherError(f"output_dir '{run_dir}' is an existing file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a parent is a file, or no permission
        raise TetherError(f"output_dir '{run_dir}': cannot create the folder ({e.strerror})") from None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    distributed.barrier()
    return run_dir


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def allocate_adam_state(optimizer: torch.optim.Adam) -> None:
    """Adam's state for every trainable weight now, as its first step would make it (zero moments, step count 0).

    Made lazily, at the first step, the moments (twice the trained weights) land among the update's freed blocks, and
    a CPU process keeps the heap they scatter; made before any activation, they lie in one stretch (tested to train
    the same weights)."""
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))  # where Adam keeps its step count
        for p in group["params"]:
            if p.requires_grad and not optimizer.state[p]:
                state = {
                    "step": torch.zeros((), dtype=torch.float32 if on_device else torch.get_default_dtype(),
                                        device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }  # fmt: skip
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                optimizer.state[p] = state


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Shown(NamedTuple):
    """A metric a phase's display shows: ``short`` on the live bar, ``label`` in the summary line, where ``trend``
    shows its first and last values (``loss 2.31 -> 0.12``) instead of the last one."""

    key: str
    short: str
    label: str
    trend: bool = False


class Progress:
    """One phase's display. On a terminal (stderr is a TTY): a tqdm bar whose postfix carries the phase's key metrics
    (``shown``), and no metric lines when stdout is that terminal too (:attr:`quiet`). Elsewhere (CI, pipes, logs):
    no bar, so the :class:`~tether.tracking.MetricLogger` lines are the output. Either way, leaving the ``with``
    block normally prints one summary line through ``echo``.

    Feed it each logged row with :meth:`show`; print other messages while it runs with :meth:`echo`.
    """

    def __init__(self, total: int, desc: str, initial: int = 0, shown=(), unit: str = "steps", echo=print):
        self.total, self.desc, self.initial, self.unit, self.shown = total, desc, initial, unit, tuple(shown)
        self.live = sys.stderr.isatty() and distributed.is_main()
        self.quiet = self.live and sys.stdout.isatty()  # metric lines would land on the bar's screen
        self.bar = tqdm(
            total=total,
            desc=desc,
            initial=initial,
            leave=False,
            disable=not self.live,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self._echo, self.done, self.start = echo, 0, time.time()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def update(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.done += n
        self.bar.update(n)

    def show(self, metrics: dict) -> None:
        """Record a logged row's key metrics; on the bar they replace the previous ones."""
        for s in self.shown:
            value = metrics.get(s.key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.first.setdefault(s.key, value)
                self.last[s.key] = value
        if self.live:
            postfix = [f"{s.short}={self.last[s.key]:.3g}" for s in self.shown if s.key in self.last]
            self.bar.set_postfix_str(" ".join(postfix), refresh=False)

    def echo(self, text: str) -> None:
        """Print a message; the live bar is cleared first and redrawn below it."""
        if not self.live:
            self._echo(text)
            return
        self.bar.clear()
        self._echo(text)
        sys.stdout.flush()
        self.bar.refresh()

    def summary(self) -> str:
        """``sft: 600 steps in 21 s, loss 2.31 -> 0.12, token accuracy 0.98``"""
        end = self.initial + self.done
        of = f" of {self.total}" if end < self.total else ""
        span = f"{self.unit} {self.initial}-{end}{of}" if self.initial else f"{end}{of} {self.unit}"
        parts = [f"{self.desc}: {span} in {_duration(time.time() - self.start)}"]
        for s in self.shown:
            if s.key in self.last:
                first = f"{self.first[s.key]:.3g} -> " if s.trend else ""
                parts.append(f"{s.label} {first}{self.last[s.key]:.3g}")
        return ", ".join(parts)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is None:
            self._echo(self.summary())


def progress(total: int, desc: str, initial: int = 0, shown=(), unit: str = "steps", echo=print) -> Progress:
    """The display of one phase: a bar with its ``shown`` metrics on a terminal, a summary line at its end."""
    return Progress(total, desc, initial, shown, unit, echo)


def _duration(seconds: float) -> str:
    """``0.4 s``, ``21 s``, ``3 min 05 s``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


@contextlib.contextmanager
def stop_requests():
    """Catch SIGINT and SIGTERM while training: yields a list that receives the signal number, so the loop can finish
    its iteration and checkpoint. A second signal acts as usual (the handlers are reset after the first)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        received.append(signum)
        for s, h in previous.items():
            signal.signal(s, h)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_side_thread: futures.ThreadPoolExecutor | None = None


def side_by_side(first, second) -> tuple:
    """``first()`` on this thread and ``second()`` on a worker thread at the same time, each with one intra-op
    thread (torch's thread count is restored after): two independent pieces of work, one per CPU core. Returns
    both results; an exception from either is raised once both have finished."""
    global _side_thread
    if _side_thread is None:
        _side_thread = futures.ThreadPoolExecutor(1, thread_name_prefix="tether-side")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        other = _side_thread.submit(_on_one_thread, second)
        try:
            mine = first()
        finally:
            futures.wait([other])
        return mine, other.result()
    finally:
        torch.set_num_threads(threads)


def _on_one_thread(fn):
    torch.set_num_threads(1)  # the count is this thread's own where OpenMP keeps one per thread
    return fn()


def write_summary(run_dir: Path, summary: dict) -> Path:
    """``<run>/summary.json``, written atomically (by rank 0)."""
    path = Path(run_dir) / "summary.json"
    if not distributed.is_main():
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(path)
    return path


def save_model(model, tokenizer, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """save_pretrained (safetensors) of a model and its tokenizer, written atomically, the weights in ``dtype``.

    Weights in another dtype are cast on the way out (one CPU copy in ``dtype``; the model keeps its own), and
    config.json records ``dtype``: a bf16 run trained on float32 master weights is saved in bf16. Rank 0 writes;
    the others wait for it.
    """
    path = Path(path)
    whole = distributed.gathered_state_dict(model)  # FSDP: the split weights gathered for rank 0 (None otherwise)
    if distributed.is_main():
        _save_model(model, tokenizer, path, dtype, whole)
    distributed.barrier()
    return path


def _save_model(model, tokenizer, path: Path, dtype: torch.dtype, whole: dict | None = None) -> None:
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    exported, state = export_policy(model, whole)
    state = state_dict_in(exported, dtype, state)
    exported.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    if state is not None:  # save_pretrained wrote the model's own dtype into config.json
        held, exported.config.dtype = exported.config.dtype, str(dtype).removeprefix("torch.")
        exported.config.save_pretrained(tmp)
        exported.config.dtype = held
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def saved_pad_id(model, tokenizer) -> int:
    """The pad id to write into a model's config: the tokenizer's, unless tether added it beyond the model's
    embeddings (a pad = EOS tokenizer gets its own pad token, never embedded); then EOS, as such models pad."""
    pad = tokenizer.pad_token_id
    return pad if pad < model.get_input_embeddings().num_embeddings else tokenizer.eos_token_id


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of a fresh random permutation of range(n), cut into ``batch_size`` pieces."""
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class StepCheckpoints:
    """Checkpoints of a step-counted trainer (``tether sft``, ``tether reward``) under ``<run>/checkpoints``.

    :meth:`after_step` writes one every ``save_every`` optimizer steps and when SIGINT/SIGTERM asked to stop (then
    raises :class:`Interrupted`); only the newest is kept. :meth:`resume` loads one so the run continues exactly:
    weights, optimizer, every RNG, the trainer's own ``state`` (e.g. its data order), metrics after it dropped.
    """

    def __init__(self, command: str, run_dir: Path, config: RunConfig, model, optimizer, save_every: int):
        self.command, self.run_dir, self.config = command, Path(run_dir), config
        self.model, self.optimizer, self.save_every = model, optimizer, save_every
        self.root = self.run_dir / "checkpoints"

    def resume(self, path: Path) -> dict:
        """Restore the checkpoint at ``path``; returns its state (``state["step"]``: optimizer steps done)."""
        state = load_training_state(path, self.model, self.optimizer)
        if distributed.is_main():
            truncate_metrics(self.run_dir / "metrics.jsonl", state["step"] - 1)  # rows are logged at 0-based steps
        return state

    def after_step(self, step: int, total: int, stop: list[int], state: dict) -> None:
        """``step`` optimizer steps of ``total`` are done: write a checkpoint with ``state`` if one is due or a
        signal asked to stop (then raise :class:`Interrupted`); a signal to any rank stops every rank."""
        stop = distributed.agree_stop(stop)
        due = self.save_every and step % self.save_every == 0 and step < total
        if due or stop:  # every rank: FSDP gathers the split weights for rank 0, which writes
            meta = {"command": self.command, "step": step, **state, "config": to_dict(self.config)}
            save_checkpoint(step_dir(self.root, step), self.model, self.optimizer, meta)
            if distributed.is_main():
                prune_checkpoints(self.root, keep=1)
            distributed.barrier()
        if stop:
            raise Interrupted(stop[0], f"{self.command} step {step}", self.command, self.run_dir)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


class PairOrder:
    """The pair trainers' data order (reward, dpo): ``epochs`` passes over ``count`` records, each pass a fresh
    in-place shuffle of the previous order by ``random.Random(seed)``, in batches of ``batch_size``; resumable at any
    step from :meth:`state` (each epoch's order depends on the one before it)."""

    def __init__(self, count: int, batch_size: int, epochs: int, seed: int):
        self.batch_size = batch_size
        self.steps_per_epoch = (count + batch_size - 1) // batch_size
        self.total = self.steps_per_epoch * epochs
        self.rng, self.order = random.Random(seed), list(range(count))

    def batch(self, step: int) -> list[int]:
        """The record indices of optimizer step ``step`` (steps are taken in order; an epoch's first reshuffles)."""
        index = step % self.steps_per_epoch
        if index == 0:
            self.rng.shuffle(self.order)
        return self.order[index * self.batch_size : (index + 1) * self.batch_size]

    def ends_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == self.steps_per_epoch - 1

    def state(self) -> dict:
        return {"order": self.order, "shuffle_rng": self.rng.getstate()}

    def start(self, checkpoints: StepCheckpoints, resume_from: Path | None) -> int:
        """The first step to take: 0, or the step of the checkpoint ``resume_from``, whose order this restores."""
        if resume_from is None:
            return 0
        state = checkpoints.resume(resume_from)
        self.order = state["order"]
        self.rng.setstate(python_rng_state(state["shuffle_rng"]))
        return state["step"]
