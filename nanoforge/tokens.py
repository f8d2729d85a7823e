"""Documents → token shards with a train/val split, and the stateful, rank-aware batch loader.

    nanoforge tokenize docs/ --tokenizer tok/ --out tokens/
    loader = TokenLoader("tokens/", "train", batch_size=8, seq_len=512, rank=0, world_size=1)
    x, y = loader.next_batch()  # (B, T) int64 each; y is x shifted left by one token

Shard format (read with `np.memmap`): `train-00000.bin`, …, `val-00000.bin`, … are flat little-endian
uint16 token streams (uint32 when the vocabulary exceeds 65536 ids). Each document is `<|bos|>` then its
tokens; a shard holds whole documents and is closed when the next one would pass `shard_tokens` (a
longer document gets a shard of its own). Beside each shard, `train-00000.idx.npy` holds the int64
start offsets of its documents. `manifest.json` records the dtype, vocabulary and counts.

Split: a document goes to val when `doc_fraction(text_key(text), seed) < val_fraction`, so the split
depends on the document's text, not on its id (one fetch), the order or the other documents. With
`val_fraction > 0` and two or more documents each split gets at least one: while one split is still
empty, the other holds back its document nearest the boundary; that one is written a little out of
corpus order, or crosses over at the end if the empty split stayed empty. Otherwise documents are
written in corpus order.

Encoding runs in a process pool over chunks of documents, consumed in submission order, so the shards
are byte-identical for any number of workers. It uses tiktoken when the tokenizer's own check and a
check on the first `verify_docs` documents of this corpus (their first 8 K characters: a prefix is text
too, and the check runs at `tokenizers`' speed) both give `tokenizers`' exact ids.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from nanoforge.artifacts import atomic_dir, read_manifest, write_manifest
from nanoforge.data.documents import Document, iter_documents, list_document_files
from nanoforge.errors import NanoforgeError
from nanoforge.tokenizer import Tokenizer, doc_fraction, text_key

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val")
_VERIFY_CHARS = 8192  # of each document checked for the fast path


@dataclass
class TokenizeConfig:
    """How `nanoforge tokenize` encodes and splits a corpus."""

    val_fraction: float = 0.01  # share of documents (by id hash) in the val split
    shard_tokens: int = 1 << 26  # tokens per shard, at most (128 MB of uint16)
    workers: int = 0  # encoding processes; 0 = one per CPU core
    chunk_bytes: int = 1 << 20  # text per task handed to a worker
    verify_docs: int = 64  # leading documents on which tiktoken must match tokenizers
    seed: int = 0  # picks the val documents


@dataclass(frozen=True)
class TokenShardInfo:
    """What a reader of the shards needs from their manifest."""

    dtype: np.dtype
    vocab_size: int
    bos_id: int
    tokenizer: str  # the tokenizer directory the shards were encoded with


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32; always little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def read_token_manifest(path: Path | str) -> TokenShardInfo:
    """dtype, vocabulary size, bos id and tokenizer of a token-shard directory."""
    manifest = read_manifest(path)
    if manifest is None or manifest.get("stage") != "tokens":
        raise NanoforgeError(f"{path}: not a token-shard directory "
                             f"(no manifest.json from `nanoforge tokenize`)")
    f = manifest["figures"]
    return TokenShardInfo(dtype=np.dtype(f["dtype"]).newbyteorder("<"), vocab_size=int(f["vocab_size"]),
                          bos_id=int(f["bos_id"]),
                          tokenizer=manifest.get("inputs", {}).get("tokenizer", {}).get("path", ""))


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class _Chunk:
    keys: list[str]  # text_key of each document: its side of the split
    texts: list[str]
    nbytes: list[int]
    read: int  # documents read from the corpus for this chunk, empty ones included (for the progress bar)


def _chunks(docs: Iterable[Document], chunk_bytes: int) -> Iterator[_Chunk]:
    """Consecutive non-empty documents, about `chunk_bytes` of text per chunk."""
    chunk, size = _Chunk([], [], [], 0), 0
    for doc in docs:
        chunk.read += 1
        if not doc.text.strip():
            continue
        n = len(doc.text.encode("utf-8"))
        chunk.keys.append(text_key(doc.text))
        chunk.texts.append(doc.text)
        chunk.nbytes.append(n)
        size += n
        if size >= chunk_bytes:
            yield chunk
            chunk, size = _Chunk([], [], [], 0), 0
    if chunk.read:
        yield chunk


def _encode(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every text as `<|bos|>` + its ids, concatenated, and each document's length in tokens."""
    encoded = tok.encode_batch(texts)
    lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for ids, n in zip(encoded, lengths, strict=True):
        flat[pos] = tok.bos_id
        flat[pos + 1 : pos + n] = ids
        pos += n
    return flat, lengths


