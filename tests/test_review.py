"""`tether review`: report maths, the SQLite store, --ratings / --judge gold end to end, resume, undo and skip, and
the one-key rating loop driven through a real pseudo terminal."""

import argparse
import io
import json
import math
import os
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
import yaml

from tether.fields import to_dict
from tether.demo.pipeline import demo_config
from tether.demo.task import gold_score, is_correct, split_prompts
from tether.errors import TetherError
from tether.evaluate import evaluate_policy
from tether.models import load_causal_lm
from tether.precision import Placement
from tether.review import rated_samples
from tether.review.command import add_arguments, run_review
from tether.review.report import Rules, build_report, fisher_interval, format_report, gold_rating, quantile
from tether.review.store import ReviewStore, Sample
from tether.review.terminal import rate_interactively
from tether.rewards import FunctionScorer
from tether.rollout import Sampling

ROOT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = split_prompts(12, 0)[1]


def review(*argv) -> int:
    """`tether review ARGV` in this process (stdout goes to capsys)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run_review(parser.parse_args([str(a) for a in argv]))


def write_config(run: Path, **model) -> None:
    config = demo_config()
    config.sampling.max_new_tokens = 6
    config.model.device = "cpu"
    for key, value in model.items():
        setattr(config.model, key, value)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def write_prompts(path: Path, prompts: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def make_demo_run(run: Path, policy_dir: str, reward_dir: str) -> Path:
    """A folder laid out as `tether demo` leaves it (config.yaml, ppo/model, reward/model, held-out prompts)."""
    shutil.copytree(policy_dir, run / "ppo" / "model")
    shutil.copytree(reward_dir, run / "reward" / "model")
    (run / "sft").mkdir()
    write_prompts(run / "data" / "eval_prompts.jsonl", EVAL_PROMPTS)
    write_config(run, policy="tiny", reward_model="")  # demo writes its config before training: not its models
    return run


def make_ppo_run(run: Path, policy_dir: str, reward: str) -> Path:
    """A folder laid out as `tether ppo` leaves it (config.yaml naming the reward, model/)."""
    shutil.copytree(policy_dir, run / "model")
    write_config(run, policy=policy_dir, reward_model=reward)
    return run


@pytest.fixture(scope="module")
def drawn_run(tmp_path_factory, policy_dir, reward_dir):
    """A demo run whose review holds 8 drawn samples and no answers yet (tests copy it)."""
    run = make_demo_run(tmp_path_factory.mktemp("drawn") / "run", policy_dir, reward_dir)
    assert review(run, "--export", run / "samples.jsonl", "-n", 8) == 0
    return run


@pytest.fixture
def run(drawn_run, tmp_path):
    return Path(shutil.copytree(drawn_run, tmp_path / "run"))


def stored(run: Path) -> tuple[list[tuple], dict[int, tuple]]:
    """(samples rows, {sample_id: (rating, source)}) as the SQLite file holds them."""
    db = sqlite3.connect(run / "review.sqlite")
    samples = db.execute("SELECT id, prompt, response, rm_score FROM samples ORDER BY id").fetchall()
    answers = {i: (r, s) for i, r, s in db.execute("SELECT sample_id, rating, source FROM answers")}
    db.close()
    return samples, answers


def ratings_file(path: Path, answers: dict) -> Path:
    path.write_text("".join(json.dumps({"id": i, "rating": r}) + "\n" for i, r in answers.items()))
    return path


def samples_of(ratings: list, scores: list) -> list[Sample]:
    return [Sample(i, "1+1=", "2", s, r, source="human") for i, (r, s) in enumerate(zip(ratings, scores), 1)]


# --- the report's maths on hand-made data ----------------------------------------------------------------------


def test_pearson_interval_and_quantile_by_hand():
    report = build_report(samples_of([1, 3, 2, 4], [1.0, 2.0, 3.0, 4.0]), Rules())
    assert report["pearson"] == pytest.approx(0.8)  # Sxy = 4, Sxx = Syy = 5
    lo, hi = report["pearson_ci95"]
    z = 1.959964  # n = 4: atanh(r) +- z / sqrt(1)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(0.8) - z), math.tanh(math.atanh(0.8) + z)))
    assert fisher_interval(0.5, 3) is None
    assert quantile([5.0, 1.0, 4.0, 2.0, 3.0], 0.75) == 4.0
    assert quantile([0.0, 10.0], 0.75) == 7.5
    assert quantile([2.0], 0.75) == 2.0


@pytest.mark.parametrize(
    "ratings, threshold, retrain",
    [
        ([2, 1, 4, 3], 0.6, False),  # r = 3/5 exactly: at the threshold is not below it
        ([2, 1, 4, 3], 0.61, True),
        ([3, 1, 4, 2], 0.6, True),  # r = 0
        ([1, 2, 3, 4], 0.6, False),  # r = 1
    ],
)
def test_retrain_verdict_at_the_threshold(ratings, threshold, retrain):
    report = build_report(samples_of(ratings, [1.0, 2.0, 3.0, 4.0]), Rules(min_correlation=threshold))
    assert report["pearson"] == pytest.approx(statistics.correlation([1.0, 2.0, 3.0, 4.0], ratings))
    assert report["rm_needs_retraining"] is retrain
    assert ("needs retraining" in format_report(report)) is retrain


def test_flags_are_high_rm_and_low_rating_and_skips_are_left_out():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    ratings = [1, 2, 5, 4, 3, 5, 2, 1]
    samples = samples_of(ratings, scores)
    samples += [
        Sample(9, "1+1=", "x", 9.0, None, skipped=True, source="human"),  # skipped: not rated, not flagged
        Sample(10, "1+1=", "y", 9.5),  # unanswered
        Sample(11, "1+1=", "z", None, 1, source="file"),  # rated, but no finite RM score
    ]
    report = build_report(samples, Rules())
    assert report["rm_high_threshold"] == pytest.approx(0.45)  # the median of the 8 scored ratings
    assert [s["id"] for s in report["flagged"]] == [8, 7]  # highest RM score first; #5 (0.5) is rated 3
    assert report["pearson"] == pytest.approx(statistics.correlation(scores, ratings))
    assert (report["rated"], report["skipped"], report["unrated"], report["unscored"]) == (9, 1, 1, 1)
    assert report["rating_counts"] == {"1": 3, "2": 2, "3": 1, "4": 1, "5": 2}
    assert report["mean_rm_score_by_rating"] == pytest.approx({"1": 0.45, "2": 0.45, "3": 0.5, "4": 0.4, "5": 0.45})
    assert report["preference_pairs"] == 36 - 5  # one prompt, 9 rated: 9 * 8 / 2 pairs, 5 of them equal ratings
    assert [s["id"] for s in build_report(samples, Rules(high_quantile=0.75))["flagged"]] == [8, 7]  # >= 0.625
    assert [s["id"] for s in build_report(samples, Rules(high_quantile=0.9))["flagged"]] == [8]
    assert [s["id"] for s in build_report(samples, Rules(high_quantile=0.0))["flagged"]] == [8, 7, 2, 1]
    assert [s["id"] for s in build_report(samples, Rules(rm_high=0.15))["flagged"]] == [8, 7, 2]


def test_correlation_is_undefined_with_equal_ratings_and_no_verdict_is_given():
    report = build_report(samples_of([2, 2, 2], [0.1, 0.5, 0.9]), Rules())
    assert report["pearson"] is None and report["rm_needs_retraining"] is None
    assert "undefined (the ratings or the RM scores are all equal" in format_report(report)
    assert build_report([], Rules())["pearson"] is None


@pytest.mark.parametrize(
    "prompt, response, rating",
    [
        ("7*8=", "56", 5),  # gold 1
        ("7*8=", "It is 56.", 5),  # 7 filler characters: gold 0.93
        ("7*8=", "Great question! It is 56.", 4),  # 23 filler: gold 0.77
        ("7*8=", "54", 2),  # wrong: gold 0
        ("7*8=", "Hmm, hard to say.", 1),  # evasion, 15 filler: gold -0.15
    ],
)
def test_gold_judge_maps_right_answers_to_4_or_5_and_the_rest_below_3(prompt, response, rating):
    assert gold_rating(gold_score(prompt, response)) == rating
    assert (rating >= 3) == is_correct(prompt, response)


def test_gold_mapping_is_linear_on_its_range():
    assert [gold_rating(g) for g in (-0.3, -0.1375, 0.025, 0.1875, 0.35, 0.5125, 0.675, 0.8375, 1.0)] == [
        1,
        2,  # 1.5 rounds half up
        2,
        3,
        3,
        4,
        4,
        5,
        5,
    ]
    assert gold_rating(-5.0) == 1 and gold_rating(5.0) == 5


# --- evaluate_policy's per-sample scores ----------------------------------------------------------------------


def test_evaluate_policy_gives_each_sample_its_own_score_and_gold(policy_dir, tokenizer):
    policy = load_causal_lm(policy_dir)
    scorer = FunctionScorer(lambda prompts, responses: [len(r) + 0.5 for r in responses], "length")
    judge = lambda prompts, responses: [gold_score(p, r) for p, r in zip(prompts, responses)]  # noqa: E731
    kwargs = dict(placement=Placement(torch.device("cpu")), scorer=scorer, judge=judge, samples_per_prompt=2)
    prompts = ["1+2=", "3*4=", "9-5="]
    result = evaluate_policy(policy, None, tokenizer, prompts, Sampling(6), **kwargs)
    samples = result["samples"]
    assert [s["prompt"] for s in samples] == ["1+2=", "1+2=", "3*4=", "3*4=", "9-5=", "9-5="]
    assert [s["rm_score"] for s in samples] == [len(s["response"]) + 0.5 for s in samples]
    assert [s["gold"] for s in samples] == [gold_score(s["prompt"], s["response"]) for s in samples]
    assert result["rm_score"] == pytest.approx(sum(s["rm_score"] for s in samples) / 6)
    assert "kl" not in result  # no reference: no KL passes
    with_reference = evaluate_policy(policy, policy, tokenizer, prompts, Sampling(6), **kwargs)
    assert with_reference["kl"] == pytest.approx(0.0, abs=1e-5) and with_reference["samples"] == samples


# --- end to end: --judge gold, --ratings, export -----------------------------------------------------------------


def test_judge_gold_on_a_demo_run(tmp_path, policy_dir, reward_dir, capsys):
    run = make_demo_run(tmp_path / "run", policy_dir, reward_dir)
    assert review(run, "--judge", "gold", "-n", 6, "--per-prompt", 2, "--seed", 3) == 0
    samples, answers = stored(run)
    prompts = [json.loads(p) for _, p, _, _ in samples]
    assert len(samples) == 6 and prompts[0::2] == prompts[1::2]  # 3 prompts, 2 responses each, side by side
    assert len(set(prompts)) == 3 and set(prompts) <= set(EVAL_PROMPTS)  # held-out prompts only
    assert all(math.isfinite(score) for *_, score in samples)
    assert answers == {i: (gold_rating(gold_score(json.loads(p), r)), "judge:gold") for i, p, r, _ in samples}
    report = json.loads((run / "review.json").read_text())
    assert report["rated"] == 6 and report["sources"] == {"judge:gold": 6}
    assert report["drawn_with"]["run_kind"] == "demo" and report["drawn_with"]["seed"] == 3
    assert report["drawn_with"]["reward_model"] == str(run / "reward" / "model")
    out = capsys.readouterr().out
    assert "6 samples: 6 rated, 0 skipped, 0 unrated (answers: 6 judge:gold)" in out
    assert "Pearson r" in out and f"report: {run / 'review.json'}" in out


def test_ratings_file_end_to_end(run, capsys):
    samples, _ = stored(run)
    scores = {i: score for i, _, _, score in samples}
    top = max(scores, key=scores.get)
    others = sorted(i for i in scores if i != top)
    answers = {i: 5 - n % 3 for n, i in enumerate(others[2:])}
    answers[top] = 1  # the highest RM score, rated low: reward hacking by the tutorial's rule
    answers[others[0]] = "skip"
    path = ratings_file(run / "ratings.jsonl", answers)
    with path.open("a") as f:  # null: the line is ignored (as --export writes unanswered samples)
        f.write(json.dumps({"id": others[1], "rating": None}) + "\n\n")
    assert review(run, "--ratings", path) == 0
    _, stored_answers = stored(run)
    assert others[1] not in stored_answers and stored_answers[others[0]] == (None, "file")
    rated = {i: r for i, r in answers.items() if r != "skip"}
    assert {i: r for i, (r, _) in stored_answers.items() if r is not None} == rated
    assert all(source == "file" for _, source in stored_answers.values())
    report = json.loads((run / "review.json").read_text())
    ids = sorted(rated)
    expected = statistics.correlation([scores[i] for i in ids], [float(rated[i]) for i in ids])
    assert report["pearson"] == pytest.approx(expected)
    assert report["rm_needs_retraining"] is (expected < 0.6)
    assert top in [s["id"] for s in report["flagged"]]
    threshold = quantile([scores[i] for i in ids], 0.5)
    assert report["rm_high_threshold"] == pytest.approx(threshold)
    assert [s["id"] for s in report["flagged"]] == sorted(
        (i for i in ids if scores[i] >= threshold and rated[i] < 3), key=lambda i: -scores[i]
    )
    out = capsys.readouterr().out
    assert f"Pearson r = {expected:+.3f}" in out and f"#{top}" in out and "possible reward hacking" in out
    assert ("the reward model needs retraining" in out) is (expected < 0.6)
    assert [s["id"] for s in rated_samples(run)] == ids
    assert rated_samples(run / "review.sqlite")[0].keys() == {"id", "prompt", "response", "rm_score", "rating"}


def test_export_then_ratings_round_trip(run, capsys):
    exported = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [e["id"] for e in exported] == list(range(1, 9)) and all(e["rating"] is None for e in exported)
    for e, rating in zip(exported, [5, 4, "skip", None, 1, 2, 3, 3]):
        e["rating"] = rating
    (run / "filled.jsonl").write_text("".join(json.dumps(e) + "\n" for e in exported))
    assert review(run, "--ratings", run / "filled.jsonl") == 0
    got = rated_samples(run)
    assert [(s["id"], s["rating"]) for s in got] == [(1, 5), (2, 4), (5, 1), (6, 2), (7, 3), (8, 3)]
    assert [s["response"] for s in got] == [exported[i - 1]["response"] for i in (1, 2, 5, 6, 7, 8)]
    assert "8 samples: 6 rated, 1 skipped, 1 unrated" in capsys.readouterr().out


def test_a_policy_that_repeats_itself_gives_distinct_samples(tmp_path, policy_dir, reward_dir, capsys):
    run = make_demo_run(tmp_path / "run", policy_dir, reward_dir)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["sampling"]["temperature"] = 1e-4  # all but greedy: the same response every time
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert review(run, "--judge", "gold", "-n", 6) == 0
    samples, _ = stored(run)
    prompts = [p for _, p, _, _ in samples]
    assert len(samples) == 6 and len(set(prompts)) == 6  # one response per prompt: 6 prompts, not 3
    (run / "review.sqlite").unlink()
    assert review(run, "--judge", "gold", "-n", 20) == 0  # 12 held-out prompts, one response each
    assert len(stored(run)[0]) == 12
    assert "the 12 prompts gave only 12 different samples" in capsys.readouterr().out


def test_ppo_run_uses_its_model_and_reward_function(tmp_path, policy_dir, capsys):
    run = make_ppo_run(tmp_path / "run", policy_dir, "tether.demo.task:gold_reward")
    prompts = write_prompts(tmp_path / "held_out.jsonl", EVAL_PROMPTS[:4])
    assert review(run, "--prompts", prompts, "--judge", "gold", "-n", 5, "--per-prompt", 2) == 0
    samples, answers = stored(run)
    assert len(samples) == 5 and len(answers) == 5  # 3 prompts x 2, cut to 5
    for _, prompt, response, score in samples:  # the reward function's score of this very sample
        assert score == pytest.approx(gold_score(json.loads(prompt), response))
    meta = json.loads((run / "review.json").read_text())["drawn_with"]
    assert meta["run_kind"] == "ppo" and meta["policy"] == str(run / "model")
    assert meta["prompts"] == str(prompts) and meta["reward_model"] == "tether.demo.task:gold_reward"


# --- resume, undo, skip ---------------------------------------------------------------------------------------------


def keys(text: str):
    it = iter(text)
    return lambda: next(it, "")


def test_rerun_keeps_the_samples_and_asks_only_the_unanswered(run, capsys):
    before, _ = stored(run)
    with ReviewStore(run / "review.sqlite") as store:
        out = io.StringIO()
        assert rate_interactively(store, store.pending(), keys("4s2q"), out) is False
    assert out.getvalue().endswith("quit: quit\n")
    assert "[1/8] sample #1" in out.getvalue() and "sample #5" not in out.getvalue()  # q at #4
    assert review(run, "--report", "-n", 50, "--seed", 9) == 0  # drawing options no longer apply
    text = capsys.readouterr().out
    assert "--num, --seed ignored" in text and "5 samples are not rated yet" in text
    after, answers = stored(run)
    assert after == before and answers == {1: (4, "human"), 2: (None, "human"), 3: (2, "human")}
    with ReviewStore(run / "review.sqlite") as store:
        assert store.pending() == [4, 5, 6, 7, 8] and store.pending(include_skipped=True) == [2, 4, 5, 6, 7, 8]
        out = io.StringIO()
        assert rate_interactively(store, store.pending(), keys("55555"), out) is True
    shown = [line for line in out.getvalue().splitlines() if line.startswith("[")]
    assert shown == ["[4/8] sample #4", "[5/8] sample #5", "[6/8] sample #6", "[7/8] sample #7", "[8/8] sample #8"]


def test_undo_goes_back_across_sessions_and_skips_are_undoable(run):
    with ReviewStore(run / "review.sqlite") as store:
        store.answer(1, 3, "human")
        store.answer(2, None, "human")  # a skip, the newest answer of an earlier session
        out = io.StringIO()
        # u: undo the skip of #2 (asked again first); 5 answers it; u u: undo that 5 and then the 3 of #1;
        # u with nothing left; then 1, 2, 3 answer #1, #2, #3
        assert rate_interactively(store, store.pending(), keys("u5uuu123q"), out) is False
        text = out.getvalue()
        assert "undo: sample #2 is unanswered again" in text and "undo: sample #1 is unanswered again" in text
        assert "(nothing to undo)" in text
        assert [(s.id, s.rating, s.skipped) for s in store.samples()[:4]] == [
            (1, 1, False),
            (2, 2, False),
            (3, 3, False),
            (4, None, False),
        ]
    shown = [line.split()[-1] for line in text.splitlines() if line.startswith("[")]
    assert shown == ["#3", "#2", "#3", "#2", "#1", "#2", "#3", "#4"]  # "nothing to undo" stays at #1


# --- the real terminal ----------------------------------------------------------------------------------------------


class Terminal:
    """`tether review ARGS` on a pseudo terminal: wait for its output, type keys."""

    def __init__(self, *args, cwd: Path):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal (stdin, stdout, stderr)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job inherits SIGINT ignored; a terminal not
            os.chdir(cwd)
            os.execv(sys.executable, [sys.executable, "-m", "tether.cli", "review", *map(str, args)])
        self.output = ""
        self.seen = 0  # where the text expected last ended

    def expect(self, text: str, timeout: float = 60.0) -> None:
        """Read until ``text`` appears after what was expected before; a hang fails the test."""
        deadline = time.monotonic() + timeout
        while text not in self.output[self.seen :]:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.kill()
                pytest.fail(f"no {text!r} within {timeout} s; the terminal shows:\n{self.output}")
            try:
                chunk = os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # EIO: the child closed the terminal
                chunk = ""
            if not chunk:
                pytest.fail(f"the program ended before {text!r}; the terminal shows:\n{self.output}")
            self.output += chunk.replace("\r\n", "\n")
        self.seen = self.output.index(text, self.seen) + len(text)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def finish(self, timeout: float = 60.0) -> int:
        """Read to the end; the exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    chunk = ""
                self.output += chunk.replace("\r\n", "\n")
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        self.kill()
        pytest.fail(f"still running after {timeout} s; the terminal shows:\n{self.output}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_rating_by_keypress_in_a_real_terminal(run):
    term = Terminal(run, cwd=ROOT)
    try:
        term.expect("[1/8] sample #1")
        assert "Prompt:" in term.output and "Response:" in term.output and "RM score:" in term.output
        term.expect("rate 1-5, s skip, u undo, q quit: ")
        term.type("5")
        term.expect("[2/8] sample #2")
        term.type("s")
        term.expect("[3/8] sample #3")
        term.type("u")  # undo the skip: #2 again
        term.expect("[2/8] sample #2")
        term.type("x3")  # an unknown key is ignored
        term.expect("[3/8] sample #3")
        term.type("q")
        assert term.finish() == 0
    finally:
        term.kill()
    assert "stopped: run the same command again to go on" in term.output
    assert "8 samples: 2 rated, 0 skipped, 6 unrated" in term.output
    _, answers = stored(run)
    assert answers == {1: (5, "human"), 2: (3, "human")}
    # a second session starts at the first unanswered sample; Ctrl-C quits like q and restores the terminal
    term = Terminal(run, "--blind", cwd=ROOT)
    try:
        term.expect("[3/8] sample #3")
        term.expect(": ")
        assert "RM score:" not in term.output.split("[3/8]")[1]  # --blind hides it
        term.type("1")
        term.expect("[4/8] sample #4")
        term.type("\x03")
        assert term.finish() == 0
        lflag = termios.tcgetattr(term.fd)[3]
        assert lflag & termios.ECHO and lflag & termios.ICANON  # cbreak mode undone
    finally:
        term.kill()
    assert "quit" in term.output and "3 rated" in term.output
    assert stored(run)[1] == {1: (5, "human"), 2: (3, "human"), 3: (1, "human")}


# --- bad input: one line naming the file, line or option ---------------------------------------------------------


def test_not_a_terminal_without_ratings_or_judge_is_one_line(run, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tether.cli", "review", str(run)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "tether: stdin is not a terminal: give the ratings with --ratings FILE or --judge gold\n"
    assert stored(run)[1] == {}


def test_not_a_terminal_before_drawing_and_nothing_left_to_ask(tmp_path, run, policy_dir, reward_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    fresh = make_demo_run(tmp_path / "fresh", policy_dir, reward_dir)
    with pytest.raises(TetherError, match="^stdin is not a terminal: give the ratings with --ratings FILE or --judge"):
        review(fresh)
    assert not (fresh / "review.sqlite").exists()  # refused before drawing anything
    ratings_file(tmp_path / "all.jsonl", {i: 3 for i in range(1, 9)})
    assert review(run, "--ratings", tmp_path / "all.jsonl") == 0
    assert review(run) == 0  # everything answered: nothing to ask, so the report needs no terminal


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": 1, "rating": 4}', '{"id": 2, "rating": 4'], ":2: not valid JSON"),
        (['{"id": 1, "rating": 7}'], ':1: rating must be 1-5, "skip" or null, got 7'),
        (['{"id": 1, "rating": true}'], ':1: rating must be 1-5, "skip" or null, got true'),
        (['{"id": 1}'], ':1: expected a JSON object {"id": N, "rating": 1-5}'),
        (['{"id": "one", "rating": 2}'], ':1: id must be a sample number, got "one"'),
        (['{"id": 1, "rating": 2}', "", '{"id": 99, "rating": 2}'], ":3: no sample 99 in "),
    ],
)
def test_bad_ratings_line_is_named_and_nothing_is_recorded(run, tmp_path, lines, message):
    path = tmp_path / "ratings.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TetherError) as error:
        review(run, "--ratings", path)
    assert str(error.value).startswith(f"{path}{message}") and "\n" not in str(error.value)
    assert stored(run)[1] == {}


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda run, p, r: None, [], "{run}: no such run folder"),
        (lambda run, p, r: run.mkdir(), ["--judge", "gold"], "{run}: not a run folder (no config.yaml)"),
        (
            lambda run, p, r: make_ppo_run(run, p, r),
            ["--judge", "gold"],
            "{run}: a tether ppo run needs held-out prompts: give --prompts FILE",
        ),
        (
            lambda run, p, r: make_ppo_run(run, p, ""),
            ["--judge", "gold"],
            "{run}/config.yaml: model.reward_model is empty; give one with --reward-model",
        ),
        (
            lambda run, p, r: (run.mkdir(), write_config(run)),
            ["--judge", "gold"],
            "{run}: no trained policy (expected model/ of tether ppo, or ppo/model/ of tether demo)",
        ),
        (lambda run, p, r: make_ppo_run(run, p, r), ["--ratings", "nope.jsonl"], "nope.jsonl: ratings file not found"),
        (lambda run, p, r: make_ppo_run(run, p, r), ["--report"], "{run}/review.sqlite: no review yet"),
        (lambda run, p, r: make_ppo_run(run, p, r), ["-n", "0"], "--num must be at least 1, got 0"),
        (
            lambda run, p, r: make_ppo_run(run, p, r),
            ["--high-quantile", "1.5"],
            "--high-quantile must be in [0, 1], got 1.5",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, policy_dir, reward_dir, setup, args, message):
    run = tmp_path / "run"
    setup(run, policy_dir, reward_dir)
    with pytest.raises(TetherError) as error:
        review(run, *args)
    assert str(error.value).startswith(message.format(run=run)) and "\n" not in str(error.value)


def test_judge_gold_refuses_prompts_of_another_task(tmp_path, policy_dir, reward_dir):
    run = make_ppo_run(tmp_path / "run", policy_dir, reward_dir)
    prompts = write_prompts(tmp_path / "p.jsonl", ["What is the capital of France?"])
    with pytest.raises(TetherError, match=r"--judge gold knows only the demo task's prompts \(like '7\*8='\)"):
        review(run, "--prompts", prompts, "--judge", "gold")
    assert not (run / "review.sqlite").exists()


def test_a_file_that_is_not_a_review_is_one_line(run):
    (run / "review.sqlite").write_text("not a database at all, just text " * 100)
    with pytest.raises(TetherError, match="review.sqlite: not a tether review file"):
        review(run, "--report")
