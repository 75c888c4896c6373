"""`tether review RUN`: rate samples of a trained policy by hand, then see how well the reward model agrees.

The first run draws ``--num`` responses of RUN's policy to held-out prompts (``--per-prompt`` different ones per
prompt), scores them with the reward model and stores them in ``RUN/review.sqlite``; every later run shows the same
samples and asks only for the ones still unanswered. Answers come from the terminal (one key each), a ``--ratings``
JSONL file or, on the demo task, the gold judge (``--judge gold``). The report (:mod:`tether.review.report`) is
printed and written to ``RUN/review.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tether.errors import TetherError
from tether.review.report import Rules, build_report, format_report, gold_rating, sample_dict
from tether.review.store import STORE_NAME, ReviewStore, Sample

DESCRIPTION = (
    "Rate samples of a run's policy by hand (1-5 per sample, saved as you go in RUN/review.sqlite), then report the "
    "reward model's correlation with the ratings and the samples it scores high that were rated low."
)
DEFAULTS = {"num": 20, "per_prompt": 2, "seed": 0}
REPORT_NAME = "review.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `tether review` to ``parser``."""
    parser.add_argument("run", metavar="RUN", help="a run folder of tether demo or tether ppo")
    parser.add_argument("-n", "--num", type=int, metavar="N", help="samples to draw the first time (default 20)")
    parser.add_argument("--per-prompt", type=int, metavar="N", help="different responses per prompt (default 2)")
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help='held-out {"prompt": ...} JSONL (a demo run: RUN/data/eval_prompts.jsonl by default; a ppo run needs it)',
    )
    parser.add_argument("--seed", type=int, metavar="N", help="seed of the prompt choice and the sampling (default 0)")
    parser.add_argument(
        "--reward-model", metavar="SPEC", help="score with this reward model folder or module:function instead"
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--ratings",
        metavar="FILE",
        help='answers as JSONL {"id": N, "rating": 1-5} ("skip" skips, null: line ignored) instead of asking',
    )
    how.add_argument("--judge", choices=["gold"], help="demo task only: the gold judge rates (mapped to 1-5)")
    how.add_argument("--export", metavar="FILE", help="write the samples and answers so far as JSONL and stop")
    how.add_argument("--report", action="store_true", help="only report on the answers so far; ask nothing")
    parser.add_argument("--ask-skipped", action="store_true", help="ask again for samples skipped before")
    parser.add_argument("--blind", action="store_true", help="hide the RM score while rating (no anchoring on it)")
    parser.add_argument(
        "--min-correlation",
        type=float,
        default=0.6,
        metavar="R",
        help="below this Pearson r the reward model needs retraining (default 0.6)",
    )
    parser.add_argument(
        "--high-quantile",
        type=float,
        default=0.5,
        metavar="Q",
        help="an RM score is high at or above this quantile of the rated samples' scores (default 0.5, the median)",
    )
    parser.add_argument(
        "--rm-high", type=float, metavar="X", help="an absolute high RM score instead of --high-quantile"
    )


def run_review(args: argparse.Namespace) -> int:
    """Draw (the first time), collect answers and print the report of `tether review`; returns the exit status."""
    _check_options(args)
    run = Path(args.run)
    if not run.is_dir():
        raise TetherError(f"{run}: no such run folder")
    answers = _read_ratings(Path(args.ratings)) if args.ratings else None
    interactive = answers is None and not (args.judge or args.export or args.report)
    if interactive and not sys.stdin.isatty() and not (run / STORE_NAME).is_file():
        raise _no_terminal()  # before drawing samples nobody could rate here
    store = _open_or_draw(run, args)
    try:
        if args.export:
            return _export(store, Path(args.export))
        if answers is not None:
            _apply_ratings(store, answers, Path(args.ratings))
        elif args.judge:
            _judge(store)
        elif interactive:
            _ask(store, args)
        return _report(store, run, Rules(args.min_correlation, args.high_quantile, args.rm_high))
    finally:
        store.close()


def _no_terminal() -> TetherError:
    return TetherError("stdin is not a terminal: give the ratings with --ratings FILE or --judge gold")