_worker: tuple[Tokenizer, np.dtype] | None = None  # this worker process's tokenizer and shard dtype


def _worker_init(tok: Tokenizer, dtype: np.dtype) -> None:
    global _worker
    # every process already has its own core: a fallback to tokenizers must not add threads on top
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = (tok, dtype)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker is not None, "worker used before _worker_init"
    return _encode(_worker[0], texts, _worker[1])


class _Encoders:
    """Worker processes that encode chunks in order (inline when there is one worker).

    The processes start when this is created, so they boot while the parent checks the fast path.
    """

    def __init__(self, tok: Tokenizer, dtype: np.dtype, workers: int) -> None:
        self.tok, self.dtype, self.workers = tok, dtype, workers
        self._pool = self._start()

    def _start(self) -> Any:
        if self.workers <= 1:
            return None
        # spawn, not fork: the parent may hold threads (tokenizers' pool, torch) that a fork would break
        ctx = multiprocessing.get_context("spawn")
        return ctx.Pool(self.workers, initializer=_worker_init, initargs=(self.tok, self.dtype))

    def restart(self) -> None:
        """New processes with the tokenizer as it is now (they were handed a fast path since refused)."""
        self.close()
        self._pool = self._start()

    def map(self, chunks: Iterable[_Chunk]) -> Iterator[tuple[_Chunk, np.ndarray, np.ndarray]]:
        """(chunk, tokens, lengths) for every chunk, in chunk order."""
        if self._pool is None:
            for chunk in chunks:
                yield chunk, *_encode(self.tok, chunk.texts, self.dtype)
            return
        pending: deque[tuple[_Chunk, Any]] = deque()
        for chunk in chunks:
            pending.append((chunk, self._pool.apply_async(_worker_encode, (chunk.texts,))))
            if len(pending) >= 2 * self.workers:  # bounded read-ahead: memory stays flat on any corpus
                done, result = pending.popleft()
                yield done, *result.get()
        while pending:
            done, result = pending.popleft()
            yield done, *result.get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


