"""Where roles live and in which precision (tether.precision): bf16 autocast on float32 master weights, bf16 frozen
roles, saved models in model.dtype, the pure-bf16 opt-in and its warning, float16 refused."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tether.config import build_config
from tether.errors import TetherError
from tether.legacy import PPOConfig
from tether.models import load_causal_lm
from tether import precision
from tether.precision import Placement, frozen_fraction
from tether.trainers.common import save_model
from tether.trainers.ppo import PPOTrainer

PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7=", "3*3=", "8-1=", "5+4=", "6*2="]


def config(*overrides, policy_dir="", reward_dir="", tmp_path=""):
    return build_config(
        overrides=[
            f"model.policy={policy_dir}",
            f"model.reward_model={reward_dir}",
            "model.device=cpu",
            "ppo.steps=1",
            "ppo.rollout_batch_size=8",
            "ppo.mini_batch_size=4",
            "ppo.ppo_epochs=2",
            "sampling.max_new_tokens=8",
            "logging.print_every=0",
            f"output_dir={tmp_path}",
            *overrides,
        ]
    )


def weights_moved(policy_dir, reward_dir, tmp_path, *overrides) -> tuple[float, PPOTrainer]:
    """(number of policy weights one PPO iteration changed, the trainer), seeded alike for every precision."""
    torch.manual_seed(0)
    trainer = PPOTrainer.from_config(
        config(*overrides, policy_dir=policy_dir, reward_dir=reward_dir, tmp_path=tmp_path)
    )
    before = {k: v.detach().clone() for k, v in trainer.actor_critic.policy.state_dict().items()}
    trainer.step(trainer.rollout(PROMPTS))
    after = trainer.actor_critic.policy.state_dict()
    return sum((before[k] != after[k]).sum().item() for k in before), trainer


def test_placement_decides_device_and_dtypes():
    model_config = build_config(overrides=["model.device=cpu"]).model
    default = Placement.from_config(model_config)
    assert (default.device, default.trained_dtype, default.frozen_dtype) == (
        torch.device("cpu"),
        torch.float32,
        torch.float32,
    )
    assert not torch.is_autocast_enabled("cpu")
    with default.autocast():
        assert not torch.is_autocast_enabled("cpu")
    model_config.dtype = "bfloat16"
    bf16 = Placement.from_config(model_config)
    assert (bf16.trained_dtype, bf16.frozen_dtype) == (torch.float32, torch.bfloat16)
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    frozen = bf16.frozen(torch.nn.Linear(4, 4))
    assert frozen.weight.dtype == torch.bfloat16 and not frozen.weight.requires_grad and not frozen.training
    assert bf16.trained(torch.nn.Linear(4, 4).bfloat16()).weight.dtype == torch.float32  # master weights
    model_config.master_weights = "dtype"
    assert Placement.from_config(model_config).trained_dtype == torch.bfloat16
    model_config.device = "gpu"
    with pytest.raises(TetherError, match="model.device 'gpu': expected auto, cpu, cuda or cuda:N"):
        Placement.from_config(model_config)
    model_config.device = "cuda:7"
    if torch.cuda.device_count() < 8:
        with pytest.raises(TetherError, match="model.device 'cuda:7': "):
            Placement.from_config(model_config)


def test_bf16_keeps_the_small_lr_update(policy_dir, reward_dir, tmp_path, device):
    lr = ["ppo.lr=1e-6", f"model.device={device}"]  # the tutorial's lr: far below what bf16 can add to |w| = 0.02
    moved_fp32, _ = weights_moved(policy_dir, reward_dir, tmp_path / "fp32", *lr)
    moved_bf16, trainer = weights_moved(policy_dir, reward_dir, tmp_path / "bf16", *lr, "model.dtype=bfloat16")
    with pytest.warns(UserWarning, match=r"model.master_weights=dtype: at lr 1e-06, updates round away for \d+%"):
        moved_pure, pure = weights_moved(
            policy_dir, reward_dir, tmp_path / "pure", *lr, "model.dtype=bfloat16", "model.master_weights=dtype"
        )
    # measured (CPU): 30,614 (float32), 30,609 (bf16 autocast, float32 masters), 1,396 (pure bf16) of 34,368
    assert moved_fp32 > 0.8 * sum(p.numel() for p in trainer.actor_critic.policy.parameters())
    assert moved_bf16 > 0.9 * moved_fp32
    assert moved_pure < 0.2 * moved_fp32
    # float32 master weights and Adam state for what trains; the frozen roles held in bf16
    assert {p.dtype for p in trainer.actor_critic.parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in trainer.optimizer.state.values()} == {torch.float32}
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.scorer.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pure.actor_critic.parameters()} == {torch.bfloat16}
    assert frozen_fraction(pure.actor_critic, 1e-6) > 0.5 > frozen_fraction(pure.actor_critic, 1e-2)


def test_no_warning_when_bf16_weights_can_take_the_step(policy_dir, reward_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PPOTrainer.from_config(
            config(
                "ppo.lr=1e-2",
                "model.dtype=bfloat16",
                "model.master_weights=dtype",
                policy_dir=policy_dir,
                reward_dir=reward_dir,
                tmp_path=tmp_path,
            )
        )
    assert not [w for w in caught if "master_weights" in str(w.message)]


def test_autocast_runs_the_forward_in_bf16_and_the_ppo_maths_in_float32(
    policy_dir, reward_dir, tmp_path, monkeypatch, device
):
    import tether.trainers.update as update

    overrides = ["model.dtype=bfloat16", f"model.device={device}"]
    trainer = PPOTrainer.from_config(
        config(*overrides, policy_dir=policy_dir, reward_dir=reward_dir, tmp_path=tmp_path)
    )
    matmuls, losses = set(), []
    trainer.actor_critic.policy.transformer.h[0].mlp.c_fc.register_forward_hook(
        lambda module, inputs, out: matmuls.add(out.dtype)
    )
    policy_loss = update.ppo_policy_loss

    def spy(new_logprobs, logprobs, advantages, *args, **kwargs):
        losses.append((new_logprobs.dtype, logprobs.dtype, advantages.dtype))
        return policy_loss(new_logprobs, logprobs, advantages, *args, **kwargs)

    monkeypatch.setattr(update, "ppo_policy_loss", spy)
    rollout = trainer.rollout(PROMPTS)
    assert matmuls == {torch.bfloat16}  # sampling and scoring ran under autocast
    assert rollout.logprobs.dtype == rollout.ref_logprobs.dtype == rollout.values.dtype == torch.float32
    assert rollout.raw_scores.dtype == torch.float32
    matmuls.clear()
    trainer.step(rollout)
    assert matmuls == {torch.bfloat16}  # the update's forward too
    assert losses and set(losses) == {(torch.float32,) * 3}
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.actor_critic.parameters())


@pytest.mark.parametrize("dtype, stored", [("float32", "F32"), ("bfloat16", "BF16")])
def test_saved_model_is_written_in_model_dtype(policy_dir, tmp_path, dtype, stored):
    from tether.data import write_jsonl
    from tether.trainers.sft import train_sft

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": "42"} for p in PROMPTS])
    run = build_config(
        overrides=[
            f"model.policy={policy_dir}",
            "model.device=cpu",
            f"model.dtype={dtype}",
            f"sft.data={tmp_path / 'sft.jsonl'}",
            "sft.steps=2",
            "sft.batch_size=4",
            "logging.print_every=0",
        ]
    )
    model_dir = train_sft(run, tmp_path, echo=lambda *a: None)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {stored}
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == dtype
    assert next(AutoModelForCausalLM.from_pretrained(model_dir).parameters()).dtype == getattr(torch, dtype)


def test_save_model_casts_on_the_way_out_and_keeps_tied_weights(policy_dir, tokenizer, tmp_path):
    policy = load_causal_lm(policy_dir)
    save_model(policy, tokenizer, tmp_path / "bf16", torch.bfloat16)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # the model itself is untouched
    reloaded = load_causal_lm(str(tmp_path / "bf16"))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    for (name, p), q in zip(policy.named_parameters(), reloaded.parameters()):
        assert torch.equal(p.bfloat16().float(), q), name


def test_float16_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tether.cli", "sft", "model.dtype=float16", f"output_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tether: model.dtype=float16 needs a gradient scaler, which tether does not have; use model.dtype=bfloat16"
    )
    with pytest.raises(TetherError, match="mixed_precision='fp16' is not supported"):
        PPOConfig(accelerator_kwargs={"mixed_precision": "fp16"})


def test_legacy_config_takes_device_and_bf16_from_accelerator_kwargs():
    model = PPOConfig(accelerator_kwargs={"cpu": True, "mixed_precision": "bf16"}).to_run_config().model
    assert (model.device, model.dtype, model.master_weights) == ("cpu", "bfloat16", "float32")
    assert (PPOConfig().to_run_config().model.device, PPOConfig().to_run_config().model.dtype) == ("auto", "float32")
    with pytest.warns(UserWarning, match=r"accelerator_kwargs\['split_batches'\] accepted but has no effect"):
        PPOConfig(accelerator_kwargs={"split_batches": True})


FAULTS = """
import resource, sys, torch
from tether.config import build_config
from tether.precision import Placement
Placement.from_config(build_config(None, ["model.device=cpu", f"model.cpu_memory={sys.argv[1]}"]).model)
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(32 * 2**20)  # 128 MiB: a vocabulary-sized tensor
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
steps = [faults_of_a_step() for _ in range(8)]
print(min(steps[2:]))  # the steady state: after the heap has grown to the step's size
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_memory_reuse_stops_page_faulting_large_tensors_in_at_every_step():
    """model.cpu_memory=reuse: a large tensor freed and allocated again reuses mapped memory (no page faults);
    release: glibc unmaps it and the kernel faults all its pages in again (one per 4 KiB page)."""

    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    pages = 32 * 2**20 * 4 // 4096
    assert faults("release") > pages // 2
    assert faults("reuse") < pages // 100


