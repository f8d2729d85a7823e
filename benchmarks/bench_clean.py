"""End-to-end `nanoforge clean` throughput per core: documents/s and MB/s through the default chain.

    python benchmarks/bench_clean.py            # the pydoc corpus of the whole stdlib (≈ 4 MB, 200 documents)
    python benchmarks/bench_clean.py --quick    # 30 modules

The corpus is pydoc's plain text, repeated `--copies` times with distinct ids (the copies are exact
duplicates, so the dedup steps have work too). One process, so the figure is per core. Prints the rate and
the share of documents each step removed; appends one JSON line to bench-results/bench_clean.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from nanoforge.data.clean import CleanConfig, clean
from nanoforge.data.documents import iter_documents, write_document_shards
from nanoforge.data.pydoc_corpus import CorpusConfig, build_corpus

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 modules, one copy")
    parser.add_argument("--copies", type=int, default=2, help="times the corpus is repeated (exact duplicates)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench-results" / "bench_clean.jsonl")
    args = parser.parse_args()
    copies = 1 if args.quick else args.copies
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_corpus(CorpusConfig(max_modules=30 if args.quick else None), tmp / "pydoc")
        docs = list(iter_documents(tmp / "pydoc"))
        copies_docs = [replace(d, id=f"{d.id}#{c}") for c in range(copies) for d in docs]
        (tmp / "in").mkdir()
        write_document_shards(copies_docs, tmp / "in")
        t0 = time.perf_counter()
        m = clean(CleanConfig(workers=1), tmp / "in", tmp / "out")
        seconds = time.perf_counter() - t0
    f = m["figures"]
    result = {"bench": "clean", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "documents": f["documents_in"], "mb": f["bytes_in"] / 1e6, "seconds": round(seconds, 2),
              "docs_per_s_per_core": f["documents_in"] / seconds, "mb_per_s_per_core": f["bytes_in"] / 1e6 / seconds,
              "documents_out": f["documents_out"], "removed_by_reason": f["removed_by_reason"], "quick": args.quick}
    print(f"clean (default chain, 1 process): {result['documents']} documents, {result['mb']:.1f} MB in "
          f"{seconds:.1f} s: {result['docs_per_s_per_core']:.1f} docs/s, "
          f"{result['mb_per_s_per_core']:.2f} MB/s per core")
    print(f"kept {f['documents_out']}; removed: " + ", ".join(f"{k} {v}" for k, v in f["removed_by_reason"].items()))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":  # the stage's worker processes import this file; only the parent runs it
    main()
