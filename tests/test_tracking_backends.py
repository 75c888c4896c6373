"""Optional metric backends (wandb, trackio): called only when asked for; fake modules, no network."""

import math
import sys
import types

import pytest

from tether.config import RunConfig, build_config
from tether.errors import TetherError
from tether.tracking import MetricLogger, read_metrics


class Recorder:
    """Stands in for the wandb / trackio modules and records every call."""

    def __init__(self, name: str):
        self.calls = []
        self.module = types.ModuleType(name)
        self.module.init = self._record("init", returns=self)
        self.module.log = self._record("log")
        self.module.finish = self._record("finish")
        # wandb's init returns a run whose log/finish are used
        self.log = self._record("run.log")
        self.finish = self._record("run.finish")

    def _record(self, name, returns=None):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return returns

        return call

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def fakes(monkeypatch):
    recorders = {name: Recorder(name) for name in ("wandb", "trackio")}
    for name, rec in recorders.items():
        monkeypatch.setitem(sys.modules, name, rec.module)
    return recorders


def test_defaults_send_nothing(fakes, tmp_path):
    config = RunConfig()
    assert (config.logging.wandb, config.logging.trackio, config.logging.project) == (False, False, "tether")
    logger = MetricLogger.from_config(tmp_path, config, echo=lambda s: None)
    logger.log({"a": 1.0}, 1)
    logger.close()
    logger = MetricLogger(tmp_path, echo=lambda s: None)
    logger.log({"a": 2.0}, 2)
    logger.close()
    assert fakes["wandb"].calls == [] and fakes["trackio"].calls == []
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0]


def test_wandb_when_asked(fakes, tmp_path):
    config = build_config(overrides=["logging.wandb=true", "logging.project=rlhf", "ppo.lr=0.5"])
    run_dir = tmp_path / "ppo-run"
    logger = MetricLogger.from_config(run_dir, config, echo=lambda s: None)
    logger.log({"loss": 0.5, "n": 3, "bad": math.nan, "flag": True, "name": "x"}, 7)
    logger.close()
    rec = fakes["wandb"]
    assert rec.names() == ["init", "run.log", "run.finish"]
    _, _, init_kwargs = rec.calls[0]
    assert init_kwargs["project"] == "rlhf" and init_kwargs["name"] == "ppo-run"
    assert init_kwargs["dir"] == str(run_dir) and init_kwargs["config"]["ppo"]["lr"] == 0.5
    assert rec.calls[1][1:] == (({"loss": 0.5, "n": 3},), {"step": 7})
    assert fakes["trackio"].calls == []
    assert read_metrics(run_dir / "metrics.jsonl")[0]["bad"] is None  # JSONL still gets everything


def test_trackio_when_asked(fakes, tmp_path):
    config = build_config(overrides=["logging.trackio=true"])
    logger = MetricLogger.from_config(tmp_path / "r", config, echo=lambda s: None)
    logger.log({"kl/ref": 0.25}, 1)
    logger.log({"kl/ref": 0.5}, 2)
    logger.close()
    rec = fakes["trackio"]
    assert rec.names() == ["init", "log", "log", "finish"]
    assert rec.calls[0][2]["project"] == "tether" and rec.calls[0][2]["name"] == "r"
    assert rec.calls[2][1:] == (({"kl/ref": 0.5},), {"step": 2})
    assert fakes["wandb"].calls == []


@pytest.mark.parametrize("backend", ["wandb", "trackio"])
def test_missing_backend_is_a_clear_error(backend, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, backend, None)  # import fails as if not installed
    with pytest.raises(TetherError, match=rf"^logging.{backend}=true needs the {backend} package \(pip install"):
        MetricLogger(tmp_path, **{backend: True})
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before opening anything
