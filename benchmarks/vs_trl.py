"""tether against TRL 1.12's PPO on identical work, side by side on this machine (the CPU speed issue's harness).

    python benchmarks/vs_trl.py [--trl-python /work/trl-venv/bin/python] [--real /tmp/smollm2/hf] \
        [--settings real,tiny,head,sample,curve] [--iterations 4] [--warmup 1] [--out benchmarks/results/cpu.json] \
        [--set model.compile=true] [--bf16]

TRL lives in its own virtual environment (``benchmarks/setup_trl.sh`` makes one) so it cannot disturb tether's
dependencies; its half is ``benchmarks/trl_side.py``. Each run is its own process (so peak RSS is its own), and the
two sides alternate: tether, TRL, tether, TRL. The work is the same on both sides: the same model folder, a reward
model and a critic that are its trunk with one seeded scalar head (TRL's example initialises its critic from the
reward model, and so does tether's ``model.value_model=separate``), the same prompts of equal length, exactly
``--new-tokens`` sampled tokens per row (EOS held back), the same PPO epochs and minibatches, float32; with ``--bf16``
bf16 mixed precision on both sides instead (TRL: accelerate's ``bf16=True``; tether: ``model.dtype=bfloat16``;
``generate`` and the sampler under bf16 autocast), where the CPU has it.

Settings:
- ``real``: SmolLM2-135M-Instruct (``../shared/models/smollm2.sh`` builds the folder), 16 prompts x 32 new tokens,
  2 epochs x 2 minibatches, separate critic on both sides.
- ``tiny``: a GPT-2 4x256 built from its config with a word-level tokenizer (3.4M parameters), 64 x 32, 4 x 4.
- ``head``: the real model with the tutorial's default, a value head on the policy trunk (tether only), against
  TRL's separate critic of the ``real`` setting.
- ``sample``: tether's sampler against ``transformers`` ``generate`` on the real model at batch 16, 32 new tokens,
  alternating in one process.
- ``curve``: tether's s/iteration on the real model for rollout batches 8, 16, 32 (32 tokens) and response lengths
  16, 32, 64 (batch 16).

Reported per setting: median s/iteration of each side and their ratio, median seconds per phase (sampling,
scoring passes, update), new tokens/s inside sampling, peak RSS, and the share of a float32 matrix-multiply peak
measured at the start of the run (useful FLOPs: 2 x parameters x tokens per forward, 3x that for a trained pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TRL_SIDE = ROOT / "benchmarks" / "trl_side.py"
SETTINGS = {
    "real": dict(batch=16, mini_batches=2, epochs=2, new_tokens=32),
    "tiny": dict(batch=64, mini_batches=4, epochs=4, new_tokens=32),
}
PROMPT_TOKENS = 32
PHASES = ("generate", "score", "update")


# ---- the work: models, prompts ---------------------------------------------------------------------------------


def tiny_folder(root: Path) -> Path:
    """A GPT-2 4x256 with random weights and a 1,000-word word-level tokenizer, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = root / "tiny"
    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(1000)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = GPT2Config(vocab_size=len(vocab), n_layer=4, n_embd=256, n_head=4, n_positions=256, bos_token_id=1,
                        eos_token_id=1, pad_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def reward_folder(policy: Path, root: Path) -> Path:
    """The policy's trunk with one seeded scalar head (tether.models.new_scalar_model), for reward model and critic."""
    from tether.models import load_tokenizer, new_scalar_model

    path = root / f"{policy.name}-reward"
    tok = load_tokenizer(str(policy))
    torch.manual_seed(1)
    model = new_scalar_model(str(policy))
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id < model.config.vocab_size else tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompt_file(policy: Path, count: int, root: Path) -> Path:
    """``count`` prompts of exactly PROMPT_TOKENS tokens each (text and ids; the ids re-tokenise to themselves)."""
    from tether.models import load_tokenizer

    tok = load_tokenizer(str(policy))
    gen = torch.Generator().manual_seed(0)
    words = [w for w in tok.get_vocab() if w.isalpha() and w.isascii()][:2000] or list(tok.get_vocab())
    path, rows = root / f"{policy.name}-prompts.jsonl", []
    while len(rows) < count:
        picks = torch.randint(len(words), (PROMPT_TOKENS,), generator=gen).tolist()
        text = " ".join(words[i] for i in picks)
        ids = tok(text, add_special_tokens=False).input_ids[:PROMPT_TOKENS]
        text = tok.decode(ids)
        if len(ids) == PROMPT_TOKENS and tok(text, add_special_tokens=False).input_ids == ids:
            rows.append({"prompt": text, "input_ids": ids})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- tether's side (run in its own process by the orchestrator) ------------------------------------------------


def tether_side(args) -> dict:
    """Run tether's PPO on the work and return the same record trl_side.py prints."""
    from tether.config import build_config
    from tether.trainers.ppo import PPOTrainer
    from tether.tracking import read_metrics

    torch.set_num_threads(args.threads)
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()]
    steps = args.warmup + args.iterations
    overrides = [
        f"model.policy={args.policy}", f"model.reward_model={args.reward}", f"model.value_model={args.value}",
        f"model.value_init={args.reward}", "model.device=cpu", f"model.dtype={args.dtype}",
        f"ppo.steps={steps}", f"ppo.rollout_batch_size={args.batch}",
        f"ppo.mini_batch_size={args.batch // args.mini_batches}", f"ppo.ppo_epochs={args.epochs}",
        f"sampling.max_new_tokens={args.new_tokens}", f"sampling.min_new_tokens={args.new_tokens}",
        f"sampling.max_prompt_length={PROMPT_TOKENS}", "ppo.kl_stop=none", "ppo.save_every=0", *args.set,
    ]  # fmt: skip
    config = build_config(None, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        config.output_dir = run_dir
        trainer = PPOTrainer.from_config(config)
        trainer.train(prompts, Path(run_dir), echo=lambda *a, **k: None)
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
        warmup_s, rows = [r["time/step"] for r in rows[: args.warmup]], rows[args.warmup :]
    sampled = [r["perf/sample_tokens_per_sec"] * r["time/sample"] for r in rows]
    return {
        "side": "tether",
        "iteration_s": [r["time/step"] for r in rows],
        "warmup_s": warmup_s,
        "phases": {
            "generate": [r["time/sample"] for r in rows],
            "score": [r["time/score"] for r in rows],
            "update": [r["time/step"] - r["time/rollout"] for r in rows],
        },
        "new_tokens": sampled,
        "new_tokens_per_s": statistics.median(n / r["time/sample"] for n, r in zip(sampled, rows)),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


# ---- the orchestrator ------------------------------------------------------------------------------------------


def run_side(python: str, script: Path, common: list[str], extra: list[str]) -> dict:
    """One side's process; its JSON line, or the error it printed."""
    cmd = [python, str(script), *common, *extra]
    print("  $", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep a carried site
    env = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{script.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_peak(seconds: float = 3.0) -> float:
    """float32 GFLOP/s of a 1024^3 matrix multiply on this machine, now."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 1024**3 * count / (time.perf_counter() - start) / 1e9


def useful_flops(policy: Path, work: dict, value: str) -> float:
    """FLOPs of one iteration's useful work: forwards of policy, reference, reward and critic over the rollout, and
    forward + backward (3x) of the trained models over every minibatch; 2 x parameters x tokens per forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy))
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    tokens = work["batch"] * (PROMPT_TOKENS + work["new_tokens"])
    trained = 1 if value == "head" else 2
    forwards = (2 + trained) * tokens + trained * 3 * work["epochs"] * tokens
    return 2 * params * forwards


def summarise(name: str, runs: dict[str, list[dict]], flops: float, peak: float) -> dict:
    """Medians per side and the ratios."""
    out = {"setting": name}
    for side, records in runs.items():
        iters = [t for r in records for t in r["iteration_s"]]
        phases = {k: statistics.median(t for r in records for t in r["phases"][k]) for k in PHASES}
        out[side] = {
            "s_per_iter": statistics.median(iters),
            "phases": phases,
            "new_tokens_per_s": statistics.median(r["new_tokens_per_s"] for r in records),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in records),
            "peak_gpu_gib": max((r.get("peak_gpu_gib") or 0 for r in records), default=0) or None,
            "share_of_matmul_peak": flops / statistics.median(iters) / 1e9 / peak,
        }
    if len(runs) == 2:
        tether, trl = out["tether"], out["trl"]
        out["speedup"] = trl["s_per_iter"] / tether["s_per_iter"]
        out["rss_ratio"] = tether["peak_rss_gib"] / trl["peak_rss_gib"]
        if tether["peak_gpu_gib"] and trl["peak_gpu_gib"]:
            out["gpu_memory_ratio"] = tether["peak_gpu_gib"] / trl["peak_gpu_gib"]
    return out


def side_by_side(name, policy, reward, prompts, work, args, sides=("tether", "trl"), value="separate", trl_extra=()):
    """``work`` on each side in its own process, alternating, ``args.repeats`` times; their summary
    (:func:`summarise`). ``trl_extra``: more arguments for TRL's side (``--bf16``)."""
    common = [f"--policy={policy}", f"--reward={reward}", f"--prompts={prompts}", f"--batch={work['batch']}",
              f"--mini-batches={work['mini_batches']}", f"--epochs={work['epochs']}",
              f"--new-tokens={work['new_tokens']}", f"--iterations={args.iterations}", f"--warmup={args.warmup}",
              f"--threads={args.threads}"]  # fmt: skip
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in sides:
            print(f"[{name}] {side}, repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
            if side == "tether":
                own = ["--side=tether", f"--value={value}", *(f"--set={o}" for o in args.set)]
                record = run_side(sys.executable, Path(__file__), own, common)
            else:
                record = run_side(args.trl_python, TRL_SIDE, common, list(trl_extra))
            runs[side].append(record)
    result = summarise(name, runs, useful_flops(policy, work, value), args.peak)
    result["work"], result["runs"] = work | {"value": value}, runs
    return result


def sampler_vs_generate(
    policy: Path, prompts: Path, args, batch: int = 16, new_tokens: int = 32, device: str = "cpu", bf16=None
) -> dict:
    """tether's sampler against transformers' generate, same model, prompts and settings, alternating, on ``device``
    (under bf16 autocast with ``bf16``; default ``args.bf16``)."""
    from transformers import GenerationConfig

    from tether.models import load_causal_lm, load_tokenizer
    from tether.precision import reuse_freed_memory
    from tether.sampling import Sampling, sample

    torch.set_num_threads(args.threads)
    if device == "cpu":
        reuse_freed_memory()  # what a CPU Placement does in tether's runs; both sides share this process
    tok, model = load_tokenizer(str(policy)), load_causal_lm(str(policy)).to(device).eval()
    ids = torch.tensor([json.loads(line)["input_ids"] for line in prompts.read_text().splitlines()][:batch])
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    eos = tok.eos_token_id
    config = GenerationConfig(do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens, top_k=0,
                              top_p=1.0, temperature=1.0, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    sampling = Sampling(new_tokens, min_new_tokens=new_tokens, compile="sampling.compile=true" in args.set)
    ways = {
        "generate": lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config),
        "tether": lambda: sample(model, ids, mask, sampling, [eos]),
    }
    times = {k: [] for k in ways}
    bf16 = args.bf16 if bf16 is None else bf16
    precision = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.no_grad(), precision:
        for k in ways:
            ways[k]()  # warm-up
        for _ in range(args.iterations):
            for k, f in ways.items():
                sync()
                start = time.perf_counter()
                f()
                sync()
                times[k].append(time.perf_counter() - start)
    rates = {k: batch * new_tokens / statistics.median(v) for k, v in times.items()}
    return {"setting": "sample", "tokens_per_s": rates, "speedup": rates["tether"] / rates["generate"], "times": times}


def curve(policy, reward, args) -> dict:
    """tether's s/iteration as the rollout batch and the response length grow."""
    points = []
    for batch, new_tokens in [(8, 32), (16, 32), (32, 32), (16, 16), (16, 64)]:
        work = dict(batch=batch, mini_batches=2, epochs=2, new_tokens=new_tokens)
        prompts = prompt_file(policy, batch * (args.warmup + args.iterations), args.work)
        result = side_by_side(f"curve b{batch} t{new_tokens}", policy, reward, prompts, work, args, ("tether",))
        points.append({"batch": batch, "new_tokens": new_tokens, "s_per_iter": result["tether"]["s_per_iter"]})
    return {"setting": "curve", "points": points}


def versions(trl_python: str) -> dict:
    import transformers

    trl = subprocess.run([trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.stdout.strip(),
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl-python", default="/work/trl-venv/bin/python")
    p.add_argument("--real", default="/tmp/smollm2/hf", help="the SmolLM2 folder (../shared/models/smollm2.sh)")
    p.add_argument("--settings", default="real,tiny,head,sample,curve")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="tether/TRL alternations per setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="a tether override for its side (model.compile=true)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu.json"))
    # tether's side, when this file is run as one
    p.add_argument("--side")
    p.add_argument("--policy")
    p.add_argument("--reward")
    p.add_argument("--prompts")
    p.add_argument("--batch", type=int)
    p.add_argument("--mini-batches", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--value", default="separate")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    if args.side == "tether":
        print(json.dumps(tether_side(args) | {"warmup": args.warmup}))
        return
    torch.set_num_threads(args.threads)
    settings = args.settings.split(",")
    trl_extra = ["--bf16"] if args.bf16 else []  # and tether's side model.dtype=bfloat16
    if args.bf16:
        args.set = [*args.set, "model.dtype=bfloat16"]
    args.peak = matmul_peak()
    print(f"float32 matmul peak: {args.peak:.0f} GFLOP/s", file=sys.stderr)
    machine = versions(args.trl_python) | {"matmul_peak_gflops": args.peak, "tether_overrides": args.set}
    machine["bf16"] = args.bf16
    results = {"machine": machine, "settings": []}
    with tempfile.TemporaryDirectory() as work_dir:
        args.work = Path(work_dir)
        real = Path(args.real)
        if {"real", "head", "sample", "curve"} & set(settings):
            real_reward = reward_folder(real, args.work)
            real_prompts = prompt_file(real, 16 * (args.warmup + args.iterations), args.work)
        if "real" in settings:
            work = SETTINGS["real"]
            results["settings"].append(
                side_by_side("real", real, real_reward, real_prompts, work, args, trl_extra=trl_extra)
            )
        if "tiny" in settings:
            tiny = tiny_folder(args.work)
            work = SETTINGS["tiny"]
            prompts = prompt_file(tiny, work["batch"] * (args.warmup + args.iterations), args.work)
            tiny_reward = reward_folder(tiny, args.work)
            results["settings"].append(
                side_by_side("tiny", tiny, tiny_reward, prompts, work, args, trl_extra=trl_extra)
            )
        if "head" in settings:
            head = side_by_side("head", real, real_reward, real_prompts, SETTINGS["real"], args, ("tether",), "head")
            results["settings"].append(head)
        if "sample" in settings:
            results["settings"].append(sampler_vs_generate(real, real_prompts, args))
        if "curve" in settings:
            results["settings"].append(curve(real, real_reward, args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    brief = {s["setting"]: {k: v for k, v in s.items() if k not in ("runs", "times")} for s in results["settings"]}
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