class _ShardWriter:
    """One split's shards: whole documents appended to `split-NNNNN.bin` + its `.idx.npy`."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.documents = self.tokens = self.bytes = self.shards = 0
        self._file: Any = None
        self._starts: list[int] = []
        self._size = 0

    def add(self, tokens: np.ndarray, nbytes: int) -> None:
        if self._file is not None and self._size + len(tokens) > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            self._file = open(self.root / f"{self.split}-{self.shards:05d}.bin", "wb", buffering=1 << 20)
        self._starts.append(self._size)
        self._file.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))
        self._size += len(tokens)
        self.documents += 1
        self.tokens += len(tokens)
        self.bytes += nbytes

    def _close_shard(self) -> None:
        self._file.close()
        np.save(self.root / f"{self.split}-{self.shards:05d}.idx.npy", np.array(self._starts, dtype=np.int64))
        self._file, self._starts, self._size = None, [], 0
        self.shards += 1

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()


class _SplitWriter:
    """Routes documents to train/val by `doc_fraction`, keeping each split non-empty (see module doc).

    While a split is still empty, the other split holds back its document nearest the boundary (lowest
    fraction for train, highest for val); it crosses over at the end if the empty split stayed empty.
    """

    def __init__(self, root: Path, dtype: np.dtype, cfg: TokenizeConfig) -> None:
        self.writers = {s: _ShardWriter(root, s, dtype, cfg.shard_tokens) for s in SPLITS}
        self.val_fraction = cfg.val_fraction
        self.count = dict.fromkeys(SPLITS, 0)  # documents assigned, written or held
        self.held: dict[str, tuple[float, np.ndarray, int] | None] = dict.fromkeys(SPLITS)

    def add(self, frac: float, tokens: np.ndarray, nbytes: int) -> None:
        split = "val" if frac < self.val_fraction else "train"
        other = "train" if split == "val" else "val"
        doc = (frac, tokens, nbytes)
        if self.count[other] == 0 and self.val_fraction > 0:
            held = self.held[split]
            if held is None:
                self.held[split] = doc
            else:
                nearer = (frac < held[0]) if split == "train" else (frac > held[0])
                keep, write = (doc, held) if nearer else (held, doc)
                self.held[split] = keep
                self.writers[split].add(write[1], write[2])
        else:
            self.writers[split].add(tokens, nbytes)
        self.count[split] += 1
        if self.count[split] == 1 and self.held[other] is not None:  # `other` no longer needs a stand-in
            _, t, n = self.held[other]
            self.writers[other].add(t, n)
            self.held[other] = None

    def close(self) -> None:
        for split in SPLITS:
            other = "train" if split == "val" else "val"
            held = self.held[split]
            if held is not None:
                target = other if self.count[other] == 0 and self.count[split] >= 2 else split
                self.writers[target].add(held[1], held[2])
            self.writers[split].close()


def _count_documents(docs: Path) -> int:
    """About how many documents DOCS holds, cheaply (Parquet metadata, JSONL lines): the bar's total."""
    n = 0
    for f in list_document_files(docs):
        if f.suffix == ".parquet":
            try:
                n += pq.read_metadata(f).num_rows
            except Exception:  # unreadable: iter_documents reports it with its name in a moment
                pass
        elif f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                n += sum(1 for line in fh if line.strip())
        else:
            n += 1
    return n


def _figures(splits: _SplitWriter, seconds: float) -> dict[str, Any]:
    """Counts per split and in all; bytes/token leaves out the one `<|bos|>` per document."""
    figures: dict[str, Any] = {}
    for split, w in splits.writers.items():
        figures.update({
            f"{split}_documents": w.documents, f"{split}_tokens": w.tokens, f"{split}_bytes": w.bytes,
            f"{split}_bytes_per_token": w.bytes / max(1, w.tokens - w.documents), f"{split}_shards": w.shards,
        })
    n_bytes = sum(w.bytes for w in splits.writers.values())
    figures.update({"documents": sum(w.documents for w in splits.writers.values()),
                    "tokens": sum(w.tokens for w in splits.writers.values()), "bytes": n_bytes,
                    "mb_per_s": round(n_bytes / 1e6 / seconds, 3), "seconds": round(seconds, 3)})
    return figures


def _check_config(cfg: TokenizeConfig) -> None:
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise NanoforgeError(f"tokenize: val_fraction must be in [0, 1), got {cfg.val_fraction}")
    for name in ("shard_tokens", "chunk_bytes"):
        if getattr(cfg, name) < 1:
            raise NanoforgeError(f"tokenize: {name} must be positive, got {getattr(cfg, name)}")
    for name in ("workers", "verify_docs"):
        if getattr(cfg, name) < 0:
            raise NanoforgeError(f"tokenize: {name} must be ≥ 0, got {getattr(cfg, name)}")


