"""The review's SQLite file (``RUN/review.sqlite``): the drawn samples and one answer per sample, each committed
as it is given, so that quitting or a crash loses nothing and a rerun resumes with the same samples.

Tables:
- ``meta(key, value)``: how the samples were drawn (policy, reward model, prompts file, seed ...) and the schema,
  each value as JSON.
- ``samples(id, prompt, response, rm_score)``: ``prompt`` is JSON (a string or a list of messages, as the prompts
  file gave it); ``rm_score`` is the reward model's raw score (NULL when it was not finite).
- ``answers(sample_id, rating, source, seq, answered_at)``: ``rating`` 1-5, or NULL for a skipped sample;
  ``source`` is ``human``, ``file`` (``--ratings``) or ``judge:gold``; ``seq`` orders the answers, newest last
  (undo removes the newest).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from tether.errors import TetherError, first_line

STORE_NAME = "review.sqlite"
SCHEMA_VERSION = "1"
RATINGS = range(1, 6)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    rm_score REAL
);
CREATE TABLE IF NOT EXISTS answers (
    sample_id INTEGER PRIMARY KEY REFERENCES samples(id),
    rating INTEGER CHECK (rating IS NULL OR rating BETWEEN 1 AND 5),
    source TEXT NOT NULL,
    seq INTEGER NOT NULL,
    answered_at TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Sample:
    """One stored sample and its answer: ``rating`` is 1-5, or None (unanswered, or skipped when ``skipped``)."""

    id: int
    prompt: object  # a string or a list of {"role", "content"} messages
    response: str
    rm_score: float | None
    rating: int | None = None
    skipped: bool = False
    source: str | None = None

    @property
    def answered(self) -> bool:
        """True once the sample has a rating or was skipped."""
        return self.rating is not None or self.skipped


def store_path(run_or_file: str | Path) -> Path:
    """``RUN/review.sqlite`` for a run folder; a file path is returned as it is."""
    path = Path(run_or_file)
    return path / STORE_NAME if path.is_dir() else path


class ReviewStore:
    """The samples and answers of one review, in an SQLite file that every answer is committed to."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise TetherError(f"{self.path}: no review yet (run `tether review` on the run first)")
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(_SCHEMA)
            self.db.commit()
            version = self.meta().get("schema", SCHEMA_VERSION)
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            raise TetherError(f"{self.path}: not a tether review file ({first_line(e)})") from None
        if version != SCHEMA_VERSION:
            raise TetherError(f"{self.path}: review file schema {version}; this tether reads {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database (every answer is already committed)."""
        self.db.close()

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def meta(self) -> dict[str, object]:
        """How the samples were drawn, as stored with them (values as JSON gave them)."""
        return {key: json.loads(value) for key, value in self.db.execute("SELECT key, value FROM meta")}

    def has_samples(self) -> bool:
        """True once samples were drawn and stored."""
        return self.db.execute("SELECT 1 FROM samples LIMIT 1").fetchone() is not None

    def add_samples(self, samples: list[dict], meta: dict[str, object]) -> None:
        """Store ``samples`` (dicts with prompt, response, rm_score) as ids 1..N with ``meta``, in one transaction."""
        if self.has_samples():
            raise TetherError(f"{self.path}: already holds samples")
        with self.db:
            self.db.executemany(
                "INSERT INTO samples (id, prompt, response, rm_score) VALUES (?, ?, ?, ?)",
                [
                    (i, json.dumps(s["prompt"], ensure_ascii=False), s["response"], _finite(s.get("rm_score")))
                    for i, s in enumerate(samples, 1)
                ],
            )
            rows = {**meta, "schema": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rows.items()]
            )

    def samples(self) -> list[Sample]:
        """Every sample with its answer, in id order."""
        rows = self.db.execute(
            "SELECT s.id, s.prompt, s.response, s.rm_score, a.rating, a.sample_id IS NOT NULL, a.source "
            "FROM samples s LEFT JOIN answers a ON a.sample_id = s.id ORDER BY s.id"
        )
        return [
            Sample(i, json.loads(p), r, score, rating, bool(answered) and rating is None, source)
            for i, p, r, score, rating, answered, source in rows
        ]

    def sample(self, sample_id: int) -> Sample:
        """One sample by id (KeyError if there is none)."""
        for s in self.samples():
            if s.id == sample_id:
                return s
        raise KeyError(sample_id)

    def ids(self) -> set[int]:
        """The ids of the stored samples."""
        return {i for (i,) in self.db.execute("SELECT id FROM samples")}

    def answer(self, sample_id: int, rating: int | None, source: str) -> None:
        """Record (and commit) a rating 1-5, or a skip (``rating=None``), replacing any earlier answer."""
        if rating is not None and rating not in RATINGS:
            raise ValueError(f"rating must be 1-5, got {rating}")
        with self.db:
            self._write(sample_id, rating, source)

    def answer_many(self, answers: list[tuple[int, int | None]], source: str) -> None:
        """Record several answers (rating 1-5 or None for a skip) in one transaction."""
        with self.db:
            for sample_id, rating in answers:
                self._write(sample_id, rating, source)

    def _write(self, sample_id: int, rating: int | None, source: str) -> None:
        (seq,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM answers").fetchone()
        self.db.execute(
            "INSERT OR REPLACE INTO answers (sample_id, rating, source, seq, answered_at) VALUES (?, ?, ?, ?, ?)",
            (sample_id, rating, source, seq, time.strftime("%Y-%m-%dT%H:%M:%S")),
        )

    def undo(self) -> int | None:
        """Remove (and commit) the newest answer; returns its sample id, or None when there is none."""
        row = self.db.execute("SELECT sample_id FROM answers ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return None
        with self.db:
            self.db.execute("DELETE FROM answers WHERE sample_id = ?", row)
        return row[0]

    def pending(self, include_skipped: bool = False) -> list[int]:
        """Ids still to ask, in id order: unanswered ones (and skipped ones with ``include_skipped``)."""
        return [s.id for s in self.samples() if not s.answered or (include_skipped and s.skipped)]


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def rated_samples(run_or_file: str | Path) -> list[dict]:
    """The rated samples of a review as ``{"id", "prompt", "response", "rm_score", "rating"}`` dicts, in id order.

    ``run_or_file`` is the run folder or its ``review.sqlite``. Skipped and unrated samples are left out; ``prompt``
    is as the prompts file gave it (a string or a list of messages). Several samples share each prompt (``tether
    review --per-prompt``), so pairs of differently rated responses to one prompt can become preference pairs.
    """
    with ReviewStore(store_path(run_or_file), create=False) as store:
        return [
            {"id": s.id, "prompt": s.prompt, "response": s.response, "rm_score": s.rm_score, "rating": s.rating}
            for s in store.samples()
            if s.rating is not None
        ]
