"""`tether dpo` on tiny models: it learns the preferences, the reference stays frozen, the CLI, exact resume."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.checkpoint import list_checkpoints
from tether.config import build_config
from tether.data import write_jsonl
from tether.models import load_causal_lm, load_tokenizer
from tether.precision import Placement
from tether.trainers.common import StepCheckpoints, seed_everything
from tether.trainers.dpo import dpo_step, pair_logprobs, policy_and_reference, train_dpo
from tether.tracking import read_metrics

PAIRS = [
    {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": "Hmm, hard to say."} for a in range(8) for b in range(8)
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo_data") / "pairs.jsonl"
    write_jsonl(path, PAIRS)
    return path


def dpo_config(policy_dir, pairs_file, run_dir, *overrides, device="cpu"):
    return build_config(
        overrides=[
            f"model.policy={policy_dir}",
            f"model.device={device}",
            f"dpo.data={pairs_file}",
            "dpo.epochs=3",
            "dpo.batch_size=8",
            "dpo.lr=3e-3",
            "dpo.warmup_steps=2",
            "dpo.eval_fraction=0.25",
            "logging.print_every=0",
            f"output_dir={run_dir}",
            *overrides,
        ]
    )


def quiet(*args):
    pass


def test_dpo_raises_the_chosen_over_rejected_margin(policy_dir, pairs_file, tmp_path, device):
    seed_everything(0)
    model_dir = train_dpo(dpo_config(policy_dir, pairs_file, tmp_path, device=device), tmp_path, echo=quiet)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in rows if "dpo/loss" in r]
    evals = [r for r in rows if "dpo/eval_margin" in r]
    # the first step's statistics come before its update, while the policy is still the reference
    assert train[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train[0]["dpo/margin"] == pytest.approx(0, abs=1e-5)
    assert train[-1]["dpo/loss"] < 0.5 * math.log(2) and train[-1]["dpo/margin"] > 1.0
    assert len(evals) == 3 and evals[-1]["dpo/eval_accuracy"] == 1.0  # 16 held-out pairs, never trained on
    assert evals[-1]["dpo/eval_margin"] > evals[0]["dpo/eval_margin"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_pairs"] == 48 and summary["eval_pairs"] == 16 and summary["steps"] == 18
    assert summary["eval"]["margin"] == evals[-1]["dpo/eval_margin"]
    documented = set(
        re.findall(r"`([a-z_]+/[a-z0-9_]+)`", (Path(__file__).parents[1] / "docs/metrics.md").read_text())
    )
    assert not [k for r in rows for k in r if k != "step" and k not in documented]
    # the saved policy prefers every pair's chosen response by more than the starting policy did
    cpu, tokenizer = Placement(torch.device("cpu")), load_tokenizer(policy_dir)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(load_causal_lm(str(model_dir)), tokenizer, PAIRS, 64, cpu)
        chosen0, rejected0 = pair_logprobs(load_causal_lm(policy_dir), tokenizer, PAIRS, 64, cpu)
    assert ((chosen - rejected) - (chosen0 - rejected0)).min() > 0


@pytest.mark.parametrize("lora_r", [0, 4])
def test_reference_stays_frozen(policy_dir, pairs_file, tmp_path, lora_r, device):
    if lora_r:
        pytest.importorskip("peft")
    config = dpo_config(policy_dir, pairs_file, tmp_path, f"model.lora_r={lora_r}", device=device)
    placement = Placement(torch.device(device))
    policy, reference, tokenizer = policy_and_reference(config, placement)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.dpo.lr)
    ids = torch.tensor([[5, 6, 7, 8, 9]], device=device)
    with torch.no_grad():
        ref_logits, policy_state = reference(ids).logits, [p.detach().clone() for p in trained]
    for step in range(3):
        dpo_step(
            policy, reference, optimizer, tokenizer, PAIRS[8 * step : 8 * step + 8], config.dpo, placement, step, 3
        )
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(not torch.equal(before, p) for before, p in zip(policy_state, trained))  # every trained tensor moved
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, ref_logits, rtol=0, atol=0)
        assert not torch.allclose(policy(ids).logits, ref_logits)


def tether(*args):
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_cli_end_to_end_and_bad_data(policy_dir, pairs_file, tmp_path):
    run_dir = tmp_path / "run"
    args = ["dpo.epochs=1", "dpo.batch_size=16", "dpo.lr=1e-3", "logging.print_every=0"]
    result = tether("dpo", f"dpo.data={pairs_file}", f"model.policy={policy_dir}", *args, f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"model: {run_dir / 'model'}"
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "model" / "tokenizer.json").is_file()
    assert (run_dir / "curves.png").is_file() and (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["eval_pairs"] == 6
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "dpo/loss" in r] == [0, 3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": "4"}\n')
    result = tether("dpo", f"dpo.data={bad}", f"model.policy={policy_dir}", f"output_dir={tmp_path / 'bad_run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"tether: {bad}:2: missing field 'rejected'"


class Killed(Exception):
    pass


def test_resume_gives_the_uninterrupted_result(policy_dir, pairs_file, tmp_path, monkeypatch):
    def run(run_dir, resume_from=None):
        seed_everything(0)
        config = dpo_config(policy_dir, pairs_file, run_dir, "dpo.epochs=2", "dpo.save_every=5")
        train_dpo(config, run_dir, echo=quiet, resume_from=resume_from)

    def results(run_dir):
        rows = [
            {k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run_dir / "metrics.jsonl")
        ]
        return rows, load_file(run_dir / "model" / "model.safetensors")

    run(tmp_path / "whole")
    real = StepCheckpoints.after_step

    def after_step(self, step, *args):
        real(self, step, *args)
        if step == 8:  # killed after step 8: the newest checkpoint is step 5, step 6-8's rows are in metrics.jsonl
            raise Killed

    monkeypatch.setattr(StepCheckpoints, "after_step", after_step)
    with pytest.raises(Killed):
        run(tmp_path / "killed")
    monkeypatch.setattr(StepCheckpoints, "after_step", real)
    (newest,) = list_checkpoints(tmp_path / "killed" / "checkpoints")
    assert newest.name == "step_000005"
    run(tmp_path / "killed", resume_from=newest)
    rows, weights = results(tmp_path / "killed")
    ref_rows, ref_weights = results(tmp_path / "whole")
    assert rows == ref_rows  # every value to the last digit; the rows logged after the checkpoint not repeated
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)