def tokenize(cfg: TokenizeConfig, docs: Path, tokenizer_dir: Path, out: Path) -> dict[str, Any]:
    """Encode every document under `docs` with the tokenizer in `tokenizer_dir` into shards in `out`.

    Returns the manifest; its figures hold documents/tokens/bytes per split, the encoder and MB/s.
    """
    _check_config(cfg)
    docs, tokenizer_dir, out = Path(docs), Path(tokenizer_dir), Path(out)
    t0 = time.perf_counter()
    tok = Tokenizer.load(tokenizer_dir)
    dtype = shard_dtype(tok.vocab_size)
    chunks = _chunks(iter_documents(docs), cfg.chunk_bytes)
    head: list[_Chunk] = []  # leading chunks, read first to check the fast path on
    exhausted = True
    for chunk in chunks:
        head.append(chunk)
        if sum(len(c.texts) for c in head) >= max(1, cfg.verify_docs):
            exhausted = False
            break
    if not any(c.texts for c in head):
        raise NanoforgeError(f"{docs}: the corpus is empty (no document has any text)")
    workers = cfg.workers or os.cpu_count() or 1
    if exhausted:  # a small corpus: no more processes than chunks
        workers = min(workers, len(head))
    encoders = _Encoders(tok, dtype, workers)
    try:
        sample = [t[:_VERIFY_CHARS] for c in head for t in c.texts][: cfg.verify_docs]
        if tok.fast and sample and not tok.check_fast(sample):
            encoders.restart()
        with atomic_dir(out) as tmp, tqdm(total=_count_documents(docs), unit="doc", desc="tokenize",
                                          dynamic_ncols=True) as bar:
            splits = _SplitWriter(tmp, dtype, cfg)
            for chunk, flat, lengths in encoders.map(itertools.chain(head, chunks)):
                pos = 0
                for key, n, nbytes in zip(chunk.keys, lengths, chunk.nbytes, strict=True):
                    splits.add(doc_fraction(key, cfg.seed), flat[pos : pos + n], nbytes)
                    pos += n
                bar.update(chunk.read)
                mb = sum(w.bytes for w in splits.writers.values()) / 1e6
                bar.set_postfix_str(f"{mb / (time.perf_counter() - t0):.1f} MB/s")
            splits.close()
            figures = _figures(splits, time.perf_counter() - t0)
            figures.update({"dtype": dtype.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                            "encoder": "tiktoken" if tok.fast else "hf", "workers": workers})
            manifest = write_manifest(tmp, stage="tokens", config=cfg,
                                      inputs={"docs": docs, "tokenizer": tokenizer_dir}, figures=figures)
    finally:
        encoders.close()
    return manifest



# ---------------------------------------------------------------------------------------------- reading


