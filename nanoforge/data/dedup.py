"""Deduplication: exact (hash of normalized text) and near (MinHash + LSH + connected components).

    drops = ExactDeduplicator().duplicates(docs)            # {dropped id: kept id}
    drops = near_duplicates(docs)                           # in memory, {dropped id: kept id}

    # out of core, the shape large pipelines use (each phase reads only what the previous one wrote):
    compute_signatures("runs/x/03-extract", work)           # 1: per shard, signature rows split by band
    find_edges(work)                                        # 2: per band, buckets -> candidate edges
    drops = cluster(work)                                   # 3: union-find over all edges
    filter_shards("runs/x/03-extract", drops, out)          # 4: rewrite the shards without the drops

Choices, documented because they change what is dropped:
- Normalization: NFKC, lowercase, punctuation and symbols removed (`[^\\w\\s]`, which also removes lone
  surrogates), whitespace collapsed. Shingles are word 5-grams; a document of 1-4 words is one shingle
  (so it only matches the same text), a document with no words is never indexed for near-dup (exact
  dedup still groups those).
- Only the first `max_chars` characters (default 1,000,000) are shingled, so a 100 MB document costs
  as much as a 1 MB one; two huge documents sharing that prefix are judged on it. Exact dedup hashes
  the whole text, streamed in chunks.
- Which document a cluster keeps: the smallest id (string order), so the result does not depend on the
  order of documents or shards. Ids are assumed unique.
- Candidates are verified: an LSH edge counts only if the estimated Jaccard (fraction of equal
  signature slots) is >= `threshold` (default 0.8). Verification is against the bucket's smallest-id
  member first, then greedily against the other verified representatives of that bucket, so a chain
  A~B~C still forms one cluster through union-find even where A and C are not similar.
- Signatures come from the compiled `nanoforge.data.minhash.MinHasher` (datasketch's "legacy"
  permutation scheme over our 32-bit shingle hash; bit-identical to datasketch given that hash).
- Index size: the signature rows are the index, 4 bytes x num_perm per document (448 B at 112);
  band keys are recomputed in phase 2 rather than stored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanoforge.artifacts import atomic_write_json
from nanoforge.data.documents import Document, iter_documents, list_document_files, write_document_shards
from nanoforge.data.minhash import EMPTY, MinHasher, estimated_jaccard, normalize_words
from nanoforge.errors import NanoforgeError

EXACT_DUPLICATE = "exact-duplicate"
NEAR_DUPLICATE = "near-duplicate"

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) for combining a band's rows


def _text_chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    """`text` in pieces of about `size` characters, cut at whitespace so no word is split."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        while end < len(text) and not text[end].isspace():
            end += 1
        yield text[start:end]
        start = end


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: spreads the polynomial's bits before we keep the top 32."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


# ---- exact dedup ----------------------------------------------------------------------------------------


def exact_key(text: str) -> bytes:
    """16-byte hash of the normalized text, streamed in chunks so a 100 MB document needs no copy of it."""
    h = hashlib.blake2b(digest_size=16)
    for chunk in _text_chunks(text):
        for w in normalize_words(chunk):
            h.update(w.encode("utf-8", "surrogatepass") + b" ")
    return h.digest()


class ExactDeduplicator:
    """Groups documents whose normalized text is identical; each group keeps its smallest id."""

    reason = EXACT_DUPLICATE

    def duplicates(self, docs: Iterable[Document]) -> dict[str, str]:
        """{dropped id: kept id}; independent of the order of `docs`."""
        return drops_by_key((exact_key(d.text), d.id) for d in docs)


def drops_by_key(keyed: Iterable[tuple[bytes, str]]) -> dict[str, str]:
    """{dropped id: kept id} over (key, id) pairs: documents with equal keys keep the smallest id."""
    groups: dict[bytes, list[str]] = {}
    for key, doc_id in keyed:
        groups.setdefault(key, []).append(doc_id)
    drops = {}
    for ids in groups.values():
        kept = min(ids)
        drops.update({i: kept for i in ids if i != kept})
    return drops


# ---- near dedup: LSH, shared by the in-memory and the partitioned paths --------------------------------


@dataclass(frozen=True)
class LSHConfig:
    num_perm: int = 112
    ngram: int = 5
    seed: int = 1
    bands: int = 14
    rows: int = 8
    threshold: float = 0.8  # verify candidate pairs by estimated Jaccard; 0 turns verification off
    max_chars: int = 1_000_000

    def __post_init__(self) -> None:
        if self.bands * self.rows != self.num_perm:
            raise NanoforgeError(f"LSH: bands x rows = {self.bands * self.rows}, expected num_perm {self.num_perm}")

    def hasher(self) -> MinHasher:
        return MinHasher(self.num_perm, self.ngram, self.seed, self.max_chars)


