"""Metric logging: always JSONL in the run folder, a short line on stdout, TensorBoard when asked and installed.

Nothing is sent anywhere by default. Every key written here has a line in docs/metrics.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tether.errors import TetherError


class MetricLogger:
    """Appends ``{"step": n, **metrics}`` lines to ``<run>/metrics.jsonl``; optionally mirrors to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, print_every: int = 0, echo=print):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self.print_every = print_every
        self.echo = echo
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TetherError("logging.tensorboard=true needs the tensorboard package (pip install tensorboard)")
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self.print_every and step % self.print_every == 0:
            shown = [k for k in clean if isinstance(clean[k], float)][:8]
            self.echo(f"step {step}: " + "  ".join(f"{k}={clean[k]:.4g}" for k in shown))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