class TokenLoader:
    """Batches of (B, T) windows from one split's shards, shuffled per epoch, disjoint across ranks.

    The split's shards form one token stream, cut into `num_windows` non-overlapping windows of T+1
    tokens (stride T). Epoch e visits a permutation of the windows drawn from (seed, e); the epochs
    follow one another as one global stream of windows. Each `next_batch` call takes the next
    `batch_size × world_size` windows of that stream and rank r keeps rows [r·B, (r+1)·B), so the
    windows a step trains on are the same at any world size (one process with accumulation sees the
    same set as eight ranks without), and the ranks never share a window. A batch may run from one
    epoch into the next. `state_dict()` is the global position (two integers) and a few checks; it is
    the same on every rank, and a loader that loads it, at this world size or another, continues the
    global stream exactly where the saved one stopped.
    """

    def __init__(self, data_dir: Path | str, split: str = "train", *, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if batch_size < 1 or seq_len < 1:
            raise NanoforgeError(f"TokenLoader: batch_size and seq_len must be positive "
                                 f"(got {batch_size}, {seq_len})")
        if not 0 <= rank < world_size:
            raise NanoforgeError(f"TokenLoader: rank {rank} is not in [0, world_size={world_size})")
        data_dir = Path(data_dir)
        info = read_token_manifest(data_dir)
        paths = [p for p in sorted(data_dir.glob(f"{split}-*.bin")) if p.stat().st_size]
        if not paths:
            raise NanoforgeError(f"{data_dir}: no {split!r} shards ({split}-*.bin)")
        self._shards = [np.memmap(p, dtype=info.dtype, mode="r") for p in paths]
        self._starts = np.cumsum([0, *(len(s) for s in self._shards)])  # (n_shards + 1,) stream offsets
        self.num_tokens = int(self._starts[-1])
        if self.num_tokens < seq_len + 1:
            raise NanoforgeError(f"{data_dir}: the {split!r} split has {self.num_tokens} tokens, fewer than "
                                 f"seq_len + 1 = {seq_len + 1}")
        self.num_windows = (self.num_tokens - 1) // seq_len
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.cursor = 0  # windows of this epoch already handed out, over all ranks
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation of the windows)

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed % 2**64, epoch])
            self._order = (epoch, rng.permutation(self.num_windows))
        return self._order[1]

    def _advance(self, n: int) -> np.ndarray:
        """The next `n` windows of the global stream (all ranks' rows); moves the position past them."""
        windows = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            order = self._epoch_windows(self.epoch)
            take = min(n - filled, self.num_windows - self.cursor)
            windows[filled : filled + take] = order[self.cursor : self.cursor + take]
            filled += take
            self.cursor += take
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), each (B, T) int64, y[:, t] = x[:, t + 1] in the stream."""
        B = self.batch_size
        rows = self._advance(B * self.world_size)[self.rank * B : (self.rank + 1) * B]
        return self._batch(rows)

    def iter_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split's first `max_batches × batch_size` windows (all by default) in stream order, for
        evaluation; the set does not depend on the world size.

        They are dealt out like `next_batch` deals a step: B·world_size rows at a time, rank r keeping
        rows [r·B, (r+1)·B). Rows past the end repeat window 0 with every target -100 (ignored by the
        loss), so every rank runs the same number of full batches, as sharded models need. Independent
        of `next_batch` and its state: every call starts from the beginning.
        """
        B = self.batch_size
        n = self.num_windows if max_batches is None else min(self.num_windows, max_batches * B)
        for start in range(0, n, B * self.world_size):
            rows = np.arange(start + self.rank * B, start + (self.rank + 1) * B)
            real = int((rows < n).sum())  # the padding rows, if any, are the last ones
            x, y = self._batch(np.where(rows < n, rows, 0))
            y[real:] = -100
            yield x, y

    def _batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # torch is imported here, not at the top, so `tokenize`'s worker processes start without it
        import torch

        T = self.seq_len
        buf = np.empty((len(windows), T + 1), dtype=np.int64)  # (B, T + 1)
        for row, w in enumerate(windows):
            self._read(int(w) * T, buf[row])
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    def _read(self, start: int, out: np.ndarray) -> None:
        """Copy stream tokens [start, start + len(out)) into `out`, across shard boundaries."""
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        got = 0
        while got < len(out):
            offset = start + got - int(self._starts[k])
            piece = self._shards[k][offset : offset + len(out) - got]
            out[got : got + len(piece)] = piece
            got += len(piece)
            k += 1

    def state_dict(self) -> dict[str, int]:
        """The global position (epoch, cursor) plus what it is only valid for; JSON-able, the same on
        every rank and valid at any world size."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; refuses one saved for other data, seq_len or seed."""
        mine = self.state_dict()
        diff = [f"{k} {state.get(k)} vs {mine[k]}" for k in ("seed", "seq_len", "num_windows")
                if state.get(k) != mine[k]]
        if diff:
            raise NanoforgeError(f"loader state does not fit this {self.split!r} loader "
                                 f"(saved vs now: {', '.join(diff)})")
        if not 0 <= int(state["cursor"]) < self.num_windows or int(state["epoch"]) < 0:
            raise NanoforgeError(f"loader state: position epoch {state['epoch']}, cursor {state['cursor']} "
                                 f"is out of range")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
