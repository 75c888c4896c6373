"""Data parallelism under torchrun: two processes train exactly what one process trains on the same global batch.

The slow tests launch ``torchrun --standalone --nproc_per_node 2 -m tether ...`` (gloo, one thread per process) and
compare with a one-process run in this process: every per-step metric but timings (relative gap < 1e-3) and the final
weights (max abs gap < 1e-4); a checkpoint of either resumes in the other.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether import distributed
from tether.checkpoint import TRAINABLE_FILE, trained_weights
from tether.cli import run
from tether.config import build_config
from tether.data import write_jsonl
from tether.errors import TetherError
from tether.trainers.ppo import check_data_parallel

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
RTOL, ATOL, WEIGHTS_ATOL = 1e-3, 1e-6, 1e-4


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
ACCELERATE += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # its questions answered


def torchrun(*args: str, launcher: list[str] = TORCHRUN) -> None:
    """``tether ARGS`` on two processes (gloo on the CPU); fails the test with the tail of stderr."""
    cmd = [*launcher, "-m", "tether"]
    result = subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def gaps(run_dir: Path, reference: Path, weights: str) -> tuple[float, float]:
    """(largest relative gap of any metric at any step, largest abs gap of any weight in ``weights``); the steps and
    keys must be the same (one row per step: only rank 0 writes)."""
    rows, ref_rows = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    metric_gap = 0.0
    for row, ref in zip(rows, ref_rows):
        assert row.keys() == ref.keys()
        for k, v in row.items():
            if isinstance(v, float) or isinstance(ref[k], float):
                metric_gap = max(metric_gap, abs(v - ref[k]) / (max(abs(v), abs(ref[k])) + ATOL / RTOL))
            else:
                assert v == ref[k], k
    w, ref_w = (read_weights(d / weights) for d in (run_dir, reference))
    assert w.keys() == ref_w.keys()
    return metric_gap, max((w[k] - ref_w[k]).abs().max().item() for k in w)


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a checkpoint's trained tensors whole (the policy's may be in its policy/)."""
    return trained_weights(file.parent) if file.name == TRAINABLE_FILE else load_file(file)


def assert_same_training(run_dir: Path, reference: Path, weights: str = "model/model.safetensors") -> None:
    metric_gap, weight_gap = gaps(run_dir, reference, weights)
    print(f"{run_dir.name} vs {reference.name}: metric gap {metric_gap:.2e}, weight gap {weight_gap:.2e}")
    assert metric_gap < RTOL
    assert weight_gap < WEIGHTS_ATOL


# ---- one process: the helpers are no-ops, bad input is a one-line error --------------------------------------------


def test_one_process_helpers_are_no_ops():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    t = torch.arange(6).reshape(2, 3)
    assert distributed.gather_rows(t) is t
    assert distributed.shard(8) == slice(0, 8)
    assert distributed.sum_floats({"a": 1.5}) == {"a": 1.5}
    assert distributed.agree_stop([15]) == [15] and distributed.agree_stop([]) == []
    module = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(module) is module


def test_shard_gives_each_rank_a_block(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    blocks = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        blocks.append(list(range(5))[distributed.shard(5)])
    assert blocks == [[0, 1], [2, 3, 4]]
    # a batch of 1 row: rank 0 has none, so it runs row 0 with share 0; rank 1 has it all
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.block(1))
    assert shares == [(slice(0, 1), 0.0), (slice(0, 1), 1.0)]
    assert distributed.block(5) == (slice(2, 5), 0.6)


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_process_leaves_without_python_teardown(world):
    """Under torchrun, ``leave`` flushes what was printed and exits with the code before Python's teardown (where
    gloo's threads could abort a finished run); on one process it returns and the teardown runs as usual."""
    script = (
        "import atexit, sys\n"
        "from tether import distributed\n"
        "atexit.register(lambda: print('teardown'))\n"
        "print('printed', end='')\n"
        "distributed.leave(3)\n"
        "sys.exit(4)\n"
    )
    env = dict(ENV, WORLD_SIZE=world)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    if world == "2":
        assert (result.returncode, result.stdout) == (3, "printed")
    else:
        assert (result.returncode, result.stdout) == (4, "printedteardown\n")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ppo.rollout_batch_size=9", "ppo.mini_batch_size=3"], "ppo.rollout_batch_size=9 must be divisible"),
        (["ppo.rollout_batch_size=6", "ppo.mini_batch_size=3"], "ppo.mini_batch_size=3 must be divisible"),
        (["ppo.env=tether.envs.games:HighLow"], "ppo.env: multi-turn episodes run on one process"),
        (["model.compile=true"], "model.compile: for one process; under torchrun leave it off"),
    ],
)
def test_batches_must_split_over_the_processes(monkeypatch, overrides, message):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(TetherError, match=message) as e:
        check_data_parallel(build_config(None, overrides))
    assert "\n" not in str(e.value)


def test_one_process_commands_refuse_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TetherError, match="tether dpo runs on one process"):
        run(["dpo", "dpo.data=pairs.jsonl"])


