"""What dropping stopped rows from the sampler's batch saves where responses vary in length (docs/algorithm.md,
"The sampler"; ``LeanDecoder.keep_rows``).

    python benchmarks/stopped_rows.py [--model /tmp/smollm2/hf] [--repeats 3] [--out FILE]

SmolLM2-135M-Instruct (``../shared/models/smollm2.sh`` builds the folder) on 2 threads, 16 prompts of 32 random token
ids, at most 64 new tokens, temperature 1. Responses end at any of the ``--stops`` lowest token ids (60 by default:
the rows stop after 1 to 64 tokens), the same noise keys on both sides. The sampler alternates with row dropping on
and off (off: every row decodes to the end, as before) in one process, so the machine's drift cancels; the tokens of
the two must be the same. Reported (and written to ``--out``, benchmarks/results/stopped-rows.json by default): the
fastest and median seconds of each, the rows' lengths, and a step's time at 16, 8, 4 and 1 rows.
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

from tether.decoding import LeanDecoder  # noqa: E402
from tether.models import load_causal_lm  # noqa: E402
from tether.precision import reuse_freed_memory  # noqa: E402
from tether.sampling import Sampling, row_keys, sample  # noqa: E402

EAGER_CPU = LeanDecoder.can_keep_rows  # the decoder's own rule


def timed(model, ids, stops, keys, sampling: Sampling, dropping: bool):
    """(seconds, Sampled) of one sampling pass, with stopped rows dropped or not."""
    LeanDecoder.can_keep_rows = property(lambda self: dropping and EAGER_CPU.fget(self))
    start = time.perf_counter()
    out = sample(model, ids, torch.ones_like(ids), sampling, stops, keys, record=True)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/smollm2/hf")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stops", type=int, default=60)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/stopped-rows.json"))
    args = p.parse_args()
    reuse_freed_memory()
    torch.set_num_threads(2)
    model = load_causal_lm(args.model)
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (16, 32))
    keys, stops = row_keys(0, 0, range(16)), list(range(args.stops))
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
    for rows in (16, 8, 4, 1):
        runs_at = [timed(model, ids[:rows], stops, keys[:rows], every_row, False)[0] for _ in range(3)]
        per_step[rows] = 1e3 * min(runs_at[1:]) / 32
    LeanDecoder.can_keep_rows = EAGER_CPU
    result = {
        "model": args.model,
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
