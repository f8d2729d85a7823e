"""Encoding speed: the `nanoforge tokenize` stage vs HF `tokenizers` `encode_batch`, same text, same run.

    python benchmarks/bench_tokenize.py            # ~24 MB of pydoc text
    python benchmarks/bench_tokenize.py --mb 100
    python benchmarks/bench_tokenize.py --quick    # ~2 MB, a few seconds (tests/CI)

The corpus is the pydoc text of the standard library's modules, repeated up to --mb, written as
Parquet. A byte-level BPE is trained on it (up to 8 MB of it), then:

- ours: the whole `tokenize` stage (read Parquet, check tiktoken against tokenizers on the first
  documents, encode in one process per core, write the shards), timed end to end;
- peer: `tokenizers.Tokenizer.encode_batch` (Rust, all cores) on the same texts already in memory;
  also shown: its `encode_batch_fast` (no character offsets), the quickest call tokenizers has.

Both must give the same ids (checked). Prints both rates and the ratio, and appends one JSON line to
bench-results/bench_tokenize.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import pydoc
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import tokenizers

from nanoforge.data.documents import Document, write_document_shards
from nanoforge.tokenizer import TokenizerConfig, train_tokenizer
from nanoforge.tokens import TokenizeConfig, tokenize

ROOT = Path(__file__).resolve().parents[1]
# modules whose import opens windows or browsers, prints, or needs a display
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__", "__phello__"}


def pydoc_texts(max_modules: int | None) -> list[tuple[str, str]]:
    """(module name, its pydoc text) for importable stdlib modules, in name order."""
    out = []
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    for name in names[:max_modules]:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        except Exception:  # not importable on this platform/build: skip it
            continue
        out.append((name, text))
    return out


def build_corpus(target_bytes: int, max_modules: int | None, out: Path) -> list[str]:
    """Write ≥ `target_bytes` of pydoc documents as Parquet into `out`; returns the texts in order."""
    unique = pydoc_texts(max_modules)
    texts, docs, size, rep = [], [], 0, 0
    while size < target_bytes:
        for name, text in unique:
            docs.append(Document(f"{name}#{rep}", text, "", "pydoc"))
            texts.append(text)
            size += len(text.encode("utf-8"))
        rep += 1
    write_document_shards(docs, out)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=24.0, help="megabytes of text to encode")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument("--quick", action="store_true", help="~2 MB from 40 modules, vocab 2048, one run")
    parser.add_argument("--results", type=Path, default=ROOT / "bench-results" / "bench_tokenize.jsonl")
    args = parser.parse_args()
    mb, vocab, max_modules = (2.0, 2048, 40) if args.quick else (args.mb, args.vocab_size, None)
    if args.quick:
        args.repeat = 1

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        t0 = time.perf_counter()
        texts = build_corpus(int(mb * 1e6), max_modules, tmp / "docs")
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        print(f"corpus: {len(texts)} documents, {n_bytes / 1e6:.1f} MB of pydoc text "
              f"({time.perf_counter() - t0:.1f} s to build)")
        train_tokenizer(TokenizerConfig(vocab_size=vocab, max_train_bytes=8 << 20), tmp / "docs", tmp / "tok")

        # peer: tokenizers' batch encoder on the texts already in memory
        hf = tokenizers.Tokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
        hf.encode_special_tokens = True  # as ours: "<|bos|>" inside text is text
        ours_s, peer_s, peer_fast_s = [], [], []
        for _ in range(args.repeat):  # interleaved, best of each: the machine may be shared
            # ours: the stage end to end; no val split, so the shards are the corpus in order (id check)
            t1 = time.perf_counter()
            ours = tokenize(TokenizeConfig(val_fraction=0.0), tmp / "docs", tmp / "tok", tmp / "tokens")
            ours_s.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            encoded = hf.encode_batch(texts, add_special_tokens=False)
            peer_s.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            hf.encode_batch_fast(texts, add_special_tokens=False)
            peer_fast_s.append(time.perf_counter() - t1)
        figures = ours["figures"]
        shard = np.concatenate([np.fromfile(p, dtype=figures["dtype"])
                                for p in sorted((tmp / "tokens").glob("train-*.bin"))])
        expected = np.concatenate([np.array([0, *e.ids], dtype=shard.dtype) for e in encoded])

    same = bool(np.array_equal(shard, expected))
    ours_mb_s, peer_mb_s = n_bytes / 1e6 / min(ours_s), n_bytes / 1e6 / min(peer_s)
    peer_fast_mb_s = n_bytes / 1e6 / min(peer_fast_s)
    ratio = ours_mb_s / peer_mb_s
    print(f"ours  nanoforge tokenize ({figures['encoder']}, {figures['workers']} processes, end to end): "
          f"{ours_mb_s:.1f} MB/s")
    print(f"peer  tokenizers {tokenizers.__version__} encode_batch (in memory): {peer_mb_s:.1f} MB/s")
    print(f"      tokenizers encode_batch_fast (in memory): {peer_fast_mb_s:.1f} MB/s "
          f"(ours {ours_mb_s / peer_fast_mb_s:.2f}x)")
    print(f"ratio {ratio:.2f}x vs encode_batch (target ≥ 2x); ids identical: {same}")
    result = {
        "bench": "tokenize", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mb": round(n_bytes / 1e6, 2), "documents": len(texts), "vocab_size": vocab, "quick": args.quick,
        "repeat": args.repeat, "ours_mb_s": round(ours_mb_s, 3), "ours_encoder": figures["encoder"],
        "ours_workers": figures["workers"], "peer_mb_s": round(peer_mb_s, 3),
        "peer_fast_mb_s": round(peer_fast_mb_s, 3), "ratio": round(ratio, 3), "ids_identical": same,
        "cpus": os.cpu_count(), "python": platform.python_version(), "tokenizers": tokenizers.__version__,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    if not same:
        raise SystemExit("error: the stage's ids differ from tokenizers' ids")


if __name__ == "__main__":  # the stage's worker processes import this file; only the parent runs it
    main()