def no_bf16_instructions(monkeypatch, machine="x86_64", avx512_bf16=False, amx=False):
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


def placement_warnings(*overrides) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Placement.from_config(build_config(overrides=["model.device=cpu", *overrides]).model)
    return [str(w.message) for w in caught]


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch):
    no_bf16_instructions(monkeypatch)
    assert precision.cpu_has_bf16() is False
    (message,) = placement_warnings("model.dtype=bfloat16")
    assert message.startswith("model.dtype=bfloat16: this CPU has no bf16 instructions") and "\n" not in message
    assert placement_warnings("model.dtype=float32") == []
    for kind in ({"avx512_bf16": True}, {"amx": True}):  # either instruction set does bf16 in hardware
        no_bf16_instructions(monkeypatch, **kind)
        assert precision.cpu_has_bf16() is True
        assert placement_warnings("model.dtype=bfloat16") == []
    no_bf16_instructions(monkeypatch, machine="aarch64")  # the x86 probes say nothing of an Arm CPU
    assert precision.cpu_has_bf16() is None
    assert placement_warnings("model.dtype=bfloat16") == []


def test_the_cli_prints_the_bf16_warning_on_one_line(tmp_path):
    script = (
        "import torch, sys; from tether import cli, precision\n"
        "precision.platform.machine = lambda: 'x86_64'\n"
        "torch.cpu._is_avx512_bf16_supported = torch.cpu._is_amx_tile_supported = lambda: False\n"
        "cli.main(['sft', 'model.dtype=bfloat16', 'model.device=cpu', 'sft.steps=1', *sys.argv[1:]])\n"
    )
    (tmp_path / "sft.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n' * 4)
    run = [sys.executable, "-c", script, f"sft.data={tmp_path / 'sft.jsonl'}", f"output_dir={tmp_path / 'run'}"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "bf16 instructions" in line]
    assert lines == [lines[0]] and lines[0].startswith("tether: warning: model.dtype=bfloat16: this CPU has no bf16")
    assert "UserWarning" not in result.stderr
