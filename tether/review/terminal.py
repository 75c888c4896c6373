"""The rating loop in a terminal: one sample at a time, one keypress per answer (1-5 rate, s skip, u undo, q quit).

Keys are read unbuffered and unechoed (the terminal's cbreak mode) and the terminal's settings are restored on the
way out, also on Ctrl-C, which quits like ``q``. Every answer is committed to the store before the next sample is
shown, so quitting (or a crash, or a closed terminal) keeps every answer given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tether.review.store import ReviewStore, Sample

KEYS_HELP = "rate 1-5, s skip, u undo, q quit"
QUIT_KEYS = {"q", "Q", "\x03", "\x04", ""}  # q, Ctrl-C and Ctrl-D as raw bytes, end of input


@contextmanager
def single_keys(fd: int) -> Iterator[Callable[[], str]]:
    """A function reading one key from the terminal ``fd`` without waiting for Enter or echoing it; the terminal's
    settings are restored on exit."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)  # no line buffering, no echo; output processing (newlines) and Ctrl-C stay as they were
        yield lambda: os.read(fd, 1).decode("latin-1")
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def show_sample(sample: Sample, position: int, total: int, show_score: bool = True) -> str:
    """A sample as the tutorial prints it: progress, prompt, response and (unless hidden) the RM score."""
    prompt = sample.prompt if isinstance(sample.prompt, str) else sample.prompt[-1]["content"]
    score = "(none)" if sample.rm_score is None else f"{sample.rm_score:+.3f}"
    lines = [
        f"\n[{position}/{total}] sample #{sample.id}",
        _labelled("Prompt", prompt),
        _labelled("Response", sample.response if sample.response.strip() else "(empty)"),
    ]
    if show_score:
        lines.append(_labelled("RM score", score))
    return "\n".join(lines) + f"\n{KEYS_HELP}: "


def _labelled(label: str, text: str) -> str:
    """``Label:   first line`` with the following lines indented under it."""
    head = f"{label + ':':<10}"
    return head + text.replace("\n", "\n" + " " * len(head))


def rate_interactively(
    store: ReviewStore, queue: list[int], read_key: Callable[[], str], out: TextIO = sys.stdout, show_score=True
) -> bool:
    """Ask for an answer to each sample of ``queue`` in turn, committing each; True when the queue was finished,
    False when the rater quit (q, Ctrl-C, Ctrl-D or the end of input)."""
    queue = list(queue)
    total = len(store.ids())
    try:
        while queue:
            sample = store.sample(queue[0])
            out.write(show_sample(sample, total - len(queue) + 1, total, show_score))
            out.flush()
            action, undone = _one_answer(store, sample.id, read_key, out)
            if action == "quit":
                return False
            queue.pop(0)
            if action == "undo":  # the undone sample comes back first, then this one again
                queue = [undone, sample.id] + [i for i in queue if i != undone]
    except KeyboardInterrupt:  # Ctrl-C where the terminal turns it into SIGINT: quit, keeping every answer
        out.write("quit\n")
        return False
    return True


def _one_answer(
    store: ReviewStore, sample_id: int, read_key: Callable[[], str], out: TextIO
) -> tuple[str, int | None]:
    """Read keys until one decides: ("answered", None), ("undo", id of the sample undone) or ("quit", None)."""
    while True:
        key = read_key()
        if key and key in "12345":
            store.answer(sample_id, int(key), "human")
            out.write(f"{key}\n")
            return "answered", None
        if key in ("s", "S"):
            store.answer(sample_id, None, "human")
            out.write("skipped\n")
            return "answered", None
        if key in ("u", "U"):
            undone = store.undo()
            if undone is None:
                out.write("(nothing to undo) ")
                out.flush()
                continue
            out.write(f"undo: sample #{undone} is unanswered again\n")
            return "undo", undone
        if key in QUIT_KEYS:
            out.write("quit\n")
            return "quit", None
