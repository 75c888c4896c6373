"""Metric logging: always JSONL in the run folder, a short line on stdout (or, on a terminal, the live bar's postfix);
TensorBoard, Weights & Biases or trackio when asked for (``logging.tensorboard`` / ``logging.wandb`` /
``logging.trackio``) and installed.

Nothing is sent anywhere by default: the optional backends are imported only when asked for, and asking for one that
is not installed is a :class:`TetherError`. Every key written here has a line in docs/metrics.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path

from tether.distributed import is_main
from tether.errors import TetherError


class MetricLogger:
    """Appends ``{"step": n, **metrics}`` lines to ``<run>/metrics.jsonl``; optionally mirrors to TensorBoard,
    Weights & Biases and trackio (numeric, finite values only).

    Args:
        run_dir: the run folder.
        tensorboard: also write TensorBoard event files to ``<run>/tensorboard``.
        print_every: print a metrics line every this many steps (0 = never).
        echo: the print function.
        wandb: also log to a Weights & Biases run (``wandb.init(project=..., name=<run folder name>, dir=run_dir)``).
        trackio: also log to a trackio run (``trackio.init(project=..., name=<run folder name>)``).
        project: the wandb / trackio project name.
        config: the run config as a plain dict, recorded with the wandb / trackio run.
        display: the phase's live display (:class:`tether.trainers.common.Progress`): each row goes to its ``show``,
            and no metrics line is printed while it is ``quiet`` (its bar carries the key metrics instead).
    """

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = False,
        print_every: int = 0,
        echo=print,
        *,
        wandb: bool = False,
        trackio: bool = False,
        project: str = "tether",
        config: dict | None = None,
        display=None,
    ):
        # Optional backends are imported before anything is opened, so a missing one fails cleanly.
        backends = [(name, _require(name)) for name, asked in (("wandb", wandb), ("trackio", trackio)) if asked]
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self.print_every = print_every
        self.echo = echo
        self.display = display
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TetherError(
                    "logging.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                ) from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self._runs = [_start_run(name, module, project, Path(run_dir), config) for name, module in backends]

    @classmethod
    def from_config(cls, run_dir: str | Path, config, echo=print, display=None) -> MetricLogger | NullLogger:
        """A logger set up from a run config's ``logging`` section (the whole config is recorded with the run); a
        :class:`NullLogger` on every process but rank 0 of a data-parallel run.

        Args:
            run_dir: the run folder; ``metrics.jsonl`` (and ``tensorboard/``) are written inside it.
            config: a :class:`tether.config.RunConfig`.
            echo: where the periodic metrics line is printed.
            display: the phase's live display, if any (see the class).
        """
        if not is_main():
            return NullLogger(run_dir)
        lc = config.logging
        return cls(
            run_dir,
            lc.tensorboard,
            lc.print_every,
            echo,
            wandb=lc.wandb,
            trackio=lc.trackio,
            project=lc.project,
            config=dataclasses.asdict(config),
            display=display,
        )

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._runs:
            numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for run in self._runs:
                run.log(numbers, step)
        if self.display is not None:
            self.display.show(clean)
        if self.print_every and step % self.print_every == 0 and not getattr(self.display, "quiet", False):
            self.echo(metrics_line(clean, step))

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        for run in self._runs:
            run.close()
        self._runs = []


class NullLogger:
    """The logger of the processes that do not write (ranks > 0): every row is dropped."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"  # rank 0's file, read only after the run

    def log(self, metrics: dict, step: int) -> None:
        pass

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc) -> None:
        pass


def metrics_line(metrics: dict, step: int) -> str:
    """``step 10: sft/loss=2.31  sft/token_accuracy=0.42 ...``: the row's first 8 float metrics, one plain line."""
    shown = [k for k in metrics if isinstance(metrics[k], float)][:8]
    return f"step {step}: " + "  ".join(f"{k}={metrics[k]:.4g}" for k in shown)


_INSTALL = {"wandb": "pip install wandb", "trackio": "pip install trackio"}


def _require(name: str):
    """Import an optional logging backend, or raise a TetherError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise TetherError(f"logging.{name}=true needs the {name} package ({_INSTALL[name]})") from None


class _WandbRun:
    def __init__(self, wandb, project: str, run_dir: Path, config: dict | None):
        self._run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, metrics: dict, step: int) -> None:
        self._run.log(metrics, step=step)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._run.finish()


class _TrackioRun:
    def __init__(self, trackio, project: str, run_dir: Path, config: dict | None):
        self._trackio = trackio
        trackio.init(project=project, name=run_dir.name, config=config)

    def log(self, metrics: dict, step: int) -> None:
        self._trackio.log(metrics, step=step)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._trackio.finish()


def _start_run(name: str, module, project: str, run_dir: Path, config: dict | None):
    return {"wandb": _WandbRun, "trackio": _TrackioRun}[name](module, project, run_dir, config)


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


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``last_step`` (what a resumed run continues from), dropping later
    rows and a torn last line from a killed process; rewritten atomically. Returns the number of rows kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", last_step + 1) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
    return len(kept)
