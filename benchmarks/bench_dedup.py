"""MinHash signature speed: ours (`nanoforge.data.minhash.MinHasher`, numba) vs `datasketch.MinHash`, same run.

    python benchmarks/bench_dedup.py              # 4000 documents of ~2.5 KB
    python benchmarks/bench_dedup.py --quick      # 500 documents, a few seconds

Documents are ~2.5 KB of random words from a 20k-word vocabulary with Zipf-like frequencies (ASCII, the
kernel's direct path); the same documents with every "e" made "é" time the path of non-ASCII text (NFKC and
lowercasing in Python first). Both sides use the same shingling (normalized word 5-grams) and the same
permutations (`MinHasher.permutations`, datasketch `scheme="legacy"`); bit-identity of the signatures is
checked on a few documents with datasketch given our shingle hash. datasketch is timed with its default sha1
hashfunc (its own speed) through `update_batch` (its fastest CPU call) and through per-shingle `update`; the
shingling of its input (`shingles()`) is timed as part of its work, since ours includes the same
normalization. Every time is CPU seconds of this single-threaded process, best of 3 runs, so that other work
on a shared machine does not count. numba's compile time is measured the same way in a fresh process with an
empty cache, and kept out of the timings by a warm-up.
Appends one JSON line to bench-results/bench_dedup.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasketch
import numba
import numpy as np

from nanoforge.data.dedup import LSHConfig
from nanoforge.data.minhash import MinHasher, shingles

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


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` runs of fn, in CPU seconds of this process."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def cold_compile_seconds() -> float:
    """CPU seconds a fresh process spends on its first `signatures` call with an empty numba cache (the compile)."""
    code = ("import time; from nanoforge.data.minhash import MinHasher; m = MinHasher(); t = time.process_time(); "
            "m.signatures(['warm up the kernel', 'ünïcode too']); print(time.process_time() - t)")
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NUMBA_CACHE_DIR": cache},
                             capture_output=True, text=True, check=True)
    return float(out.stdout)


def datasketch_batch(docs: list[str], perms: tuple[np.ndarray, np.ndarray]) -> None:
    for d in docs:
        m = datasketch.MinHash(num_perm=len(perms[0]), scheme="legacy", permutations=perms)
        m.update_batch([s.encode() for s in shingles(d)])


def datasketch_update(docs: list[str], perms: tuple[np.ndarray, np.ndarray]) -> None:
    for d in docs:
        m = datasketch.MinHash(num_perm=len(perms[0]), scheme="legacy", permutations=perms)
        for s in shingles(d):
            m.update(s.encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 500 if args.quick else args.docs
    docs = make_docs(n)
    docs_u = [d.replace("e", "é") for d in docs]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    mb_u = sum(len(d.encode()) for d in docs_u) / 1e6
    cfg = LSHConfig()
    mh = MinHasher(cfg.num_perm, cfg.ngram, cfg.seed, cfg.max_chars)

    compile_s = cold_compile_seconds()
    t0 = time.process_time()  # warm-up: compile, or load from numba's cache, before anything is timed
    mh.signatures(make_docs(20, seed=1) + ["ünïcode warm-up"])
    first_call_s = time.process_time() - t0

    sig = mh.signatures(docs)
    ours_s = best_seconds(lambda: mh.signatures(docs))
    ours_u_s = best_seconds(lambda: mh.signatures(docs_u))
    one_perm = MinHasher(1, cfg.ngram, cfg.seed, cfg.max_chars)
    one_perm.signatures(docs[:2])
    hash_s = best_seconds(lambda: one_perm.signatures(docs))  # all but the permutations

    for i in range(3):  # same permutations + our shingle hash -> the same signature, bit for bit
        for text, row in ((docs[i], sig[i]), (docs_u[i], mh.signatures([docs_u[i]])[0])):
            m = datasketch.MinHash(num_perm=cfg.num_perm, scheme="legacy", permutations=mh.permutations,
                                   hashfunc=mh.shingle_hash)
            m.update_batch([s.encode() for s in shingles(text)])
            assert m.hashvalues.astype(np.uint32).tolist() == row.tolist(), "signatures differ from datasketch"

    n_peer = min(n, 1000)
    batch_s = best_seconds(lambda: datasketch_batch(docs[:n_peer], mh.permutations)) * n / n_peer
    n_upd = min(n, 200)
    update_s = best_seconds(lambda: datasketch_update(docs[:n_upd], mh.permutations)) * n / n_upd

    index_bytes = cfg.num_perm * np.dtype(np.uint32).itemsize
    res = {
        "bench": "dedup", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(),
        "python": platform.python_version(), "datasketch": datasketch.__version__, "numba": numba.__version__,
        "docs": n, "mb": round(mb, 3), "num_perm": cfg.num_perm, "bands": cfg.bands, "rows": cfg.rows,
        "ours_docs_s": round(n / ours_s, 1), "ours_mb_s": round(mb / ours_s, 2),
        "ours_shingle_hash_share": round(hash_s / ours_s, 3),
        "ours_non_ascii_docs_s": round(n / ours_u_s, 1), "ours_non_ascii_mb_s": round(mb_u / ours_u_s, 2),
        "compile_s": round(compile_s, 2), "first_call_s": round(first_call_s, 2),
        "datasketch_batch_docs_s": round(n / batch_s, 1), "datasketch_batch_mb_s": round(mb / batch_s, 2),
        "datasketch_update_docs_s": round(n / update_s, 1), "datasketch_update_mb_s": round(mb / update_s, 2),
        "ratio_vs_update_batch": round(batch_s / ours_s, 2), "ratio_vs_update": round(update_s / ours_s, 2),
        "index_bytes_per_doc": index_bytes, "quick": args.quick, "timer": "process_time, best of 3",
    }
    print(f"{n} docs, {mb:.2f} MB, {cfg.num_perm} perms ({cfg.bands} bands x {cfg.rows} rows), one core, CPU time")
    print(f"ours                      {res['ours_docs_s']:>9.0f} docs/s {res['ours_mb_s']:>7.2f} MB/s "
          f"(splitting + shingle hashing {100 * res['ours_shingle_hash_share']:.0f}% of it, the rest permutations)")
    print(f"ours, non-ASCII text      {res['ours_non_ascii_docs_s']:>9.0f} docs/s "
          f"{res['ours_non_ascii_mb_s']:>7.2f} MB/s (every e made é: NFKC + lowercase in Python first)")
    print(f"datasketch update_batch   {res['datasketch_batch_docs_s']:>9.0f} docs/s "
          f"{res['datasketch_batch_mb_s']:>7.2f} MB/s   ours/peer {res['ratio_vs_update_batch']:.2f}x")
    print(f"datasketch update         {res['datasketch_update_docs_s']:>9.0f} docs/s "
          f"{res['datasketch_update_mb_s']:>7.2f} MB/s   ours/peer {res['ratio_vs_update']:.2f}x")
    print(f"numba compile             {compile_s:.2f} CPU s in a fresh process with an empty cache "
          f"(first call here {first_call_s:.2f} s: compile or cache load; not in the timings)")
    print(f"index bytes per document  {index_bytes} (uint32 signature rows; band keys recomputed, not stored)")
    out = ROOT / "bench-results" / "bench_dedup.jsonl"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
