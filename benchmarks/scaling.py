"""Memory and time of `tether ppo` on 1 process, and on 2 processes under DDP and under FSDP (docs/scaling.md).

    python benchmarks/scaling.py [--policy /tmp/smollm2/hf] [--value head|separate] [--iterations 3] [--live]
        [--out benchmarks/results/scaling.json]

Each run is `torchrun --standalone --nproc_per_node N -m tether ppo` (gloo on this CPU, one thread per process) on the
same global work: the policy folder, a reward model that is its trunk with a seeded scalar head (as in
benchmarks/vs_trl.py), 16 prompts of 32 tokens, exactly 16 new tokens, 2 epochs x 2 minibatches, float32. Reported:
the largest process's peak memory while training (``perf/peak_memory_gib`` of the last iteration: what one device
must hold) and over the whole run (with the final save, which gathers FSDP's shards for rank 0), and the median
s/iteration after the first.

``--live`` runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then returns every large freed block to the system, so
the resident set follows the memory in use. By default glibc keeps freed blocks of up to 32 MiB for reuse, which
FSDP's many short-lived gathered blocks inflate; on a GPU, torch's caching allocator is measured instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from vs_trl import prompt_file, reward_folder  # noqa: E402


# runs a command and writes the peak RSS (KiB) of its largest descendant: RUSAGE_CHILDREN of a fresh process
MEASURE = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


def one_run(processes: int, strategy: str, policy: Path, reward: Path, prompts: Path, args, run_dir: Path) -> dict:
    """A `tether ppo` run in a fresh torchrun; its peak RSS (largest process) and s/iteration."""
    peak_file = run_dir.with_suffix(".rss")
    cmd = [sys.executable, "-c", MEASURE, str(peak_file), sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node", str(processes)]
    cmd += ["-m", "tether", "ppo", f"model.policy={policy}", f"model.reward_model={reward}", "model.device=cpu"]
    cmd += [f"model.value_model={args.value}", f"model.value_init={reward}", f"distributed.strategy={strategy}"]
    cmd += [f"ppo.prompts={prompts}", f"ppo.steps={args.iterations}", "ppo.rollout_batch_size=16"]
    cmd += ["ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "sampling.max_new_tokens=16", "sampling.min_new_tokens=16"]
    cmd += ["ppo.kl_stop=none", "ppo.save_every=0", "logging.print_every=0", f"output_dir={run_dir}"]
    cmd += ["model.cpu_memory=release"]  # glibc's own settings (reuse would keep every process at its high-water mark)
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // processes), TOKENIZERS_PARALLELISM="false")
    if args.live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    print("  $", " ".join(cmd[5:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({processes} processes, {strategy}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "processes": processes,
        "strategy": strategy if processes > 1 else "none",
        "peak_training_gib": round(rows[-1]["perf/peak_memory_gib"], 2),  # any process, before the final save
        "peak_rss_gib": round(int(peak_file.read_text()) / 2**20, 2),  # any process, the whole run
        "s_per_iteration": round(statistics.median(r["time/step"] for r in rows[1:]), 2),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="/tmp/smollm2/hf")
    p.add_argument("--value", default="head", choices=["head", "separate"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--live", action="store_true", help="large freed blocks go back to the system (see above)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = p.parse_args(argv)
    policy = Path(args.policy)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reward, prompts = reward_folder(policy, work), prompt_file(policy, 16, work)
        results = []
        for processes, strategy in [(1, "ddp"), (2, "ddp"), (2, "fsdp")]:
            run_dir = work / f"{processes}-{strategy}"
            results.append(one_run(processes, strategy, policy, reward, prompts, args, run_dir))
            print(json.dumps(results[-1]), flush=True)
    record = {"policy": str(policy), "value": args.value, "live": args.live, "runs": results}
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if out.is_file() else []
    kept = [r for r in earlier if (r["policy"], r["value"], r["live"]) != (str(policy), args.value, args.live)]
    out.write_text(json.dumps([*kept, record], indent=2) + "\n")


if __name__ == "__main__":
    main()