def _band_keys(rows: np.ndarray) -> np.ndarray:
    """(N, r) uint32 band rows -> (N,) uint64 bucket keys."""
    key = np.zeros(len(rows), dtype=np.uint64)
    for j in range(rows.shape[1]):
        key ^= rows[:, j].astype(np.uint64)
        key *= _MIX
    return _fmix64(key)


def _band_edges(rows: np.ndarray, rank: np.ndarray, valid: np.ndarray, gather, threshold: float) -> np.ndarray:
    """Edges (E, 2) of global doc indices from one band: members of a bucket joined to a representative.

    `rank` orders documents by id, so the star centre (the representative) is the smallest id;
    `gather(idx)` returns full signatures for verification.
    """
    idx = np.flatnonzero(valid)
    keys = _band_keys(rows[idx])
    order = np.lexsort((rank[idx], keys))
    keys, idx = keys[order], idx[order]
    same = np.zeros(len(keys), dtype=bool)
    same[1:] = keys[1:] == keys[:-1]
    if not same.any():
        return np.zeros((0, 2), dtype=np.int64)
    pos = np.arange(len(keys))
    start = np.maximum.accumulate(np.where(same, 0, pos))  # position of each bucket's first member
    members = np.flatnonzero(same)
    edges = np.stack([idx[start[members]], idx[members]], axis=1)
    if threshold <= 0:
        return edges
    ok = estimated_jaccard(gather(edges[:, 0]), gather(edges[:, 1])) >= threshold
    good = [edges[ok]]
    # a member unlike its bucket's first may still be like another member: greedy representatives
    for b_start in np.unique(start[members[~ok]]):
        b_end = b_start + 1
        while b_end < len(keys) and same[b_end]:
            b_end += 1
        bucket = idx[b_start:b_end]
        sigs = gather(bucket)
        reps: list[int] = [0]
        for m in range(1, len(bucket)):
            sims = estimated_jaccard(sigs[reps], sigs[m])
            hit = np.flatnonzero(sims >= threshold)
            if len(hit):
                good.append(np.array([[bucket[reps[hit[0]]], bucket[m]]], dtype=np.int64))
            else:
                reps.append(m)
    return np.concatenate(good).astype(np.int64)


