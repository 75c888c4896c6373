"""The command line end to end, in subprocesses, as a user runs it."""

import json
import subprocess
import sys

import pytest

from tether.cli import run

TINY_DEMO = [
    "sft.steps=30",
    "demo.sft_examples=300",
    "demo.preference_pairs=48",
    "reward.epochs=1",
    "ppo.steps=2",
    "ppo.rollout_batch_size=16",
    "ppo.mini_batch_size=8",
    "demo.eval_prompts=8",
    "demo.eval_samples=1",
    "sampling.max_new_tokens=12",
]


def tether(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_help_lists_every_field_with_one_line(capsys):
    assert run(["ppo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "ppo.clip_range=0.2" in out.replace(" ", "")
    assert "PPO ratio clip epsilon." in out and "model.value_model" in out
    assert "sft.steps" not in out  # only the sections the command reads


@pytest.mark.parametrize(
    "args, message",
    [
        (["ppo", "ppo.clip_rnage=0.1"], "tether: command line: unknown config key 'ppo.clip_rnage'"),
        (["ppo", "--config", "missing.yaml"], "tether: missing.yaml: config file not found"),
        (["sft", "sft.data=nothing.jsonl"], "tether: nothing.jsonl: data file not found"),
        (
            ["ppo", "model.policy=/no/such/model", "ppo.prompts=p.jsonl"],
            "tether: policy '/no/such/model': no such folder",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1="}\n')
    result = tether(*args, f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stderr


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "sft.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "oops"\n')
    result = tether("sft", f"sft.data={tmp_path / 'sft.jsonl'}", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "sft.jsonl:2: not valid JSON (Expecting ',' delimiter)"
    )


@pytest.mark.slow
def test_demo_then_ppo_then_sample(tmp_path):
    run_dir = tmp_path / "demo"
    result = tether("demo", *TINY_DEMO, f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in [
        "sft.gold",
        "ppo.gold",
        "sft.rm_score",
        "ppo.rm_score",
        "ppo.kl",
        "rm.accuracy",
        "sft.length",
        "ppo.length",
        "wall_seconds",
    ]:
        assert isinstance(summary[key], float), key
    assert summary["sft.kl"] == pytest.approx(0.0, abs=1e-6)  # the SFT policy is the reference
    assert "held-out prompts" in result.stdout and "SFT" in result.stdout
    for path in [
        "config.yaml",
        "ppo_curves.png",
        "sft/metrics.jsonl",
        "reward/metrics.jsonl",
        "ppo/metrics.jsonl",
        "ppo/model/model.safetensors",
        "reward/model/model.safetensors",
        "data/preferences.jsonl",
    ]:
        assert (run_dir / path).is_file(), path

    ppo_dir = tmp_path / "ppo"
    result = tether(
        "ppo",
        f"model.policy={run_dir / 'sft/model'}",
        f"model.reward_model={run_dir / 'reward/model'}",
        f"ppo.prompts={run_dir / 'data/prompts.jsonl'}",
        "ppo.steps=2",
        "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.cliprange=0.1",
        f"output_dir={ppo_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert (ppo_dir / "model/model.safetensors").is_file() and (ppo_dir / "curves.png").is_file()
    assert (ppo_dir / "checkpoints/step_000002/trainer_state.json").is_file()
    assert "clip_range: 0.1" in (ppo_dir / "config.yaml").read_text()

    result = tether("sample", ppo_dir / "model", "3+4=", "-n", "2")
    assert result.returncode == 0 and result.stdout.count("3+4=") == 2


def test_ppo_with_a_python_reward_function(tmp_path, policy_dir):
    (tmp_path / "my_reward.py").write_text(
        "def shortness(prompts, responses):\n    return [-float(len(r)) for r in responses]\n"
    )
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(8)))
    result = tether(
        "ppo",
        f"model.policy={policy_dir}",
        "model.reward_model=my_reward:shortness",
        "ppo.prompts=prompts.jsonl",
        "ppo.steps=1",
        "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=8",
        "sampling.max_new_tokens=6",
        f"output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    # minus the decoded length: one character per token but EOS, and special tokens (pad, unk) decode to nothing
    assert -(record["response/length"] - record["response/ended"]) - 1e-4 <= record["reward/score"] < 0


@pytest.mark.slow
def test_demo_with_a_bias_and_a_remedy(tmp_path):
    """A length-biased labeller with balanced pairs: every preference pair is within 3 characters, the summary names
    the setting and lists the alarms (a list, maybe empty on this tiny run), and the KL guard is off."""
    result = tether("demo", *TINY_DEMO, "demo.bias=length", "demo.remedy=balanced_pairs", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "labelled with a length bias (3), balanced pairs only" in result.stdout
    pairs = [json.loads(line) for line in (tmp_path / "data" / "preferences.jsonl").read_text().splitlines()]
    assert len(pairs) == 48 and all(abs(len(p["chosen"].strip()) - len(p["rejected"].strip())) < 3 for p in pairs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["bias"], summary["remedy"], summary["bias_strength"]) == ("length", "balanced_pairs", 3.0)
    assert isinstance(summary["alarms"], list) and summary["iterate"] == []
    gold = [
        json.loads(line).get("gold/score") for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(isinstance(g, float) for g in gold)  # the demo's judge, through model.gold_reward
