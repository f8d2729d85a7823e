"""MinHash signature speed: ours (`nanoforge.data.dedup.MinHasher`) vs `datasketch.MinHash`, same run.

    python benchmarks/bench_dedup.py              # 4000 documents of ~2.5 KB
    python benchmarks/bench_dedup.py --quick      # 500 documents, a few seconds

Documents are ~2.5 KB of random words from a 20k-word vocabulary with Zipf-like frequencies. Both sides
use the same shingling (normalized word 5-grams) and the same permutations (`MinHasher.permutations`,
datasketch `scheme="legacy"`); bit-identity of the signatures is checked on a few documents with
datasketch given our shingle hash. datasketch is timed with its default sha1 hashfunc (its own speed)
through `update_batch` (its fastest CPU call) and through per-shingle `update`; the shingling of its
input (`shingles()`) is timed as part of its work, since ours includes the same normalization.
Appends one JSON line to bench-results/bench_dedup.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import datasketch
import numpy as np

from nanoforge.data.dedup import LSHConfig, MinHasher, shingles

ROOT = Path(__file__).resolve().parents[1]


def make_docs(n: int, seed: int = 0, doc_bytes: int = 2500) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(20_000)]
    weights = [1 / (r + 1) for r in range(len(vocab))]
    docs = []
    for _ in range(n):
        words: list[str] = []
        size = 0
        while size < doc_bytes:
            words += rng.choices(vocab, weights, k=64)
            size = sum(len(w) + 1 for w in words)
        text = " ".join(words)[:doc_bytes]
        docs.append(text[0].upper() + text[1:] + ".")
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 500 if args.quick else args.docs
    docs = make_docs(n)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    mh = MinHasher()

    # warm-up (word cache, numpy) on a disjoint slice, then time
    mh.signatures(make_docs(50, seed=1))
    t0 = time.perf_counter()
    sig = mh.signatures(docs)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for d in docs:
        mh.shingle_hashes(d)
    ours_shingle_s = time.perf_counter() - t0

    for i in range(3):  # same permutations + our shingle hash -> the same signature, bit for bit
        m = datasketch.MinHash(num_perm=112, scheme="legacy", permutations=mh.permutations, hashfunc=mh.shingle_hash)
        m.update_batch([s.encode() for s in shingles(docs[i])])
        assert m.hashvalues.astype(np.uint32).tolist() == sig[i].tolist(), "signatures differ from datasketch"

    n_peer = min(n, 1000)
    t0 = time.perf_counter()
    for d in docs[:n_peer]:
        m = datasketch.MinHash(num_perm=112, scheme="legacy", permutations=mh.permutations)
        m.update_batch([s.encode() for s in shingles(d)])
    batch_s = (time.perf_counter() - t0) * n / n_peer
    n_upd = min(n, 200)
    t0 = time.perf_counter()
    for d in docs[:n_upd]:
        m = datasketch.MinHash(num_perm=112, scheme="legacy", permutations=mh.permutations)
        for s in shingles(d):
            m.update(s.encode())
    update_s = (time.perf_counter() - t0) * n / n_upd

    cfg = LSHConfig()
    index_bytes = cfg.num_perm * np.dtype(np.uint32).itemsize
    res = {
        "bench": "dedup", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(),
        "python": platform.python_version(), "datasketch": datasketch.__version__, "docs": n, "mb": round(mb, 3),
        "num_perm": cfg.num_perm, "bands": cfg.bands, "rows": cfg.rows,
        "ours_docs_s": round(n / ours_s, 1), "ours_mb_s": round(mb / ours_s, 2),
        "ours_shingle_hash_share": round(ours_shingle_s / ours_s, 3),
        "datasketch_batch_docs_s": round(n / batch_s, 1), "datasketch_batch_mb_s": round(mb / batch_s, 2),
        "datasketch_update_docs_s": round(n / update_s, 1), "datasketch_update_mb_s": round(mb / update_s, 2),
        "ratio_vs_update_batch": round(batch_s / ours_s, 2), "ratio_vs_update": round(update_s / ours_s, 2),
        "index_bytes_per_doc": index_bytes, "quick": args.quick,
    }
    print(f"{n} docs, {mb:.2f} MB, {cfg.num_perm} perms ({cfg.bands} bands x {cfg.rows} rows)")
    print(f"ours                      {res['ours_docs_s']:>9.0f} docs/s {res['ours_mb_s']:>7.2f} MB/s "
          f"(shingle hashing {100 * res['ours_shingle_hash_share']:.0f}% of it, the rest permutations)")
    print(f"datasketch update_batch   {res['datasketch_batch_docs_s']:>9.0f} docs/s "
          f"{res['datasketch_batch_mb_s']:>7.2f} MB/s   ours/peer {res['ratio_vs_update_batch']:.2f}x")
    print(f"datasketch update         {res['datasketch_update_docs_s']:>9.0f} docs/s "
          f"{res['datasketch_update_mb_s']:>7.2f} MB/s   ours/peer {res['ratio_vs_update']:.2f}x")
    print(f"index bytes per document  {index_bytes} (uint32 signature rows; band keys recomputed, not stored)")
    out = ROOT / "bench-results" / "bench_dedup.jsonl"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
