"""The labelling database: one SQLite file in WAL mode holding the items, the annotators and every judgement.

    store = FeedbackStore("labels.sqlite")
    store.add_annotator("ada", token)                       # only a SHA-256 of the token is stored
    item = store.next_item(annotator)                       # an item this annotator has not seen, sides drawn
    store.record(annotator, item["item_id"], "A", "clearer")  # the judgement, once (a second one: Conflict)

Tables (see SCHEMA): `items` (a prompt, its optional reference answer, two responses and the sampling
settings of each), `annotators` (name, token hash, simulated or human), `assignments` (which item was
shown to whom, which response was on the left as "A", when) and `judgements` (the choice as shown — A, B,
tie or skip — the side order, the preferred response in canonical terms 0/1, the reason, the seconds
between showing and answering, whether a simulated annotator made it). `UNIQUE(annotator_id, item_id)` and
the assignment that must precede a judgement are what make concurrent annotators safe: every write is
one `BEGIN IMMEDIATE` transaction, so two requests can never both take the last slot, a retried
submission is refused (409) instead of counted twice, and an answer that was acknowledged is committed.
WAL lets readers (the stats page, an export) run while annotators write; `synchronous=NORMAL` keeps each
commit safe from a crash of the server process (only a power loss may drop the last few).
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from nanoforge.errors import NanoforgeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    simulated INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,           -- JSON list of chat messages
    reference TEXT,                 -- a reference answer, when the prompt file gives one
    response_0 TEXT NOT NULL,
    response_1 TEXT NOT NULL,
    sampling_0 TEXT NOT NULL,       -- JSON: model, temperature, top_k, top_p, max_new_tokens, seed, row
    sampling_1 TEXT NOT NULL,
    assigned INTEGER NOT NULL DEFAULT 0,   -- assignments so far (items are served least-assigned first)
    created REAL NOT NULL,
    UNIQUE (prompt, sampling_0, sampling_1)
);
CREATE INDEX IF NOT EXISTS items_by_assigned ON items (assigned, id);
CREATE TABLE IF NOT EXISTS assignments (
    annotator_id INTEGER NOT NULL REFERENCES annotators (id),
    item_id INTEGER NOT NULL REFERENCES items (id),
    left_response INTEGER NOT NULL CHECK (left_response IN (0, 1)),   -- the response shown as "A"
    shown_at REAL NOT NULL,
    PRIMARY KEY (annotator_id, item_id)
);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY,
    annotator_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')),   -- as the annotator saw the sides
    left_response INTEGER NOT NULL CHECK (left_response IN (0, 1)),
    preferred INTEGER CHECK (preferred IN (0, 1)),   -- the preferred response; NULL for tie and skip
    reason TEXT,
    seconds REAL NOT NULL,
    simulated INTEGER NOT NULL,
    created REAL NOT NULL,
    UNIQUE (annotator_id, item_id),
    FOREIGN KEY (annotator_id, item_id) REFERENCES assignments (annotator_id, item_id)
);
"""
CHOICES = ("A", "B", "tie", "skip")
MAX_REASON = 2000


class Conflict(NanoforgeError):
    """The annotator already judged this item (a resubmission): nothing was written."""


class NotAssigned(NanoforgeError):
    """The item was never shown to this annotator (or does not exist): nothing was written."""


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    simulated: bool


@dataclass
class Item:
    """One prompt and the two responses an annotator compares, with how each was sampled."""

    prompt: list[dict[str, str]]
    responses: tuple[str, str]
    sampling: tuple[dict[str, Any], dict[str, Any]]
    reference: str | None = None