def _components(n: int, edges: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each doc, the index of the smallest-id doc of its connected component (union-find)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for u, v in edges.tolist():
        ru, rv = find(u), find(v)
        if ru != rv:  # the root is always the smaller-ranked doc, so it ends up the one kept
            if rank[ru] < rank[rv]:
                parent[rv] = ru
            else:
                parent[ru] = rv
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def _drops(ids: Sequence[str], roots: np.ndarray) -> dict[str, str]:
    return {ids[i]: ids[r] for i, r in enumerate(roots.tolist()) if r != i}


def _id_rank(ids: Sequence[str]) -> np.ndarray:
    rank = np.empty(len(ids), dtype=np.int64)
    rank[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return rank


def near_duplicates(docs: Iterable[Document], cfg: LSHConfig | None = None) -> dict[str, str]:
    """In memory: {dropped id: kept id} for every near-duplicate cluster (the smallest id is kept)."""
    cfg = cfg or LSHConfig()
    docs = list(docs)
    ids = [d.id for d in docs]
    sig = cfg.hasher().signatures(d.text for d in docs)
    valid = (sig[:, :cfg.rows] != EMPTY).any(axis=1)  # documents with no words are not indexed
    rank = _id_rank(ids)
    edges = [_band_edges(sig[:, b * cfg.rows:(b + 1) * cfg.rows], rank, valid, lambda i: sig[i], cfg.threshold)
             for b in range(cfg.bands)]
    return _drops(ids, _components(len(ids), np.concatenate([np.zeros((0, 2), np.int64), *edges]), rank))


# ---- near dedup, partitioned (out of core) -------------------------------------------------------------


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)


def begin_signatures(work: Path | str, cfg: LSHConfig, shards: int) -> None:
    """Phase 1 set-up: record the LSH settings and the shard count that phases 2 and 3 read back."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "config.json", {**cfg.__dict__, "shards": shards})


def write_shard_signatures(work: Path | str, shard: int, ids: Sequence[str], sig: np.ndarray, cfg: LSHConfig,
                           ) -> None:
    """Phase 1 output of one shard: `ids-SSSSS.json` and `band-BB/sig-SSSSS.npy` ((n, rows) uint32 each).

    Shards are independent, so this runs inside each shard's task (any process, any machine that sees
    `work`); a band's rows are contiguous on disk so phase 2 reads one band of every shard at a time.
    """
    work = Path(work)
    for b in range(cfg.bands):
        (work / f"band-{b:02d}").mkdir(parents=True, exist_ok=True)
        _atomic_save(work / f"band-{b:02d}" / f"sig-{shard:05d}.npy",
                     np.ascontiguousarray(sig[:, b * cfg.rows:(b + 1) * cfg.rows]))
    atomic_write_json(work / f"ids-{shard:05d}.json", list(ids))


def compute_signatures(docs: Path | str, work: Path | str, cfg: LSHConfig | None = None) -> dict[str, int]:
    """Phase 1 over every document file of `docs`, one shard per file, in this process."""
    cfg = cfg or LSHConfig()
    hasher = cfg.hasher()
    files = list_document_files(docs)
    begin_signatures(work, cfg, len(files))
    n_docs = 0
    for s, f in enumerate(files):
        shard = list(iter_documents(f, root=docs))  # the ids a whole read of `docs` gives
        write_shard_signatures(work, s, [d.id for d in shard], hasher.signatures(d.text for d in shard), cfg)
        n_docs += len(shard)
    return {"documents": n_docs, "shards": len(files), "index_bytes": n_docs * cfg.num_perm * 4}


def _load_work(work: Path) -> tuple[LSHConfig, list[str], np.ndarray]:
    try:
        meta = json.loads((work / "config.json").read_text())
    except (OSError, ValueError):
        raise NanoforgeError(f"{work}: no signatures here (run compute_signatures first)") from None
    shards = meta.pop("shards")
    ids: list[str] = []
    sizes = []
    for s in range(shards):
        part = json.loads((work / f"ids-{s:05d}.json").read_text())
        ids += part
        sizes.append(len(part))
    return LSHConfig(**meta), ids, np.cumsum([0, *sizes])


def _gatherer(work: Path, cfg: LSHConfig, offsets: np.ndarray):
    """gather(idx) -> full signatures of those global indices, read from the band files by memmap."""
    maps = [[np.load(work / f"band-{b:02d}" / f"sig-{s:05d}.npy", mmap_mode="r") for b in range(cfg.bands)]
            for s in range(len(offsets) - 1)]

    def gather(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), cfg.num_perm), dtype=np.uint32)
        shard = np.searchsorted(offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            local = idx[sel] - offsets[s]
            out[sel] = np.concatenate([m[local] for m in maps[s]], axis=1)
        return out

    return gather


def find_edges(work: Path | str, exclude: Collection[str] = ()) -> int:
    """Phase 2: per band, merge the shards' band rows into buckets and write `edges-BB.npy`; total edges.

    Documents in `exclude` (already dropped by an earlier step) are not indexed, so they join no cluster.
    """
    work = Path(work)
    cfg, ids, offsets = _load_work(work)
    excluded = np.array([i in exclude for i in ids], dtype=bool) if exclude else np.zeros(len(ids), dtype=bool)
    rank = _id_rank(ids)
    gather = _gatherer(work, cfg, offsets)
    total = 0
    valid = np.zeros(0, dtype=bool)
    for b in range(cfg.bands):
        parts = [np.load(work / f"band-{b:02d}" / f"sig-{s:05d}.npy") for s in range(len(offsets) - 1)]
        rows = np.concatenate(parts) if parts else np.zeros((0, cfg.rows), np.uint32)
        if b == 0:  # an empty document is all 0xFFFFFFFF; band 0 says so for every band (as in memory)
            valid = (rows != EMPTY).any(axis=1) & ~excluded
        edges = _band_edges(rows, rank, valid, gather, cfg.threshold)
        _atomic_save(work / f"edges-{b:02d}.npy", edges)
        total += len(edges)
    return total


def cluster(work: Path | str) -> dict[str, str]:
    """Phase 3: union-find over the edges of all bands -> {dropped id: kept id}."""
    work = Path(work)
    cfg, ids, _ = _load_work(work)
    edges = [np.load(work / f"edges-{b:02d}.npy") for b in range(cfg.bands)]
    rank = _id_rank(ids)
    return _drops(ids, _components(len(ids), np.concatenate([np.zeros((0, 2), np.int64), *edges]), rank))


def filter_shards(docs: Path | str, drops: dict[str, str], out: Path | str, reason: str = NEAR_DUPLICATE,
                  ) -> dict[str, int]:
    """Phase 4: write the kept documents to `out`, the dropped ones (with reason, duplicate_of) to `out/removed`."""
    out = Path(out)
    removed: list[Document] = []

    def kept() -> Iterator[Document]:
        for d in iter_documents(docs):
            if d.id in drops:
                removed.append(Document(d.id, d.text, d.url, d.source,
                                        {**d.meta, "reason": reason, "duplicate_of": drops[d.id]}))
            else:
                yield d

    counts = write_document_shards(kept(), out)
    if (out / "removed").exists():
        shutil.rmtree(out / "removed")
    write_document_shards(removed, out / "removed", meta_columns=("reason", "duplicate_of"))
    return {"kept": counts["documents"], "removed": len(removed)}


def near_duplicates_partitioned(docs: Path | str, work: Path | str, cfg: LSHConfig | None = None,
                                ) -> dict[str, str]:
    """Phases 1-3 through `work` on disk: the same answer as `near_duplicates` on the same documents."""
    compute_signatures(docs, work, cfg)
    find_edges(work)
    return cluster(work)
