"""`nanoforge label export`: the judgements of a labelling database as TRL preference pairs (JSONL).

    nanoforge label export --db labels.sqlite --out prefs.jsonl [--annotators all|human|simulated]

One line per item with a clear majority, in TRL's conversational preference format:

    {"prompt": [{"role": "user", "content": …}], "chosen": [{"role": "assistant", "content": …}],
     "rejected": [{"role": "assistant", "content": …}], "margin": 1.0}

Votes are counted in canonical terms (response 0 or 1, whatever side each annotator saw it on); skips do
not count. Ties are never pairs of their own: an item whose votes for the two responses are even (a single
tie vote, 1–1, …) is dropped, and tie votes on a decided item lower its margin, which is
(votes for the chosen − votes for the rejected) / (all its votes, ties included): 1.0 when everyone agreed,
1/3 for a 2–1 split. TRL's RewardTrainer reads a `margin` column, and `nanoforge reward --set
margin_scale=…` uses it the same way (−log σ(r_c − r_r − margin_scale·margin)).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from nanoforge.artifacts import atomic_write_text
from nanoforge.errors import NanoforgeError
from nanoforge.feedback.store import FeedbackStore, label_of

WHO = ("all", "human", "simulated")


def preference_rows(store: FeedbackStore, who: str = "all") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The pairs and counts (items voted on, decided, dropped as even)."""
    if who not in WHO:
        raise NanoforgeError(f"export: annotators must be one of {', '.join(WHO)}, got {who!r}")
    votes: dict[int, dict[str, int]] = defaultdict(lambda: {"0": 0, "1": 0, "tie": 0})
    for j in store.judgements():
        label = label_of(j)
        if label is None or (who == "human" and j["simulated"]) or (who == "simulated" and not j["simulated"]):
            continue
        votes[j["item_id"]][label] += 1
    items = store.items()
    rows, even = [], 0
    for item_id in sorted(votes):
        v = votes[item_id]
        if v["0"] == v["1"]:
            even += 1
            continue
        win = 0 if v["0"] > v["1"] else 1
        item = items[item_id]
        rows.append({"prompt": item["prompt"],
                     "chosen": [{"role": "assistant", "content": item["responses"][win]}],
                     "rejected": [{"role": "assistant", "content": item["responses"][1 - win]}],
                     "margin": abs(v["0"] - v["1"]) / (v["0"] + v["1"] + v["tie"])})
    return rows, {"items_voted": len(votes), "pairs": len(rows), "dropped_even": even}


def export_preferences(db: Path | str, out: Path | str, who: str = "all") -> dict[str, int]:
    """Write the pairs of `db` to `out` (atomically); returns the counts."""
    db = Path(db)
    if not db.is_file():
        raise NanoforgeError(f"{db}: no such labelling database")
    store = FeedbackStore(db)
    try:
        rows, counts = preference_rows(store, who)
    finally:
        store.close()
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return counts
