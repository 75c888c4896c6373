"""What a person sees: one live bar per phase on a terminal, plain metric lines elsewhere, one summary per phase."""

import io
import json
import re
import sys

import pytest

from tether.cli import run
from tether.tracking import MetricLogger, read_metrics
from tether.trainers.common import Shown, progress

SUMMARY = re.compile(r"^sft: 20 steps in [\d.]+ s, loss [\d.]+ -> [\d.]+, token accuracy [\d.]+$")


class Terminal(io.StringIO):
    """A fake terminal: ``isatty()`` is True; used as both stdout and stderr, as in a shell."""

    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """The non-blank lines a terminal shows after ``text``: ``\\r`` returns to the line's start, later characters
    overwrite earlier ones (so a message printed mid-bar would show up mangled)."""
    assert "\x1b" not in text, "no cursor movement expected"
    lines, col = [[]], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        else:
            line = lines[-1]
            line[col : col + 1] = [ch]
            col += 1
    return [shown for shown in ("".join(line).rstrip() for line in lines) if shown]


@pytest.fixture
def sft_args(tmp_path):
    """`tether sft` on a fresh tiny model: 20 steps, rows logged at steps 0, 10, 19, a line every 10 steps."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(12)))
    return [
        "sft",
        "model.policy=tiny",
        f"sft.data={data}",
        "sft.steps=20",
        "sft.batch_size=4",
        "sft.warmup_steps=2",
        "logging.print_every=10",
        f"output_dir={tmp_path / 'run'}",
    ]


def test_not_a_terminal_prints_plain_metric_lines(monkeypatch, sft_args, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert run(sft_args) == 0
    text = out.getvalue()
    assert "\r" not in text + err.getvalue() and "\x1b" not in text + err.getvalue()
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 0", "step 10"]
    assert lines[0] == f"run folder: {tmp_path / 'run'}"
    assert sum(bool(SUMMARY.match(line)) for line in lines) == 1, lines
    assert lines[-1] == f"model: {tmp_path / 'run' / 'model'}"
    assert [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl")] == [0, 10, 19]


def test_terminal_shows_one_bar_and_a_summary(monkeypatch, sft_args, tmp_path):
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    assert run(sft_args) == 0
    text = term.getvalue()
    assert "sft:" in text and "it/s" in text  # the bar was drawn
    assert "step 0:" not in text and "step 10:" not in text  # no metric lines fighting it
    shown = screen(text)
    assert shown[0] == f"run folder: {tmp_path / 'run'}"
    assert SUMMARY.match(shown[1]), shown
    assert shown[2:] == [f"model: {tmp_path / 'run' / 'model'}"]
    assert [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl")] == [0, 10, 19]  # unchanged


def test_bar_carries_the_key_metrics_and_messages_go_above_it(monkeypatch, tmp_path):
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    shown = [Shown("reward/score", "score", "score", trend=True), Shown("kl/ref", "kl", "KL")]
    bar = progress(4, "ppo", initial=1, shown=shown, unit="iterations")
    with MetricLogger(tmp_path, print_every=1, display=bar) as logger, bar:
        for i in range(1, 3):
            logger.log({"reward/score": 0.5 * i, "kl/ref": 0.25 * i, "policy/entropy": 1.0}, i)
            bar.update(1)
            bar.bar.refresh()
            if i == 1:
                bar.echo("guard at iteration 2: restored step_000000")
            assert bar.bar.postfix == f"score={0.5 * i:.3g} kl={0.25 * i:.3g}"
    assert "step 1:" not in term.getvalue()
    lines = screen(term.getvalue())
    assert lines[0] == "guard at iteration 2: restored step_000000"
    assert re.fullmatch(r"ppo: iterations 1-3 of 4 in [\d.]+ s, score 0.5 -> 1, KL 0.5", lines[1]), lines
    assert len(lines) == 2
    assert [r["reward/score"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.5, 1.0]


def test_no_summary_when_the_phase_fails(monkeypatch):
    lines = []
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with pytest.raises(KeyboardInterrupt):
        with progress(10, "sft", echo=lines.append) as bar:
            bar.update(3)
            raise KeyboardInterrupt
    with progress(10, "sft", echo=lines.append) as bar:
        bar.update(10)
    assert len(lines) == 1 and lines[0].startswith("sft: 10 steps in ")


def test_ppo_on_a_terminal(monkeypatch, tmp_path, tiny_ppo_args):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(8)))
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    args = [*tiny_ppo_args, "logging.print_every=1", f"ppo.prompts={tmp_path / 'prompts.jsonl'}"]
    assert run(["ppo", *args, f"output_dir={tmp_path / 'run'}"]) == 0
    shown = screen(term.getvalue())
    assert "step 1:" not in term.getvalue()
    summaries = [line for line in shown if line.startswith("ppo: ")]
    assert len(summaries) == 1 and re.match(
        r"ppo: 2 iterations in .*, score \S+ -> \S+, KL to reference \S+$", summaries[0]
    )
    assert shown == [f"run folder: {tmp_path / 'run'}", summaries[0], f"model: {tmp_path / 'run' / 'model'}"]
