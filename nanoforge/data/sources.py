"""Readers that turn any input of `nanoforge extract` into raw records: WARC, WET, HTML, JSONL, Parquet.

    skips = SkipCounter()
    for task in plan_tasks(find_inputs([Path("crawl/")]), task_bytes=32 << 20):
        for rec in iter_task_records(task, skips):
            print(rec.url, rec.kind, len(rec.payload))
    print(skips.counts)  # Counter({'request_record': 812, 'non_200': 31, …})

Inputs are files or directories searched recursively for `*.warc[.gz]`, `*.wet[.gz]`, `*.html`, `*.htm`,
`*.jsonl` and `*.parquet`. Each yields `RawRecord`s: HTML to extract (`kind="html"`, bytes) or text that
is already plain (`kind="text"`: WET conversion records, JSONL/Parquet `text`).

WARC/WET files are read by `nanoforge.data.warc` (our own reader, tolerant of damage). Every skipped
record is counted by reason in a `SkipCounter` (`nanoforge.data.records`):

    warcinfo_record, request_record, metadata_record, revisit_record, …  not a page (normal, not logged)
    non_200         an HTTP status other than 200          non_html    another content type
    binary          bytes that are not text whatever the Content-Type says (image, PDF, archive)
    truncated_gzip  a gzip member cut short or corrupt     bad_length  a Content-Length that is wrong
    bad_warc_header / bad_http_header    unparseable headers
    undecodable     a Content-Encoding that cannot be undone, malformed JSON, a record without text, a
                    Parquet file that cannot be read

A `.warc.gz`/`.wet.gz` file bigger than `task_bytes` is split into byte ranges read in parallel: a range
owns the gzip members that start inside it, so the records, and their order, do not depend on the split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanoforge.data.records import RawRecord, SkipCounter
from nanoforge.data.warc import WARC_SUFFIXES, is_gzip_file, iter_warc
from nanoforge.errors import NanoforgeError

HTML_SUFFIXES = (".html", ".htm")
INPUT_SUFFIXES = (*WARC_SUFFIXES, *HTML_SUFFIXES, ".jsonl", ".parquet")
# the crawler's journal beside its WARC files (`warcstore.JOURNAL`; not imported: it would pull aiohttp into
# every extract worker): JSONL, but not documents
CRAWL_JOURNAL = "crawl-state.jsonl"


@dataclass(frozen=True)
class ReadTask:
    """A unit of parallel reading: one file, a byte range of a .gz WARC, or a batch of HTML files."""

    files: tuple[tuple[str, str], ...]  # (path, name recorded as the url root/source) for each file
    start: int = 0
    end: int = -1  # a range of a .gz WARC/WET: members starting in [start, end); -1: the whole file
    size: int = 0  # input bytes this task covers (progress and MB/s)


# ------------------------------------------------------------------------------------------ finding inputs


def _matches(path: Path) -> bool:
    return path.name.lower().endswith(INPUT_SUFFIXES)


def find_inputs(inputs: list[Path], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """Every input file under INPUTs, with the name it is recorded by; files in given order, directories sorted.

    The name is the path relative to the directory's parent (`site/a/b.html`), so it stays the same when the
    directory moves. Left out of directories: hidden files, the crawler's journal, anything under `exclude`
    (the output directory); and files an earlier INPUT already named.
    """
    found: dict[Path, tuple[Path, str]] = {}  # resolved path → (path, name); dicts keep insertion order
    excluded = exclude.resolve() if exclude is not None else None
    for path in map(Path, inputs):
        if not path.exists():
            raise NanoforgeError(f"{path}: no such file or directory")
        if path.is_file():
            if not _matches(path):
                raise NanoforgeError(f"{path}: not an input extract reads (expected {', '.join(INPUT_SUFFIXES)})")
            found.setdefault(path.resolve(), (path, path.name))
            continue
        files = []
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if (p.is_file() and _matches(p) and p.name != CRAWL_JOURNAL
                    and not any(part.startswith(".") for part in rel.parts)
                    and (excluded is None or not p.resolve().is_relative_to(excluded))):
                files.append((p, (Path(path.resolve().name) / rel).as_posix()))
        if not files:
            raise NanoforgeError(f"{path}: no input files ({', '.join(INPUT_SUFFIXES)}) found")
        for p, name in files:
            found.setdefault(p.resolve(), (p, name))
    return list(found.values())


def plan_tasks(files: list[tuple[Path, str]], task_bytes: int) -> list[ReadTask]:
    """Split the files into tasks of about `task_bytes` input bytes, in input order.

    HTML files are batched; a gzip-compressed WARC/WET is cut into byte ranges (members are found when the
    range is read); other files are one task each.
    """
    tasks: list[ReadTask] = []
    batch: list[tuple[str, str]] = []
    batch_size = 0

    def close_batch() -> None:
        nonlocal batch, batch_size
        if batch:
            tasks.append(ReadTask(tuple(batch), size=batch_size))
            batch, batch_size = [], 0

    for path, name in files:
        size = path.stat().st_size
        lower = path.name.lower()
        if lower.endswith(HTML_SUFFIXES):
            batch.append((str(path), name))
            batch_size += size
            if batch_size >= task_bytes:
                close_batch()
            continue
        close_batch()
        if lower.endswith(WARC_SUFFIXES) and size > task_bytes and is_gzip_file(path):
            for start in range(0, size, task_bytes):
                end = min(start + task_bytes, size)
                tasks.append(ReadTask(((str(path), name),), start, end, end - start))
        else:
            tasks.append(ReadTask(((str(path), name),), size=size))
    close_batch()
    return tasks


def iter_task_records(task: ReadTask, skips: SkipCounter, max_bytes: int = 8 << 20) -> Iterator[RawRecord]:
    """The records of one task, in file order; payloads longer than `max_bytes` are cut to it."""
    for path_str, name in task.files:
        path = Path(path_str)
        lower = path.name.lower()
        if lower.endswith(WARC_SUFFIXES):
            yield from iter_warc(path, skips, name=name, start=task.start, end=task.end, max_bytes=max_bytes)
        elif lower.endswith(HTML_SUFFIXES):
            yield from iter_html_file(path, name=name, max_bytes=max_bytes)
        elif lower.endswith(".jsonl"):
            yield from iter_jsonl(path, skips, name=name)
        else:
            yield from iter_parquet(path, skips, name=name)


# ------------------------------------------------------------------------------------------ other inputs


def iter_html_file(path: Path, *, name: str = "", max_bytes: int = 8 << 20) -> Iterator[RawRecord]:
    """One page: the file's bytes; its url is its recorded name (`site/a/b.html`), it has no fetch date."""
    with open(path, "rb") as f:
        payload = f.read(max_bytes + 1)
    name = name or path.name
    yield RawRecord(name, "", "html", payload[:max_bytes], "text/html", "", name, 0,
                    truncated=len(payload) > max_bytes)


