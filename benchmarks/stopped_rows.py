"""What dropping stopped rows from the sampler's batch saves where responses vary in length (docs/algorithm.md,
"The sampler"; ``LeanDecoder.keep_rows`` and ``TransformersSteps.keep_rows``).

    python benchmarks/stopped_rows.py [--model /tmp/smollm2/hf] [--batch 16] [--repeats 3] [--out FILE]

SmolLM2-135M-Instruct (``../shared/models/smollm2.sh`` builds the folder; it decodes through the LeanDecoder) on 2
threads, ``--batch`` prompts of 32 random token ids, at most 64 new tokens, temperature 1. ``--model gpt2-tiny`` and
``--model gpt2-small`` build a GPT-2 from its config instead, with random weights (4 x 256 with 1,003 tokens, the CPU
harness's tiny model; 12 x 768 with 50,257), which decode through ``transformers``' own forward and cache. Responses
end at any of the ``--stops`` lowest token ids (60 by default: SmolLM2's rows stop after 1 to 64 tokens), the same
noise keys on both sides. The sampler alternates with row dropping on and off (off: every row decodes to the end, as
before) in one process, so the machine's drift cancels; the tokens of the two must be the same. Reported (and written
to ``--out``, benchmarks/results/stopped-rows.json by default): the fastest and median seconds of each, the rows'
lengths, and a step's time at the whole batch, a half, a quarter and 1 row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from tether.decoding import LeanDecoder  # noqa: E402
from tether.models import load_causal_lm  # noqa: E402
from tether.precision import reuse_freed_memory  # noqa: E402
from tether.sampling import Sampling, TransformersSteps, row_keys, sample  # noqa: E402

DECODERS = (LeanDecoder, TransformersSteps)
RULES = {decoder: decoder.can_keep_rows for decoder in DECODERS}  # each decoder's own rule
GPT2 = {"gpt2-tiny": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=1003), "gpt2-small": {}}


def load(name: str):
    """The model: a folder, or a GPT-2 shape of GPT2 with random weights."""
    if name not in GPT2:
        return load_causal_lm(name)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**GPT2[name])).eval()


def timed(model, ids, stops, keys, sampling: Sampling, dropping: bool):
    """(seconds, Sampled) of one sampling pass, with stopped rows dropped or not."""
    for decoder, rule in RULES.items():
        decoder.can_keep_rows = property(lambda self, rule=rule: dropping and rule.fget(self))
    start = time.perf_counter()
    out = sample(model, ids, torch.ones_like(ids), sampling, stops, keys, record=True)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/smollm2/hf", help="a model folder, gpt2-tiny or gpt2-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stops", type=int, default=60)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/stopped-rows.json"))
    args = p.parse_args()
    reuse_freed_memory()
    torch.set_num_threads(2)
    model = load(args.model)
    torch.manual_seed(0)
    ids = torch.randint(100, min(40000, model.config.vocab_size), (args.batch, 32))
    keys, stops = row_keys(0, 0, range(args.batch)), list(range(args.stops))
    runs = {"on": [], "off": []}
    outs = {}
    for mode in ("on", "off") * (args.repeats + 1):  # the first of each warms up
        seconds, outs[mode] = timed(model, ids, stops, keys, Sampling(64), mode == "on")
        runs[mode].append(seconds)
    assert torch.equal(outs["on"].tokens, outs["off"].tokens), "dropping rows changed the tokens"
    ended = torch.isin(outs["off"].tokens, torch.tensor(stops)).int()
    lengths = ((ended.cumsum(1) - ended) == 0).sum(1).tolist()  # tokens up to and including the stop
    per_step = {}
    every_row = Sampling(32, min_new_tokens=32)  # no row stops: a step's time at a given number of rows
    for rows in (args.batch, args.batch // 2, args.batch // 4, 1):
        runs_at = [timed(model, ids[:rows], stops, keys[:rows], every_row, False)[0] for _ in range(3)]
        per_step[rows] = 1e3 * min(runs_at[1:]) / 32
    for decoder, rule in RULES.items():
        decoder.can_keep_rows = rule
    result = {
        "model": args.model,
        "batch": args.batch,
        "torch": torch.__version__,
        "lengths": sorted(lengths),
        "seconds": {k: {"min": min(v[1:]), "median": statistics.median(v[1:]), "all": v[1:]} for k, v in runs.items()},
        "ms_per_step_by_rows": per_step,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    on, off = result["seconds"]["on"]["median"], result["seconds"]["off"]["median"]
    print(f"lengths {sorted(lengths)}")
    print(f"dropping stopped rows: {on:.2f} s, decoding every row to the end: {off:.2f} s ({1 - on / off:.0%} less)")
    print("ms per step by rows: " + ", ".join(f"{k}: {v:.1f}" for k, v in per_step.items()))


if __name__ == "__main__":
    main()