# ---- two processes against one ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory, tiny_ppo_args):
    """(root, args(run_dir, steps), the one-process 4-iteration run). Global statistics are exercised: running score
    normalisation, reward whitening, adaptive KL; micro-batches of 1 row are the same rows on 1 and 2 processes (the
    micro-batch extremes ppo/ratio_max and ratio_min depend on them) and make DDP accumulate without syncing."""
    root = tmp_path_factory.mktemp("dp")
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": f"{a}+{b}="} for a in range(5) for b in range(3)])

    def args(run_dir: Path, steps: int) -> list[str]:
        return [
            "ppo",
            *tiny_ppo_args,
            f"ppo.prompts={prompts}",
            f"ppo.steps={steps}",
            "ppo.micro_batch_size=1",
            "ppo.lr_schedule=constant",  # a run of 2 iterations resumed to 4 takes the same steps as one of 4
            "ppo.score_norm=norm",
            "ppo.whiten_rewards=true",
            "ppo.kl_control=adaptive",
            "ppo.kl_target=0.1",
            "ppo.kl_horizon=100",
            "model.device=cpu",
            f"output_dir={run_dir}",
        ]

    one = root / "one"
    assert run(args(one, 4)) == 0
    return root, args, one


@pytest.mark.slow
def test_ppo_on_two_processes_matches_one(ppo_runs):
    root, args, one = ppo_runs
    two = root / "two"
    torchrun(*args(two, 4))
    assert_same_training(two, one)
    assert_same_training(two, one, "checkpoints/step_000004/trainable.safetensors")  # policy and value head
    summary = json.loads((two / "summary.json").read_text())
    assert summary["iterations"] == 4 and not summary["stopped_early"]


@pytest.mark.slow
def test_ppo_under_accelerate_launch_matches_one(ppo_runs):
    """``accelerate launch --multi_gpu`` starts the processes as torchrun does (on the CPU too): the same run."""
    pytest.importorskip("accelerate")
    root, args, one = ppo_runs
    torchrun(*args(root / "accelerate", 4), launcher=ACCELERATE)
    assert_same_training(root / "accelerate", one)


@pytest.mark.slow
def test_ppo_checkpoint_of_two_processes_resumes_on_one(ppo_runs):
    root, args, one = ppo_runs
    run_dir = root / "two_then_one"
    torchrun(*args(run_dir, 2))
    assert run(["ppo", "--resume", str(run_dir), "ppo.steps=4"]) == 0
    assert_same_training(run_dir, one)


@pytest.mark.slow
def test_ppo_checkpoint_of_one_process_resumes_on_two(ppo_runs):
    root, args, one = ppo_runs
    run_dir = root / "one_then_two"
    assert run(args(run_dir, 2)) == 0
    torchrun("ppo", "--resume", str(run_dir), "ppo.steps=4")
    assert_same_training(run_dir, one)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_data")
    write_jsonl(
        root / "sft.jsonl", [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(6) for b in range(6)]
    )
    pairs = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": f"{a * b + 1}!"} for a in range(6) for b in range(6)
    ]
    write_jsonl(root / "pairs.jsonl", pairs)
    return root


def step_args(command: str, pair_data: Path, policy_dir: str) -> list[str]:
    """A short `tether sft` or `tether reward` run on the pair data, with a checkpoint every 4 steps."""
    return {
        "sft": ["sft", f"sft.data={pair_data / 'sft.jsonl'}", f"model.policy={policy_dir}", "sft.steps=11"]
        + ["sft.batch_size=8", "sft.warmup_steps=2", "sft.save_every=4"],
        "reward": ["reward", f"reward.data={pair_data / 'pairs.jsonl'}", f"reward.init={policy_dir}"]
        + ["reward.epochs=3", "reward.batch_size=8", "reward.center_coef=0.01", "reward.save_every=4"],
    }[command] + ["logging.print_every=0", "model.device=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "reward"])
def test_sft_and_reward_on_two_processes_match_one(pair_data, policy_dir, command):
    args = step_args(command, pair_data, policy_dir)
    assert run([*args, f"output_dir={pair_data / command}_one"]) == 0
    torchrun(*args, f"output_dir={pair_data / command}_two")
    assert_same_training(pair_data / f"{command}_two", pair_data / f"{command}_one")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_batches_smaller_than_the_world_train_as_on_one_process(tmp_path, policy_dir, strategy):
    """Each epoch's last reward batch holds 1 pair and the SFT batch 1 example, so on 2 processes one gets none: it
    scores one row weighted 0 (no NaN, no hang in a collective), and the runs are the one-process runs."""
    pairs = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": f"{a * b}?"} for a in range(5) for b in range(7)
    ]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)  # 35 pairs: 31 train (5 batches of 6, then 1), 4 held out
    write_jsonl(tmp_path / "one.jsonl", [{"prompt": "2+3=", "response": "5"}])
    common = ["logging.print_every=0", "model.device=cpu", f"distributed.strategy={strategy}"]
    runs = {
        "reward": ["reward", f"reward.data={tmp_path / 'pairs.jsonl'}", f"reward.init={policy_dir}"]
        + ["reward.epochs=2", "reward.batch_size=6"],
        "sft": ["sft", f"sft.data={tmp_path / 'one.jsonl'}", f"model.policy={policy_dir}", "sft.steps=3"]
        + ["sft.batch_size=2", "sft.warmup_steps=0"],
    }
    for command, args in runs.items():
        assert run([*args, *common, f"output_dir={tmp_path / command}_one"]) == 0
        torchrun(*args, *common, f"output_dir={tmp_path / command}_two")
        assert_same_training(tmp_path / f"{command}_two", tmp_path / f"{command}_one")


