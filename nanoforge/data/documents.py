"""The Document record and document-shard I/O.

Documents live in Parquet shards with columns `id, text, url, source` (DESIGN.md §1), plus any string
metadata columns a stage adds (`extract` adds `fetch_date, content_hash, language, extractor`); those
come back in `Document.meta`. Every stage that reads documents accepts DOCS as a directory or a single
file of Parquet shards, JSONL (a `text` field per line) or plain `.txt` (one document per file):

    for doc in iter_documents("runs/demo/03-extract"):
        print(doc.id, len(doc.text))

A record without an id gets one from its file's path under DOCS, without the suffix, and its line (JSONL)
or row (Parquet): `a/x:3` for DOCS/a/x.jsonl line 3, `a/y` for DOCS/a/y.txt. The folders are part of it
because `a/x.jsonl` and `b/x.jsonl` must not give the same ids: dedup keys its drops by id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanoforge.errors import NanoforgeError

DOC_SUFFIXES = (".parquet", ".jsonl", ".txt")
CORE_COLUMNS = ("id", "text", "url", "source")
SCHEMA = pa.schema([(name, pa.string()) for name in CORE_COLUMNS])
# JSON can spell a lone surrogate ("\ud800"), which is no character: UTF-8 cannot encode it, so Parquet,
# tokenizers and every later `.encode()` would fail on the document. Only lines with such an escape are searched
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads has joined the valid pairs already


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    url: str = ""
    source: str = ""
    # string metadata (fetch date, content hash, language, …): extra Parquet columns, "" where unknown
    meta: dict[str, str] = field(default_factory=dict, hash=False)


def list_document_files(path: Path | str) -> list[Path]:
    """The document files DOCS names, sorted; a clear error if there are none."""
    path = Path(path)
    if not path.exists():
        raise NanoforgeError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix not in DOC_SUFFIXES:
            raise NanoforgeError(f"{path}: not a document file (expected {', '.join(DOC_SUFFIXES)})")
        return [path]
    skip = _not_documents(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DOC_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and not any(d in p.parents for d in skip))
    if not files:
        raise NanoforgeError(f"{path}: no document files (.parquet, .jsonl or .txt) found")
    return files


def _not_documents(path: Path) -> list[Path]:
    """Folders of an artifact that hold documents it did *not* keep: a clean stage's `removed/`."""
    try:
        stage = json.loads((path / "manifest.json").read_text()).get("stage")
    except (OSError, ValueError):
        return []
    return [path / "removed"] if stage == "clean" else []


def document_name(file: Path, root: Path) -> str:
    """What the generated ids of `file`'s records start with: its path under `root` without the suffix
    ('a/x' for root/a/x.jsonl), or its stem where `root` is the file itself."""
    rel = file.relative_to(root) if root in file.parents else Path(file.name)
    return rel.with_suffix("").as_posix()


def _read_parquet(path: Path, name: str) -> Iterator[Document]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise NanoforgeError(f"{path}: not a readable Parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    if "text" not in names:
        raise NanoforgeError(f"{path}: Parquet file has no 'text' column")
    text_type = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise NanoforgeError(f"{path}: column 'text' is {text_type}, expected a string column")
    cols = [c for c in CORE_COLUMNS if c in names]
    meta_cols = [f.name for f in pf.schema_arrow if f.name not in CORE_COLUMNS and pa.types.is_string(f.type)]
    row = 0
    for batch in pf.iter_batches(columns=cols + meta_cols, batch_size=1024):
        d = batch.to_pydict()
        for i, text in enumerate(d["text"]):
            if text is not None:
                doc_id = d["id"][i] if "id" in d else f"{name}:{row}"
                yield Document(str(doc_id), text, (d.get("url") or [""] * (i + 1))[i] or "",
                               (d.get("source") or [""] * (i + 1))[i] or "",
                               {c: d[c][i] or "" for c in meta_cols})
            row += 1


def _read_jsonl(path: Path, name: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise NanoforgeError(f"{path}:{lineno}: not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise NanoforgeError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise NanoforgeError(f"{path}:{lineno}: record has no string 'text' field")
            fields = (str(rec.get("id", f"{name}:{lineno}")), rec["text"], str(rec.get("url", "") or ""),
                      str(rec.get("source", "") or ""))
            if _SURROGATE_ESCAPE.search(raw):
                fields = tuple(_LONE_SURROGATE.sub("\ufffd", f) for f in fields)
            yield Document(*fields)


def _read_txt(path: Path, name: str) -> Iterator[Document]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanoforgeError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    yield Document(name, text, "", "txt")


def iter_documents(path: Path | str, *, root: Path | str | None = None) -> Iterator[Document]:
    """Every document under DOCS, in a deterministic order (files sorted, records in file order).

    Generated ids name each file by its path under `root` (default: DOCS itself), so a stage that reads
    the files of DOCS one at a time passes DOCS as `root` to get the ids a whole read gives. Lone
    surrogates in JSONL become U+FFFD.
    """
    path = Path(path)
    root = Path(root) if root is not None else path
    for f in list_document_files(path):
        name = document_name(f, root)
        reader = {".parquet": _read_parquet, ".jsonl": _read_jsonl, ".txt": _read_txt}[f.suffix]
        yield from reader(f, name)


def read_texts(path: Path | str) -> list[str]:
    """All non-empty document texts under DOCS; refuses an empty corpus."""
    texts = [d.text for d in iter_documents(path) if d.text.strip()]
    if not texts:
        raise NanoforgeError(f"{path}: the corpus is empty (no document has any text)")
    return texts


def write_document_shards(docs: Iterable[Document], out: Path, *, shard_bytes: int = 64 << 20,
                          prefix: str = "docs", meta_columns: Sequence[str] = (), first_shard: int = 0,
                          ) -> dict[str, int]:
    """Write documents as `prefix-00000.parquet`, … (zstd) into the existing directory `out`; numbering
    starts at `first_shard` (so per-task writers can give each task its own shard names).

    `meta_columns` become string columns after the core four, from each document's `meta` ("" if absent).
    Returns counts: documents, bytes (UTF-8 text), shards.
    """
    clash = set(meta_columns) & set(CORE_COLUMNS)
    if clash:
        raise NanoforgeError(f"meta column(s) {', '.join(sorted(clash))} would shadow a core document column")
    schema = pa.schema([*SCHEMA, *((name, pa.string()) for name in meta_columns)])
    out.mkdir(parents=True, exist_ok=True)
    buf: list[Document] = []
    size = n_docs = n_bytes = 0
    shard = first_shard

    def flush() -> None:
        nonlocal buf, size, shard
        if not buf:
            return
        columns = {"id": [d.id for d in buf], "text": [d.text for d in buf],
                   "url": [d.url for d in buf], "source": [d.source for d in buf]}
        for name in meta_columns:
            columns[name] = [d.meta.get(name, "") for d in buf]
        table = pa.Table.from_pydict(columns, schema=schema)
        pq.write_table(table, out / f"{prefix}-{shard:05d}.parquet", compression="zstd")
        shard += 1
        buf, size = [], 0

    for d in docs:
        buf.append(d)
        b = len(d.text.encode("utf-8"))
        size += b
        n_bytes += b
        n_docs += 1
        if size >= shard_bytes:
            flush()
    flush()
    return {"documents": n_docs, "bytes": n_bytes, "shards": shard - first_shard}