def _text_fields(rec: dict, name: str, where: int) -> tuple[str, str, str]:
    """(url, date, id) of a JSONL/Parquet record; a record without a url gets `name#where`."""
    url = rec.get("url") or ""
    date = rec.get("date") or rec.get("fetch_date") or rec.get("timestamp") or ""
    if hasattr(date, "isoformat"):  # a Parquet timestamp column
        date = date.isoformat()
    return str(url) or f"{name}#{where}", str(date), str(rec.get("id") or "")


def iter_jsonl(path: Path, skips: SkipCounter, *, name: str = "") -> Iterator[RawRecord]:
    """Records with a string `text` field (and optional `url`, `date`, `id`); others are counted."""
    name = name or path.name
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                skips.skip("undecodable", f"{name}:{lineno} (malformed JSON)")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                skips.skip("undecodable", f"{name}:{lineno} (no string 'text' field)")
                continue
            url, date, doc_id = _text_fields(rec, name, lineno)
            yield RawRecord(url, date, "text", rec["text"], "text/plain", "", name, lineno, doc_id)


def iter_parquet(path: Path, skips: SkipCounter, *, name: str = "") -> Iterator[RawRecord]:
    """Rows with a `text` column (and optional `url`, `date`/`fetch_date`, `id`).

    A file that is not readable Parquet, or has no `text` column, counts once as `undecodable`, as does a
    file that breaks off (after the rows before the break).
    """
    name = name or path.name
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        skips.skip("undecodable", f"{name} (not a readable Parquet file: {e})")
        return
    names = set(pf.schema_arrow.names)
    if "text" not in names:
        skips.skip("undecodable", f"{name} (no 'text' column)")
        return
    cols = [c for c in ("text", "url", "date", "fetch_date", "timestamp", "id") if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                if not isinstance(rec["text"], str):
                    skips.skip("undecodable", f"{name} row {row} (no text)")
                    continue
                url, date, doc_id = _text_fields(rec, name, row)
                yield RawRecord(url, date, "text", rec["text"], "text/plain", "", name, row, doc_id)
    except (OSError, pa.ArrowException) as e:
        skips.skip("undecodable", f"{name} after row {row} (unreadable Parquet data: {e})")
