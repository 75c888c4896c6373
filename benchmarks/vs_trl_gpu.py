"""tether against TRL 1.12's PPO on one GPU, side by side (the GPU speed issue's harness).

    python benchmarks/vs_trl_gpu.py [--shapes qwen,smol] [--dtype bfloat16] [--iterations 3] [--warmup 1]
        [--trl-python python3] [--out benchmarks/results/gpu.json] [--set sampling.compile=true]

The work of the issue, identical on both sides: a model with a real model's exact shape (Qwen2.5-0.5B: 24 layers,
hidden 896, vocabulary 151,936; SmolLM2-135M: 30 layers, hidden 576, vocabulary 49,152), random weights since no
hub is reachable, and a word-level tokenizer of the same vocabulary size; a reward model and a critic that are its
trunk with one seeded scalar head (the critic starts as the reward model, as in TRL's PPO example); 64 prompts of
32 tokens, exactly 128 new tokens each, 4 epochs x 4 minibatches; bf16 on both sides (TRL: accelerate's mixed
precision; tether: ``model.dtype=bfloat16``, autocast on float32 master weights). Each side runs in its own process,
alternating, through ``benchmarks/vs_trl.py``'s two halves.

Reported per shape: first tether's sampler against ``transformers`` ``generate`` alone (the work's batch and length,
alternating in this process: new tokens/s, a reading of the sampling bar even if the PPO runs are cut short), then
the median s/iteration of each side and their ratio, seconds per phase (sampling, scoring passes, update), new
tokens/s inside sampling, peak GPU memory (``torch.cuda.max_memory_allocated``) and its ratio, and the share of the
card's bf16 matrix-multiply peak measured at the start of the run (useful FLOPs as in vs_trl.py). The results file
is rewritten after each setting, so a run cut short keeps what finished.

On the accelerator machine TRL and ``datasets`` are not installed: ``bash benchmarks/gpu_wheels.sh`` (here, where
pip reaches PyPI) downloads them into ``.whl/``, which the device call carries and installs (see that script).
``--device cpu`` runs the same code on the CPU with ``--scale`` shrinking the shapes and work (the harness's test).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402

SHAPES = {
    "qwen": dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "smol": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5),
}  # fmt: skip
WORK = dict(batch=64, mini_batches=4, epochs=4, new_tokens=128)


def shape_folder(name: str, root: Path, scale: int = 1) -> Path:
    """A model of ``SHAPES[name]`` (its layers and vocabulary divided by ``scale``) with random weights and a
    word-level tokenizer of its vocabulary size, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[name])
    family = shape.pop("family")
    shape["vocab_size"] //= scale
    shape["num_hidden_layers"] = max(1, shape["num_hidden_layers"] // scale)
    specials = ["<pad>", "<eos>", "<unk>"]
    words = [letters(i) for i in range(shape["vocab_size"] - len(specials))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    qwen = family == "qwen2"
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    config = config_class(**shape, tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=1,
                          eos_token_id=1, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    path = root / f"{name}-shape"
    model_class(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def letters(i: int) -> str:
    """The i-th word of a made-up vocabulary: a, b, ..., z, ba, bb, ... (letters only, so prompts use them)."""
    word = ""
    while True:
        word = chr(ord("a") + i % 26) + word
        i //= 26
        if not i:
            return word


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """GFLOP/s of a square matrix product in ``dtype`` on ``device`` (8192 on a GPU, 1024 on a CPU), now."""
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="qwen,smol")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--scale", type=int, default=1, help="divide layers, vocabulary, batch and tokens by this")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--trl-python", default=sys.executable)
    p.add_argument("--set", action="append", default=[], help="a tether override for its side")
    p.add_argument(
        "--no-sampler",
        dest="sampler",
        action="store_false",
        help="skip each shape's sampler against generate (the work's batch and length, before PPO)",
    )
    p.add_argument("--out", default=str(vs_trl.ROOT / "benchmarks" / "results" / "gpu.json"))
    args = p.parse_args(argv)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    args.peak = matmul_peak(args.device, dtype)
    print(f"{args.dtype} matmul peak on {args.device}: {args.peak:.0f} GFLOP/s", file=sys.stderr)
    args.set = [f"model.device={args.device}", f"model.dtype={args.dtype}", *args.set]
    trl_extra = ["--bf16"] if args.dtype == "bfloat16" else []
    work = {k: max(1, v // args.scale) if k in ("batch", "new_tokens") else v for k, v in WORK.items()}
    work["batch"] = max(work["batch"], work["mini_batches"])
    machine = vs_trl.versions(args.trl_python) | {"matmul_peak_gflops": args.peak, "dtype": args.dtype}
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    results = {"machine": machine, "work": work, "tether_overrides": args.set, "settings": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work_dir:
        args.work = Path(work_dir)
        for name in args.shapes.split(","):
            policy = shape_folder(name, args.work, args.scale)
            reward = vs_trl.reward_folder(policy, args.work)
            prompts = vs_trl.prompt_file(policy, work["batch"] * (args.warmup + args.iterations), args.work)
            if args.sampler:
                quick = vs_trl.sampler_vs_generate(policy, prompts, args, work["batch"], work["new_tokens"],
                                                   args.device, bf16=dtype == torch.bfloat16)  # fmt: skip
                record(results, quick | {"setting": f"sample {name}"}, args.out)
            result = vs_trl.side_by_side(name, policy, reward, prompts, work, args, trl_extra=trl_extra)
            record(results, result, args.out)


def record(results: dict, result: dict, out: str) -> None:
    """Add a setting's result, print its summary and rewrite ``out`` (so a run cut short keeps what finished)."""
    results["settings"].append(result)
    Path(out).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "times")}, indent=1), flush=True)


if __name__ == "__main__":
    main()
