"""A reward that changes (the tutorial's situation 4): a finished `tether ppo` run continued on a new reward keeps
its policy, value model, optimizer and reference, and starts the old reward's normaliser and alarms afresh."""

import json

from safetensors.torch import load_file

from tether.cli import run
from tether.data import write_jsonl


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_finished_run_continues_on_a_new_reward_function(tmp_path, tiny_ppo_args):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": f"{a}+{b}="} for a in range(5) for b in range(3)])
    (tmp_path / "new_reward.py").write_text("def score(prompts, responses):\n    return [2.5 for _ in responses]\n")
    run_dir = tmp_path / "run"
    common = [f"ppo.prompts={prompts}", "ppo.save_every=1", "model.device=cpu", "ppo.score_norm=scale"]
    assert run(["ppo", *tiny_ppo_args, *common, "ppo.steps=3", f"output_dir={run_dir}"]) == 0
    finished = load_file(run_dir / "model" / "model.safetensors")
    new = f"model.reward_model={tmp_path / 'new_reward.py'}:score"
    assert run(["ppo", "--resume", str(run_dir), new, "ppo.steps=5"]) == 0

    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["reward/score"] != 2.5 for r in rows[:3])  # the reward model's scores
    assert [r["reward/score"] for r in rows[3:]] == [2.5, 2.5]  # the new function's
    # the policy went on; it did not restart (at the first iteration it is the reference, to float rounding)
    assert abs(rows[0]["kl/ref"]) < 1e-5 < abs(rows[3]["kl/ref"]), [r["kl/ref"] for r in rows]
    # the running score scale restarted: fresh moments (prior count 1e-4) see a constant 2.5 with std ~0.01 and
    # scale it to ~260; the old reward's moments (std of the reward model's scores, ~1) would have given ~2.5
    assert rows[3]["reward/scaled"] > 100
    summary = json.loads((run_dir / "summary.json").read_text())
    changed = [e for e in summary["events"] if e["kind"] == "reward_changed"]
    assert changed == [
        {
            "iteration": 3,
            "kind": "reward_changed",
            "from": tiny_ppo_args[1].split("=", 1)[1],
            "to": f"{tmp_path / 'new_reward.py'}:score",
        }
    ]
    weights = load_file(run_dir / "model" / "model.safetensors")
    assert any(not weights[k].equal(finished[k]) for k in weights)  # trained further on the new reward