def _check_options(args: argparse.Namespace) -> None:
    for name in ("num", "per_prompt"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TetherError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0.0 <= args.high_quantile <= 1.0:
        raise TetherError(f"--high-quantile must be in [0, 1], got {args.high_quantile}")
    if not -1.0 <= args.min_correlation <= 1.0:
        raise TetherError(f"--min-correlation must be in [-1, 1], got {args.min_correlation}")


def _open_or_draw(run: Path, args: argparse.Namespace) -> ReviewStore:
    """The run's review store: opened when it holds samples (noting options it ignores), else drawn and filled."""
    path = run / STORE_NAME
    if path.is_file():
        store = ReviewStore(path)
        if store.has_samples():
            _note_ignored(store.meta(), args, path)
            return store
        store.close()
    if args.report:
        raise TetherError(f"{path}: no review yet (run `tether review {run}` first)")
    from tether.review.draw import draw_samples, find_run, read_prompts, shuffle_prompts

    source = find_run(run, args.prompts, args.reward_model)
    num, per_prompt, seed = (getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS.items())
    prompts = shuffle_prompts(read_prompts(source), seed)
    if args.judge:
        _check_task_prompts(prompts)
    print(f"drawing {num} samples of {source.policy} ({per_prompt} different responses per prompt) ...")
    samples = draw_samples(source, prompts, num, per_prompt, seed)
    if len(samples) < num:
        print(f"{source.prompts}: the {len(prompts)} prompts gave only {len(samples)} different samples")
    meta = {
        "run_kind": source.kind,
        "policy": str(source.policy),
        "reward_model": source.reward_model,
        "prompts": str(source.prompts),
        "num": num,
        "per_prompt": per_prompt,
        "seed": seed,
    }
    store = ReviewStore(path)
    store.add_samples(samples, meta)
    print(f"stored {len(samples)} samples in {path}")
    return store


def _note_ignored(meta: dict, args: argparse.Namespace, path: Path) -> None:
    """One line when an option that only matters for drawing differs from what the stored samples were drawn with."""
    changed = [k for k in DEFAULTS if getattr(args, k) is not None and getattr(args, k) != meta.get(k)]
    changed += [k for k in ("prompts", "reward_model") if getattr(args, k)]
    if changed:
        names = ", ".join("--" + k.replace("_", "-") for k in changed)
        print(f"{path} already holds its samples: {names} ignored (remove the file to draw new ones)")


def _read_ratings(path: Path) -> list[tuple[int, int | None, int]]:
    """(id, rating or None for a skip, line number) of each answer in a ratings JSONL file; lines whose rating is
    null are left out. Errors name the file and line."""
    if not path.is_file():
        raise TetherError(f"{path}: ratings file not found")
    answers = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TetherError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "id" not in record or "rating" not in record:
                raise TetherError(f'{where}: expected a JSON object {{"id": N, "rating": 1-5}}')
            sample_id, rating = record["id"], record["rating"]
            if not _is_integer(sample_id):
                raise TetherError(f"{where}: id must be a sample number, got {json.dumps(sample_id)}")
            if rating is None:
                continue
            if rating == "skip":
                answers.append((int(sample_id), None, lineno))
            elif _is_integer(rating) and 1 <= rating <= 5:
                answers.append((int(sample_id), int(rating), lineno))
            else:
                raise TetherError(f'{where}: rating must be 1-5, "skip" or null, got {json.dumps(rating)}')
    return answers


def _is_integer(value) -> bool:
    return not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    )


def _apply_ratings(store: ReviewStore, answers: list[tuple[int, int | None, int]], path: Path) -> None:
    """Record a ratings file's answers in one transaction (none of them when one names no stored sample)."""
    ids = store.ids()
    for sample_id, _, lineno in answers:
        if sample_id not in ids:
            raise TetherError(
                f"{path}:{lineno}: no sample {sample_id} in {store.path} (ids {min(ids)}-{max(ids)}; "
                "see them with --export FILE)"
            )
    store.answer_many([(i, r) for i, r, _ in answers], "file")
    print(f"{path}: {len(answers)} answers recorded")


def _check_task_prompts(prompts: list) -> None:
    """Raise unless every prompt is a prompt of the demo task (the only one the gold judge knows)."""
    from tether.demo.task import solve

    for prompt in prompts:
        try:
            if not isinstance(prompt, str):
                raise ValueError(prompt)
            solve(prompt)
        except ValueError:
            raise TetherError(
                f"--judge gold knows only the demo task's prompts (like '7*8='), not {json.dumps(prompt)[:60]}"
            ) from None


def _judge(store: ReviewStore) -> None:
    """The demo's gold judge rates every unanswered sample (its score mapped to 1-5 by :func:`gold_rating`)."""
    from tether.demo.task import gold_score

    pending = [s for s in store.samples() if not s.answered]
    _check_task_prompts([s.prompt for s in pending])
    store.answer_many([(s.id, gold_rating(gold_score(s.prompt, s.response))) for s in pending], "judge:gold")
    print(f"gold judge: {len(pending)} samples rated")


def _ask(store: ReviewStore, args: argparse.Namespace) -> None:
    """The terminal loop over the samples still to answer."""
    from tether.review.terminal import KEYS_HELP, rate_interactively, single_keys

    queue = store.pending(args.ask_skipped)
    if not queue:
        return
    if not sys.stdin.isatty():
        raise _no_terminal()
    print(f"{len(queue)} samples to rate ({KEYS_HELP}); answers are saved as you go in {store.path}")
    with single_keys(sys.stdin.fileno()) as read_key:
        finished = rate_interactively(store, queue, read_key, sys.stdout, show_score=not args.blind)
    print("all samples answered\n" if finished else "stopped: run the same command again to go on\n")


def _export(store: ReviewStore, path: Path) -> int:
    """Write every sample with its answer as JSONL (a ratings file to fill in and read back with --ratings)."""
    from tether.data import write_jsonl

    samples: list[Sample] = store.samples()
    write_jsonl(path, [sample_dict(s) for s in samples])
    print(f"{path}: {len(samples)} samples (fill in each rating and read them back with --ratings {path})")
    return 0


def _report(store: ReviewStore, run: Path, rules: Rules) -> int:
    """Print the report and write it to RUN/review.json."""
    report = {"run": str(run), "store": str(store.path), "drawn_with": store.meta()}
    report.update(build_report(store.samples(), rules))
    path = run / REPORT_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    print(format_report(report, str(run)))
    print(f"report: {path}")
    return 0