def token_hash(token: str) -> str:
    """Tokens are long random strings, so a plain SHA-256 suffices (no slow password hash is needed).

    Any string has a hash: a header that is not UTF-8 arrives with lone surrogates (aiohttp decodes with
    surrogateescape), which `surrogatepass` encodes where a plain `.encode()` would raise; a UTF-8 token
    hashes as before."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class FeedbackStore:
    """The database behind `nanoforge label`. One instance per thread (sqlite3 connections are not shared)."""

    def __init__(self, path: Path | str, *, seed: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise NanoforgeError(f"{self.path}: not a usable labelling database ({e})") from None
        self.rng = random.Random(seed)

    def close(self) -> None:
        self.db.close()

    def _write(self) -> _Transaction:
        return _Transaction(self.db)

    # --- items and annotators -------------------------------------------------------------------

    def add_items(self, items: Iterable[Item]) -> int:
        """Insert items (an item already present, same prompt and sampling, is kept); returns the count added."""
        now = time.time()
        rows = [(json.dumps(it.prompt), it.reference, it.responses[0], it.responses[1],
                 json.dumps(it.sampling[0], sort_keys=True), json.dumps(it.sampling[1], sort_keys=True), now)
                for it in items]
        with self._write():
            before = self.db.total_changes
            self.db.executemany("INSERT OR IGNORE INTO items (prompt, reference, response_0, response_1, sampling_0, "
                                "sampling_1, created) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            return self.db.total_changes - before

    def add_annotator(self, name: str, token: str, *, simulated: bool = False) -> Annotator:
        """Register `name` with `token` (replacing its previous token)."""
        if not name.strip() or len(token) < 8:
            raise NanoforgeError(f"annotator {name!r}: needs a name and a token of at least 8 characters")
        with self._write():
            try:
                self.db.execute("INSERT INTO annotators (name, token_sha256, simulated, created) VALUES (?, ?, ?, ?) "
                                "ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256, "
                                "simulated = excluded.simulated",
                                (name, token_hash(token), int(simulated), time.time()))
            except sqlite3.IntegrityError:
                raise NanoforgeError(f"annotator {name!r}: this token is already another annotator's") from None
        row = self.db.execute("SELECT id, name, simulated FROM annotators WHERE name = ?", (name,)).fetchone()
        return Annotator(row[0], row[1], bool(row[2]))

    def annotator(self, token: str) -> Annotator | None:
        """The annotator whose token this is, or None."""
        row = self.db.execute("SELECT id, name, simulated FROM annotators WHERE token_sha256 = ?",
                              (token_hash(token),)).fetchone()
        return None if row is None else Annotator(row[0], row[1], bool(row[2]))

    # --- serving and recording ------------------------------------------------------------------

    def next_item(self, who: Annotator) -> dict[str, Any] | None:
        """The item to show `who` next, sides as shown, or None when they have judged every item.

        An item shown but not yet answered is shown again (a reloaded page loses nothing); otherwise a new
        assignment goes to one of the least-assigned items `who` has not seen, with a random side order."""
        with self._write():
            row = self.db.execute(
                "SELECT a.item_id, a.left_response FROM assignments a WHERE a.annotator_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM judgements j WHERE j.annotator_id = a.annotator_id AND j.item_id = a.item_id) "
                "ORDER BY a.shown_at DESC LIMIT 1", (who.id,)).fetchone()
            if row is not None:
                item_id, left = row
                self.db.execute("UPDATE assignments SET shown_at = ? WHERE annotator_id = ? AND item_id = ?",
                                (time.time(), who.id, item_id))
            else:
                candidates = self.db.execute(
                    "SELECT id, assigned FROM items WHERE id NOT IN (SELECT item_id FROM assignments WHERE "
                    "annotator_id = ?) ORDER BY assigned, id LIMIT 64", (who.id,)).fetchall()
                if not candidates:
                    return None
                least = [i for i, n in candidates if n == candidates[0][1]]
                item_id, left = self.rng.choice(least), self.rng.randrange(2)
                self.db.execute("INSERT INTO assignments (annotator_id, item_id, left_response, shown_at) "
                                "VALUES (?, ?, ?, ?)", (who.id, item_id, left, time.time()))
                self.db.execute("UPDATE items SET assigned = assigned + 1 WHERE id = ?", (item_id,))
            prompt, reference, r0, r1 = self.db.execute(
                "SELECT prompt, reference, response_0, response_1 FROM items WHERE id = ?", (item_id,)).fetchone()
        responses = (r0, r1)
        return {"item_id": item_id, "prompt": json.loads(prompt), "reference": reference,
                "A": responses[left], "B": responses[1 - left]}

    def record(self, who: Annotator, item_id: int, choice: str, reason: str | None = None) -> int:
        """Store `who`'s judgement of `item_id` (choice as shown: A, B, tie or skip); returns its id."""
        if choice not in CHOICES:
            raise NanoforgeError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if not -(2**63) <= item_id < 2**63:  # beyond SQLite's INTEGER: sqlite3 would raise OverflowError
            raise NanoforgeError(f"item_id must be a 64-bit integer, got one of {item_id.bit_length()} bits")
        reason = (reason or "").strip()[:MAX_REASON] or None
        with self._write():
            row = self.db.execute("SELECT left_response, shown_at FROM assignments WHERE annotator_id = ? AND "
                                  "item_id = ?", (who.id, item_id)).fetchone()
            if row is None:
                raise NotAssigned(f"item {item_id} was not shown to {who.name}")
            left, shown_at = row
            preferred = left if choice == "A" else 1 - left if choice == "B" else None
            now = time.time()
            try:
                cur = self.db.execute(
                    "INSERT INTO judgements (annotator_id, item_id, choice, left_response, preferred, reason, seconds, "
                    "simulated, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (who.id, item_id, choice, left, preferred, reason, max(0.0, now - shown_at), int(who.simulated),
                     now))
            except sqlite3.IntegrityError:
                raise Conflict(f"{who.name} already judged item {item_id}") from None
            return int(cur.lastrowid)

    # --- reading --------------------------------------------------------------------------------

    def judgements(self) -> list[dict[str, Any]]:
        """Every judgement with its annotator's name, in the order they were made."""
        cur = self.db.execute(
            "SELECT j.id, n.name, j.item_id, j.choice, j.left_response, j.preferred, j.reason, j.seconds, "
            "j.simulated, j.created FROM judgements j JOIN annotators n ON n.id = j.annotator_id ORDER BY j.id")
        keys = ("id", "annotator", "item_id", "choice", "left_response", "preferred", "reason", "seconds",
                "simulated", "created")
        return [dict(zip(keys, row, strict=True)) for row in cur]

    def items(self) -> dict[int, dict[str, Any]]:
        cur = self.db.execute("SELECT id, prompt, reference, response_0, response_1, sampling_0, sampling_1 FROM items")
        return {i: {"prompt": json.loads(p), "reference": ref, "responses": (r0, r1),
                    "sampling": (json.loads(s0), json.loads(s1))} for i, p, ref, r0, r1, s0, s1 in cur}

    def count_items(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def stats(self) -> dict[str, Any]:
        """Progress, per-annotator counts and inter-annotator agreement (see `agreement`)."""
        n_items = self.count_items()
        rows = self.judgements()
        judged = {r["item_id"] for r in rows if r["choice"] != "skip"}
        per: dict[str, dict[str, Any]] = {}
        names = self.db.execute("SELECT name, simulated FROM annotators ORDER BY name").fetchall()
        for name, simulated in names:
            per[name] = {"name": name, "simulated": bool(simulated), "judgements": 0, "A": 0, "B": 0, "tie": 0,
                         "skip": 0, "seconds": 0.0}
        for r in rows:
            p = per[r["annotator"]]
            p["judgements"] += 1
            p[r["choice"]] += 1
            p["seconds"] += r["seconds"]
        for p in per.values():
            p["mean_seconds"] = p.pop("seconds") / p["judgements"] if p["judgements"] else None
        return {"items": n_items, "items_judged": len(judged), "progress": len(judged) / n_items if n_items else 0.0,
                "judgements": len(rows), "simulated_judgements": sum(r["simulated"] for r in rows),
                "choices": dict(Counter(r["choice"] for r in rows)), "annotators": list(per.values()),
                "agreement": agreement(rows)}


class _Transaction:
    """`BEGIN IMMEDIATE` … `COMMIT` (or `ROLLBACK` on an exception): the write lock is taken up front, so
    concurrent writers queue (busy timeout) instead of failing half-way."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type | None, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


# ---------------------------------------------------------------------------------------------------
# agreement


def label_of(judgement: dict[str, Any]) -> str | None:
    """A judgement in canonical terms: "0" or "1" (the preferred response), "tie", or None for a skip."""
    if judgement["choice"] == "skip":
        return None
    return "tie" if judgement["preferred"] is None else str(judgement["preferred"])


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's κ = (p_o − p_e) / (1 − p_e) of (rater 1 label, rater 2 label) pairs: p_o the observed agreement,
    p_e = Σ_k p1(k)·p2(k) the agreement expected from each rater's label frequencies. None when undefined
    (no pairs, or both raters always give one and the same label)."""
    n = len(pairs)
    if not n:
        return None
    p_o = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    p_e = sum(first[k] * second[k] for k in first) / n**2
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def agreement(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Agreement on items judged (not skipped) by two or more annotators: for every two annotators who
    judged the same item, their labels (0, 1 or tie, in canonical response terms, so side order does not
    matter) form a pair. Reported per annotator pair and pooled over all of them: percent agreement and
    Cohen's κ (the pair's first rater is the alphabetically first name)."""
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    for r in rows:
        label = label_of(r)
        if label is not None:
            by_item[r["item_id"]][r["annotator"]] = label
    tallies: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for labels in by_item.values():
        for a, b in combinations(sorted(labels), 2):
            tallies[a, b].append((labels[a], labels[b]))
    pooled = [pair for t in tallies.values() for pair in t]

    def summary(pairs: list[tuple[str, str]]) -> dict[str, Any]:
        n = len(pairs)
        return {"pairs": n, "percent_agreement": 100 * sum(a == b for a, b in pairs) / n if n else None,
                "kappa": cohen_kappa(pairs)}

    return {"items": sum(len(v) >= 2 for v in by_item.values()), **summary(pooled),
            "by_pair": [{"annotators": list(k), **summary(t)} for k, t in sorted(tallies.items())]}
