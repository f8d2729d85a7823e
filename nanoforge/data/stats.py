"""The `stats` stage: how big is the corpus, and how big would it have to be?

    nanoforge stats runs/demo/03-extract --tokenizer runs/demo/04-tokenizer --target-tokens 30e12

Counts documents, bytes, words and tokens (with the tokenizer when one is given, else estimated at 4
bytes per token), measures bytes per token, and projects a token budget to text volume: a frontier
corpus of 30 trillion tokens at 4 bytes per token is 120 TB (decimal), that is about 109 TiB, the
"109 terabytes" usually quoted. Writes `stats.json` and a manifest; prints a table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nanoforge.artifacts import atomic_dir, atomic_write_json, write_manifest
from nanoforge.data.documents import iter_documents
from nanoforge.errors import NanoforgeError

ASSUMED_BYTES_PER_TOKEN = 4.0  # the rule of thumb for English text with a GPT-style tokenizer
TB, TIB = 1e12, float(1 << 40)


@dataclass
class StatsConfig:
    target_tokens: float = 30e12  # the token budget to project (Llama-4-scale by default)
    batch_docs: int = 256  # documents encoded per tokenizer call


def _projection(tokens: float, bytes_per_token: float) -> dict[str, float]:
    size = tokens * bytes_per_token
    return {"bytes_per_token": bytes_per_token, "bytes": size, "tb": size / TB, "tib": size / TIB}


def corpus_stats(cfg: StatsConfig, docs: Path, out: Path, tokenizer: Path | None = None) -> dict[str, Any]:
    """Measure the documents in `docs` (optionally tokenizing them) and write `stats.json` to `out`."""
    if cfg.target_tokens <= 0:
        raise NanoforgeError(f"stats: target_tokens must be positive, got {cfg.target_tokens}")
    t0 = time.time()
    tok = None
    if tokenizer is not None:
        from nanoforge.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer)
    counts = {"documents": 0, "empty_documents": 0, "bytes": 0, "chars": 0, "words": 0, "tokens": 0}
    batch: list[str] = []

    def flush() -> None:
        if tok is not None and batch:
            counts["tokens"] += sum(len(ids) for ids in tok.encode_batch(batch))
        batch.clear()

    for doc in tqdm(iter_documents(docs), desc="stats", unit="doc", dynamic_ncols=True):
        if not doc.text.strip():
            counts["empty_documents"] += 1
            continue
        counts["documents"] += 1
        counts["bytes"] += len(doc.text.encode("utf-8"))
        counts["chars"] += len(doc.text)
        counts["words"] += len(doc.text.split())
        batch.append(doc.text)
        if len(batch) >= cfg.batch_docs:
            flush()
    flush()
    if counts["documents"] == 0:
        raise NanoforgeError(f"{docs}: the corpus is empty (no document has any text)")
    measured = tok is not None
    if not measured:
        counts["tokens"] = round(counts["bytes"] / ASSUMED_BYTES_PER_TOKEN)
    bpt = counts["bytes"] / max(1, counts["tokens"])
    stats = {
        **counts,
        "tokens_measured": measured,
        "bytes_per_token": bpt,
        "words_per_document": counts["words"] / counts["documents"],
        "target_tokens": cfg.target_tokens,
        "projection_measured": _projection(cfg.target_tokens, bpt),
        "projection_4_bytes_per_token": _projection(cfg.target_tokens, ASSUMED_BYTES_PER_TOKEN),
        "corpus_share_of_target": counts["tokens"] / cfg.target_tokens,
        "seconds": round(time.time() - t0, 2),
    }
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "stats.json", stats)
        inputs = {"docs": docs, **({"tokenizer": tokenizer} if tokenizer is not None else {})}
        manifest = write_manifest(tmp, stage="stats", config=cfg, inputs=inputs, figures=stats)
    return manifest


def stats_table(stats: dict[str, Any]) -> str:
    """The figures as a small table for the terminal."""
    how = "counted with the tokenizer" if stats["tokens_measured"] else "estimated at 4 bytes/token"
    pm, p4 = stats["projection_measured"], stats["projection_4_bytes_per_token"]
    rows = [
        ("documents", f"{stats['documents']:,}"
         + (f" (+{stats['empty_documents']} empty skipped)" if stats["empty_documents"] else "")),
        ("bytes", f"{stats['bytes']:,} ({stats['bytes'] / 1e6:.2f} MB)"),
        ("words", f"{stats['words']:,} ({stats['words_per_document']:.0f} per document)"),
        ("tokens", f"{stats['tokens']:,} ({how})"),
        ("bytes / token", f"{stats['bytes_per_token']:.3f}"),
        (f"{stats['target_tokens']:.3g} tokens at {pm['bytes_per_token']:.2f} B/token",
         f"{pm['tb']:,.1f} TB = {pm['tib']:,.1f} TiB"),
        (f"{stats['target_tokens']:.3g} tokens at 4 B/token", f"{p4['tb']:,.1f} TB = {p4['tib']:,.1f} TiB"),
        ("this corpus is", f"{stats['corpus_share_of_target']:.3g} of that budget"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
