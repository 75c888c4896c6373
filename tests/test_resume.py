"""Exact resume: a `tether ppo` run killed at any moment and resumed ends exactly where the uninterrupted run ends.

Every case runs the real CLI in subprocesses on tiny models and compares, against one uninterrupted run, every
metric except timings (equal to the last digit) and the final weights (bitwise).
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.checkpoint import list_checkpoints
from tether.data import write_jsonl

pytestmark = pytest.mark.slow
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def ppo_args(tiny_ppo_args, prompts, run_dir):
    return [
        "ppo",
        *tiny_ppo_args,
        f"ppo.prompts={prompts}",
        "ppo.steps=6",
        "ppo.save_every=1",
        "ppo.keep_checkpoints=2",
        "model.device=cpu",
        f"output_dir={run_dir}",
    ]


def start(*args, code=None):
    """A `tether` process (or, with ``code``, a python script run before the CLI in the same process)."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "tether.cli", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_when(proc, run_dir: Path, min_rows: int, delay: float, sig=signal.SIGKILL) -> int:
    while rows(run_dir) < min_rows and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc.returncode


def finish(run_dir: Path) -> None:
    proc = start("ppo", "--resume", str(run_dir))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def results(run_dir: Path):
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in metrics]
    return metrics, load_file(run_dir / "model" / "model.safetensors")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    metrics, weights = results(run_dir)
    ref_metrics, ref_weights = results(reference)
    assert [r["step"] for r in metrics] == list(range(1, 7))
    assert metrics == ref_metrics  # every value, to the last digit
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"] == json.loads((reference / "summary.json").read_text())["final"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ppo_args):
    root = tmp_path_factory.mktemp("resume")
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": f"{a}+{b}="} for a in range(5) for b in range(3)])
    reference = root / "uninterrupted"
    proc = start(*ppo_args(tiny_ppo_args, prompts, reference))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return root, lambda run_dir: ppo_args(tiny_ppo_args, prompts, run_dir), reference


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_twice_at_random_moments_then_resume_is_exact(setup, seed):
    root, args, reference = setup
    rng = random.Random(seed)
    run_dir = root / f"killed{seed}"
    kill_when(start(*args(run_dir)), run_dir, rng.randint(1, 3), rng.random() * 0.4)
    first = rows(run_dir)
    kill_when(start("ppo", "--resume", str(run_dir)), run_dir, first + 1, rng.random() * 0.4)
    assert list_checkpoints(run_dir / "checkpoints")  # killed twice, still something to resume from
    finish(run_dir)
    assert_same_run(run_dir, reference)
    assert len(list_checkpoints(run_dir / "checkpoints")) <= 3  # keep_checkpoints=2, plus the newest stable one


def signal_in_checkpoint(step: int, sig: int) -> str:
    """A script that runs the CLI and sends itself ``sig`` once, while checkpoint ``step`` is half written: its
    weights and optimizer files are on disk, its state file is not."""
    return textwrap.dedent(
        f"""
        import os, sys
        import tether.checkpoint as ckpt
        real, sent = ckpt.save_file, []
        def save_file(tensors, path, **kwargs):
            real(tensors, path, **kwargs)
            if "step_{step:06d}.tmp" in str(path) and str(path).endswith("optimizer.safetensors") and not sent:
                sent.append(1)
                os.kill(os.getpid(), {int(sig)})
        ckpt.save_file = save_file
        from tether.cli import main
        main(sys.argv[1:])
        """
    )


