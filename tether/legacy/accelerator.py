"""``PPOTrainer.accelerator``: what TRL scripts use of accelerate's ``Accelerator``, for tether's one process.

tether runs one process on one device, so the distributed parts are identities (``gather``, ``unwrap_model``,
``prepare``, ``wait_for_everyone``) and the process is always the main one. accelerate itself is not needed.
"""

from __future__ import annotations

import contextlib
import gc
from types import SimpleNamespace

import torch

from tether.precision import Placement


class SingleDeviceAccelerator:
    """accelerate's ``Accelerator`` as one process on ``placement.device`` sees it.

    Args:
        placement: where the trainer put its models (device and precision).
        gradient_accumulation_steps: the config's value (tether accumulates inside each PPO minibatch itself).
    """

    num_processes = 1
    process_index = 0
    local_process_index = 0
    is_main_process = True
    is_local_main_process = True
    is_last_process = True
    use_distributed = False
    distributed_type = "NO"
    sync_gradients = True
    optimizer_step_was_skipped = False
    trackers: tuple = ()

    def __init__(self, placement: Placement, gradient_accumulation_steps: int = 1):
        self.placement = placement
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.mixed_precision = "bf16" if placement.dtype == torch.bfloat16 else "no"
        self.state = SimpleNamespace(
            device=placement.device,
            num_processes=1,
            process_index=0,
            local_process_index=0,
            distributed_type="NO",
            mixed_precision=self.mixed_precision,
            deepspeed_plugin=None,
            fsdp_plugin=None,
            megatron_lm_plugin=None,
            use_distributed=False,
            is_main_process=True,
            is_local_main_process=True,
        )

    @property
    def device(self) -> torch.device:
        """The device every model and tensor of the trainer is on."""
        return self.placement.device

    def unwrap_model(self, model, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True):
        """``model`` itself: nothing wraps it in one process."""
        return model

    def prepare(self, *objects):
        """The objects unchanged (one process: no wrapping, no sharding); one object is returned alone."""
        return objects[0] if len(objects) == 1 else objects

    def gather(self, tensor):
        """``tensor`` unchanged (one process holds everything)."""
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction: str = "sum", scale: float = 1.0):
        """``tensor`` (times ``scale``): one process has nothing to reduce with."""
        return tensor * scale if scale != 1.0 else tensor

    def pad_across_processes(self, tensor, dim: int = 0, pad_index: int = 0, pad_first: bool = False):
        """``tensor`` unchanged."""
        return tensor

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""

    @contextlib.contextmanager
    def main_process_first(self):
        """A no-op context: this process is the main one."""
        yield

    local_main_process_first = main_process_first

    @contextlib.contextmanager
    def split_between_processes(self, inputs, apply_padding: bool = False):
        """Yields ``inputs`` whole: one process takes all of them."""
        yield inputs

    @contextlib.contextmanager
    def accumulate(self, *models):
        """A no-op context (tether accumulates gradients within each PPO minibatch itself)."""
        yield

    @contextlib.contextmanager
    def no_sync(self, model=None):
        """A no-op context: there is nothing to synchronise."""
        yield

    def autocast(self, *args, **kwargs):
        """The trainer's autocast context (bf16 with ``mixed_precision="bf16"``, else none)."""
        return self.placement.autocast()

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward()``."""
        loss.backward(**kwargs)

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_``."""
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters, clip_value: float) -> None:
        """``torch.nn.utils.clip_grad_value_``."""
        torch.nn.utils.clip_grad_value_(parameters, clip_value)

    def print(self, *args, **kwargs) -> None:
        """``print`` (this process is the main one)."""
        print(*args, **kwargs)

    def log(self, values: dict, step: int | None = None, log_kwargs: dict | None = None) -> None:
        """Nothing: tether's legacy API has no trackers (``log_with`` has no effect)."""

    def init_trackers(self, project_name: str, config: dict | None = None, init_kwargs: dict | None = None) -> None:
        """Nothing: no trackers."""

    def end_training(self) -> None:
        """Nothing: no trackers to close."""

    def free_memory(self, *objects):
        """Collect garbage and empty the CUDA cache; returns ``objects`` (as accelerate's does, without freeing)."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return objects

    clear = free_memory

    def __getattr__(self, name: str):
        raise AttributeError(
            f"PPOTrainer.accelerator has no '{name}': tether runs one process on one device and offers only the "
            "single-process parts of accelerate's Accelerator (docs/migration.md)"
        )
