"""model.offload_frozen: the reference and reward model leave the device between scorings, and nothing else moves."""

import gc
import os
import tempfile

import pytest
import torch
from torch import nn

from tether.config import build_config
from tether.errors import TetherError
from tether.offload import Offloaded, evicted, present
from tether.trainers.ppo import PPOTrainer
from tether.tracking import read_metrics

PROMPTS = ["1+1=", "2*3=", "9-4=", "7+7=", "3*3=", "8-1=", "5+4=", "6*2="]


def resident(module) -> bool:
    return all(p.numel() > 0 for p in module.parameters())


def run(tiny_ppo_args, tmp_path, device, offload: bool, seen: list | None = None, scoring: list | None = None):
    config = build_config(
        overrides=[
            *tiny_ppo_args,
            f"model.device={device}",
            f"output_dir={tmp_path}",
            f"model.gold_reward={tiny_ppo_args[1].split('=', 1)[1]}",  # the reward folder as a gold judge too
            "model.value_model=separate",
            f"model.offload_frozen={str(offload).lower()}",
        ]
    )
    torch.manual_seed(0)
    trainer = PPOTrainer.from_config(config)

    def watch(trainer, rollout):  # after the update: where the frozen roles are while the policy trains
        if seen is not None:
            seen.append([resident(m) for m in (trainer.reference, trainer.scorer.model, trainer.gold.model)])

    if scoring is not None:  # while each frozen role runs: whether the other one is resident
        ref, rm = trainer.reference, trainer.scorer.model
        hook = ref.get_input_embeddings().register_forward_pre_hook  # the forwards call the trunks' parts
        hook(lambda *_: scoring.append(("reference", resident(rm))))
        rm.get_input_embeddings().register_forward_pre_hook(lambda *_: scoring.append(("reward", resident(ref))))
    trainer.train(PROMPTS, tmp_path, on_step=watch)
    return trainer, read_metrics(tmp_path / "metrics.jsonl")


def test_offloaded_run_gives_the_same_numbers_and_keeps_frozen_roles_away(tiny_ppo_args, tmp_path, device):
    plain, plain_rows = run(tiny_ppo_args, tmp_path / "plain", device, offload=False)
    seen, scoring = [], []
    moved, moved_rows = run(tiny_ppo_args, tmp_path / "moved", device, offload=True, seen=seen, scoring=scoring)
    assert seen == [[False, False, False]] * 2  # off the device through the update, every iteration
    assert {role for role, _ in scoring} == {"reference", "reward"}
    assert not any(other for _, other in scoring)  # scoring brings back one frozen role at a time
    for a, b in zip(plain_rows, moved_rows, strict=True):
        keys = [k for k in a if not k.startswith(("time/", "perf/"))]
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    for a, b in zip(plain.actor_critic.state_dict().values(), moved.actor_critic.state_dict().values()):
        assert torch.equal(a, b)
    # after train() the frozen roles are back, on their device, with the weights they had
    for a, b in ((plain.reference, moved.reference), (plain.scorer.model, moved.scorer.model)):
        assert resident(b) and all(p.device.type == device for p in b.parameters())
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tied_weights_stay_tied_and_shared_weights_stay_put():
    torch.manual_seed(0)
    trained = nn.Linear(4, 4)
    frozen = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.Linear(4, 4))
    frozen[1].weight = frozen[0].weight  # tied, as an LM head and its embedding
    frozen[2].weight = trained.weight  # shared with a trained model (a LoRA policy's base weight)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    offloaded = Offloaded([frozen, None], keep=trained)
    assert len(offloaded.params) == 2  # the tied embedding once, the last bias; not the shared weight
    offloaded.evict()
    assert frozen[0].weight.numel() == 0 and frozen[2].bias.numel() == 0
    assert frozen[2].weight is trained.weight and trained.weight.numel() == 16
    offloaded.restore()
    assert frozen[1].weight is frozen[0].weight
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    ids = torch.tensor([1, 2])
    assert frozen[1](frozen[0](ids)).shape == (2, 10)


def test_present_restores_only_what_was_away_and_evicted_brings_all_back():
    model = nn.Linear(3, 3)
    offloaded = Offloaded([model])
    with present(offloaded):  # resident already: present changes nothing, on entry or exit
        assert resident(model)
    assert resident(model)
    with evicted(offloaded, None):
        assert not resident(model)
        with present(offloaded, None):
            assert resident(model)
        assert not resident(model)
    assert resident(model)


def test_the_cpu_copy_is_a_file_removed_with_it():
    offloaded = Offloaded([nn.Linear(3, 3)])
    offloaded.evict()
    path = offloaded.home.path
    assert os.path.getsize(path) > 0
    offloaded.restore()
    del offloaded
    gc.collect()
    assert not os.path.exists(path)


def test_an_unwritable_temporary_folder_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    offloaded = Offloaded([nn.Linear(3, 3)])
    message = r"^model.offload_frozen: cannot write the frozen roles to .*missing \(No such file or directory\); set "
    with pytest.raises(TetherError, match=message + "TMPDIR to a folder on a disk with room for them$"):
        offloaded.evict()
    assert offloaded.resident


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_gpu_copy_is_pinned_host_memory():
    model = nn.Linear(3, 3).cuda()
    before = model.weight.detach().clone()
    offloaded = Offloaded([model])
    offloaded.evict()
    assert all(t.is_pinned() for t in offloaded.home.tensors)
    assert model.weight.untyped_storage().nbytes() == 0  # the weights' device memory is free
    offloaded.restore()
    assert model.weight.device.type == "cuda" and torch.equal(model.weight, before)