def test_sigkill_during_a_checkpoint_write_resumes_from_the_one_before(setup):
    root, args, reference = setup
    run_dir = root / "killed_in_write"
    proc = start(*args(run_dir), code=signal_in_checkpoint(3, signal.SIGKILL))
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names[-1] == "step_000002" and (run_dir / "checkpoints" / "step_000003.tmp").is_dir()
    assert rows(run_dir) == 3  # iteration 3 was logged; its checkpoint never completed
    finish(run_dir)
    assert_same_run(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_sigterm_checkpoints_and_says_how_to_resume(setup):
    root, args, reference = setup
    run_dir = root / "terminated"
    proc = start(*args(run_dir))
    kill_when(proc, run_dir, 2, 0.0, sig=signal.SIGTERM)
    err = proc.stderr.read().strip().splitlines()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err[-1].startswith("tether: SIGTERM at iteration") and f"tether ppo --resume {run_dir}" in err[-1]
    stopped_at = int(err[-1].split("iteration ")[1].split(":")[0])
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{stopped_at:06d}"
    assert rows(run_dir) == stopped_at
    finish(run_dir)
    assert_same_run(run_dir, reference)
    events = json.loads((run_dir / "summary.json").read_text())["events"]
    assert events == [{"iteration": stopped_at, "kind": "interrupted", "signal": int(signal.SIGTERM)}]


def test_sigterm_during_a_scheduled_checkpoint_is_recorded(setup):
    root, args, reference = setup
    run_dir = root / "terminated_in_write"
    proc = start(*args(run_dir), code=signal_in_checkpoint(2, signal.SIGTERM))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "at iteration 2:" in err.strip().splitlines()[-1]
    finish(run_dir)
    assert_same_run(run_dir, reference)
    events = json.loads((run_dir / "summary.json").read_text())["events"]
    assert events == [{"iteration": 2, "kind": "interrupted", "signal": int(signal.SIGTERM)}]


def test_resume_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("seed: 0\n")
    for folder, message in [
        (tmp_path / "nothing", "not a run folder (no config.yaml)"),
        (tmp_path / "empty_run", "no complete checkpoint under"),
    ]:
        proc = start("ppo", "--resume", str(folder))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and message in err


# ---- tether sft and tether reward ----------------------------------------------------------------------------------
def signal_at_step(step: int, sig: int) -> str:
    """A script that runs the CLI and sends itself ``sig`` right after optimizer step ``step`` of sft or reward."""
    return textwrap.dedent(
        f"""
        import os, sys
        from tether.trainers.common import StepCheckpoints
        real = StepCheckpoints.after_step
        def after_step(self, step, *args):
            if step == {step}:
                os.kill(os.getpid(), {int(sig)})
            real(self, step, *args)
        StepCheckpoints.after_step = after_step
        from tether.cli import main
        main(sys.argv[1:])
        """
    )


def run_to_end(*args, code=None) -> tuple[int, str]:
    """(exit status, stderr) of a `tether` process run to its end."""
    proc = start(*args, code=code)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def step_trainers(tmp_path_factory, policy_dir):
    """Data and argument lists for short `tether sft` and `tether reward` runs, and their uninterrupted results."""
    root = tmp_path_factory.mktemp("resume_steps")
    write_jsonl(
        root / "sft.jsonl", [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(6) for b in range(6)]
    )
    pairs = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(6) for b in range(6)
    ]
    write_jsonl(root / "pairs.jsonl", pairs)
    common = ["model.device=cpu", "logging.print_every=0"]
    args = {
        "sft": lambda d: [
            "sft",
            f"model.policy={policy_dir}",
            f"sft.data={root / 'sft.jsonl'}",
            "sft.steps=25",
            "sft.batch_size=4",
            "sft.warmup_steps=3",
            "sft.save_every=4",
            *common,
            f"output_dir={d}",
        ],
        "reward": lambda d: [
            "reward",
            f"model.policy={policy_dir}",
            f"reward.data={root / 'pairs.jsonl'}",
            "reward.batch_size=8",
            "reward.epochs=3",
            "reward.save_every=3",
            *common,
            f"output_dir={d}",
        ],
    }
    for command, make in args.items():
        code, err = run_to_end(*make(root / f"{command}_uninterrupted"))
        assert code == 0, err
    return root, args


@pytest.mark.parametrize("command,kill_step,save_every", [("sft", 11, 4), ("reward", 7, 3)])
def test_sft_and_reward_killed_between_checkpoints_resume_exactly(step_trainers, command, kill_step, save_every):
    root, args = step_trainers
    run_dir = root / f"{command}_killed"
    code, _ = run_to_end(*args[command](run_dir), code=signal_at_step(kill_step, signal.SIGKILL))
    assert code == -signal.SIGKILL
    newest = list_checkpoints(run_dir / "checkpoints")[-1].name
    assert newest == f"step_{kill_step // save_every * save_every:06d}"
    code, err = run_to_end(command, "--resume", str(run_dir))
    assert code == 0, err
    metrics, weights = results(run_dir)
    ref_metrics, ref_weights = results(root / f"{command}_uninterrupted")
    assert metrics == ref_metrics  # every value, to the last digit; rows logged after the checkpoint not repeated
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def test_sft_sigterm_checkpoints_and_says_how_to_resume(step_trainers):
    root, args = step_trainers
    run_dir = root / "sft_terminated"
    code, err = run_to_end(*args["sft"](run_dir), code=signal_at_step(6, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == (
        f"tether: SIGTERM at sft step 6: checkpoint written; resume with: tether sft --resume {run_dir}"
    )
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_000006"]  # only the newest kept
    code, err = run_to_end("reward", "--resume", str(run_dir))
    assert code == 2 and "checkpoints are from `tether sft`, not `tether reward`" in err