# ---- FSDP: the trained model split over the processes, the same training ----------------------------------------


@pytest.mark.slow
def test_ppo_fsdp_on_two_processes_matches_one_and_resumes_across(ppo_runs):
    """fully_shard on gloo: the split policy and value head train what one process trains (also recomputing the
    blocks' activations in backward), its checkpoints (gathered for rank 0) resume on one process, and a one-process
    checkpoint resumes split."""
    root, args, one = ppo_runs
    fsdp = root / "fsdp"
    torchrun(*args(fsdp, 4), "distributed.strategy=fsdp", "model.gradient_checkpointing=true")
    assert_same_training(fsdp, one)
    assert_same_training(fsdp, one, "checkpoints/step_000004/trainable.safetensors")
    run_dir = root / "fsdp_then_one"
    torchrun(*args(run_dir, 2), "distributed.strategy=fsdp")
    assert run(["ppo", "--resume", str(run_dir), "ppo.steps=4"]) == 0
    assert_same_training(run_dir, one)
    run_dir = root / "one_then_fsdp"
    assert run(args(run_dir, 2)) == 0
    torchrun("ppo", "--resume", str(run_dir), "ppo.steps=4", "distributed.strategy=fsdp")
    assert_same_training(run_dir, one)


@pytest.mark.slow
def test_ppo_fsdp_with_a_separate_critic_matches_one_process(ppo_runs):
    """The critic is split too (its own blocks), trained and checkpointed alongside the policy."""
    root, args, _ = ppo_runs
    critic = ["model.value_model=separate", "ppo.kl_control=fixed"]
    assert run([*args(root / "critic_one", 2), *critic]) == 0
    torchrun(*args(root / "critic_fsdp", 2), *critic, "distributed.strategy=fsdp")
    assert_same_training(root / "critic_fsdp", root / "critic_one", "checkpoints/step_000002/trainable.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "reward"])
def test_sft_and_reward_fsdp_on_two_processes_match_one_and_resume_on_one(pair_data, policy_dir, command):
    """Split over two processes, SFT and the reward model train what one process trains; the last checkpoint of the
    split run (gathered for rank 0) resumed on one process gives the same run again."""
    args = step_args(command, pair_data, policy_dir)
    one, fsdp = pair_data / f"{command}_one_ref", pair_data / f"{command}_fsdp"
    assert run([*args, f"output_dir={one}"]) == 0
    torchrun(*args, f"output_dir={fsdp}", "distributed.strategy=fsdp")
    assert_same_training(fsdp, one)
    assert run([command, "--resume", str(fsdp)]) == 0  # from the split run's last checkpoint, on one process
    assert_same_training(fsdp, one)


@pytest.mark.slow
def test_ppo_fsdp_with_lora_matches_one_process(ppo_runs):
    """A LoRA policy split: the frozen base and the adapter are split alike, the reference (the base with the adapter
    off) reads the gathered weights during the rollout, and the saved model is the adapter merged into the gathered
    base (tether.lora.merged_lora_state) as one process merges it into a copy."""
    root, args, _ = ppo_runs
    lora = ["model.lora_r=4", "ppo.lr=1e-2"]
    assert run([*args(root / "lora_one", 2), *lora]) == 0
    torchrun(*args(root / "lora_fsdp", 2), *lora, "distributed.strategy=fsdp")
    assert_same_training(root / "lora_fsdp", root / "lora_one")  # the merged model
    assert_same_training(root / "lora_fsdp", root / "lora_one", "checkpoints/step_000002/trainable.safetensors")
    assert_same_training(root / "lora_fsdp", root / "lora_one", "checkpoints/step_000002/policy/model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, sampler",
    [
        ("ddp", "tests/test_samplers.py:Fives"),  # every row token 5 and a stop: length 2 on every row
        ("fsdp", "examples/engine_sampler.py:GenerateSampler"),  # generate on the policy FSDP gathered
    ],
)
def test_another_sampler_draws_each_process_rows(ppo_runs, strategy, sampler):
    """Under torchrun each process builds the sampler ``sampling.sampler`` names and draws its own rows with it, and
    the run trains as usual."""
    root, args, _ = ppo_runs
    run_dir = root / f"sampler-{strategy}"
    spec = Path(__file__).resolve().parent.parent / sampler
    torchrun(*args(run_dir, 2), f"distributed.strategy={strategy}", f"sampling.sampler={spec}")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/total"]) for r in rows)
    lengths = [r["response/length"] for r in rows]
    assert lengths == [2.0, 2.0] if "Fives" in sampler else all(1 <= n <= 8 for n in lengths)
