"""Readers that turn any input of `nanoforge extract` into raw records: WARC, WET, HTML, JSONL, Parquet.

    skips = SkipCounter()
    for task in plan_tasks(find_inputs([Path("crawl/")]), task_bytes=32 << 20):
        for rec in iter_task_records(task, skips):
            print(rec.url, rec.kind, len(rec.payload))
    print(skips.counts)  # Counter({'request_record': 812, 'non_200': 31, …})

Inputs are files or directories searched recursively for `*.warc[.gz]`, `*.wet[.gz]`, `*.html`, `*.htm`,
`*.jsonl` and `*.parquet`. Each yields `RawRecord`s: HTML to extract (`kind="html"`, bytes) or text that
is already plain (`kind="text"`: WET conversion records, JSONL/Parquet `text`).

WARC parsing is our own small reader (WARC 1.0/1.1, the layout warcio and Common Crawl write) because
damaged input must not end the read: a gzip member that is cut short or corrupt is counted and reading
resumes at the next member that starts with a WARC record; a record whose Content-Length does not land on
the `\\r\\n\\r\\n` that ends it is counted and reading resumes at the next `WARC/1.x` line (in an
uncompressed file, searched from the record's start, so records a too-long length swallowed come back).
Every skipped record is counted by reason in a `SkipCounter`:

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

import functools
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from nanoforge.errors import NanoforgeError

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")
HTML_SUFFIXES = (".html", ".htm")
INPUT_SUFFIXES = (*WARC_SUFFIXES, *HTML_SUFFIXES, ".jsonl", ".parquet")
# the crawler's journal beside its WARC files (`warcstore.JOURNAL`; not imported: it would pull aiohttp into
# every extract worker): JSONL, but not documents
CRAWL_JOURNAL = "crawl-state.jsonl"
# damage worth a warning; the other reasons (request records, 404s, images) are what any crawl holds
DAMAGE_REASONS = frozenset({"truncated_gzip", "bad_length", "bad_warc_header", "bad_http_header", "undecodable"})

_GZIP_MAGIC = b"\x1f\x8b\x08"
_READ_BLOCK = 1 << 16  # compressed bytes read at a time
_OUT_CHUNK = 1 << 18  # decompressed bytes produced at a time: a decompression bomb cannot fill memory
_SCAN_BLOCK = 1 << 20  # bytes searched at a time for the next gzip member
_MAX_HEADER = 1 << 16  # a WARC or HTTP header block longer than this is damage, not a header
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml", "application/vnd.wap.xhtml+xml"})
# Content-Types that say nothing: the bytes decide (a page served as octet-stream is still a page)
_VAGUE_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "text/plain", "unknown",
                          "application/unknown", "unknown/unknown", "application/x-unknown-content-type"})
_BINARY_MAGIC = (b"\x89PNG", b"GIF8", b"\xff\xd8\xff", b"%PDF", b"PK\x03\x04", b"\x1f\x8b", b"RIFF",
                 b"\x00\x00\x01\x00", b"OggS", b"ID3", b"wOFF", b"wOF2", b"\x7fELF", b"BZh", b"7z\xbc\xaf",
                 b"\x28\xb5\x2f\xfd", b"MZ")
# bytes that occur in text: tab, LF, FF, CR, ESC and everything from space up (UTF-8 and legacy code pages)
_TEXT_BYTES = bytes([9, 10, 12, 13, 27, *range(32, 256)])
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass
class RawRecord:
    """One page or text from an input, before extraction."""

    url: str
    date: str  # fetch date (WARC-Date, ISO 8601) or "" where the input has none
    kind: str  # "html": payload is the page's bytes; "text": payload is plain text
    payload: bytes | str
    content_type: str = ""  # the MIME type the server declared, lower case, no parameters
    charset_hint: str = ""  # the charset the server declared, if any
    source_file: str = ""  # the input file's name
    offset: int = 0  # where the record starts in the file (a .gz file: its gzip member); line/row for JSONL/Parquet
    id: str = ""  # an id the input already carries (JSONL/Parquet `id`), else ""
    truncated: bool = False  # the payload was longer than the reader's max_bytes and was cut


@dataclass
class SkipCounter:
    """Skipped records by reason, and where the first of each reason was (for a one-time warning)."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)


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


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC[:2]


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
        if lower.endswith(WARC_SUFFIXES) and size > task_bytes and _is_gzip(path):
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


# --------------------------------------------------------------------------------------------- WARC reading


class _GzipError(Exception):
    """The gzip member being read is cut short or corrupt."""


class _BadRecord(Exception):
    """A record that cannot be parsed; `resume_at` is where to search for the next one, if known."""

    def __init__(self, reason: str, resume_at: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.resume_at = reason, resume_at


class _Reader:
    """Lines and blocks over a stream of byte chunks (one gzip member, or a plain file), with a position.

    `seek` is given for a plain file only: it lets a bad record's content be searched for the records a
    too-long Content-Length swallowed.
    """

    def __init__(self, next_chunk: Callable[[], bytes], seek: Callable[[int], None] | None = None) -> None:
        self._next, self._seek = next_chunk, seek
        self._buf = b""
        self._pos = 0  # read position in _buf
        self._base = 0  # stream offset of _buf[0]

    def tell(self) -> int:
        return self._base + self._pos

    def seek(self, offset: int) -> None:
        """Go back to `offset` if the stream can (a plain file); otherwise stay."""
        if self._seek is not None:
            self._seek(offset)
            self._buf, self._pos, self._base = b"", 0, offset

    def _more(self) -> bool:
        """Append the next chunk to the unread part of the buffer; False at the end of the stream."""
        chunk = self._next()
        if not chunk:
            return False
        self._base += self._pos
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def readline(self, limit: int = _MAX_HEADER) -> bytes:
        """Up to and including the next b"\\n", at most `limit` bytes; b"" at the end of the stream."""
        while True:
            nl = self._buf.find(b"\n", self._pos, self._pos + limit)
            if nl >= 0 or len(self._buf) - self._pos >= limit or not self._more():
                end = nl + 1 if nl >= 0 else min(len(self._buf), self._pos + limit)
                line = self._buf[self._pos : end]
                self._pos = end
                return line

    def read(self, n: int, keep: bool = True) -> bytes:
        """The next `n` bytes (fewer at the end of the stream); with keep=False they are only skipped."""
        take = self._buf[self._pos : self._pos + n] if keep else b""
        got = min(n, len(self._buf) - self._pos)
        self._pos += got
        parts = [take]
        while got < n:  # large reads collect whole chunks instead of growing one buffer (no quadratic copy)
            chunk = self._next()
            if not chunk:
                break
            self._base += len(self._buf)
            self._buf, self._pos = chunk, min(n - got, len(chunk))
            if keep:
                parts.append(chunk[: self._pos])
            got += self._pos
        return b"".join(parts) if keep else b""

    def peek(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n and self._more():
            pass
        return self._buf[self._pos : self._pos + n]

    def skip_to_record(self) -> bool:
        """Advance to the next line that starts with b"WARC/1."; False if the stream has none."""
        pattern = b"\nWARC/1."
        while True:
            i = self._buf.find(pattern, max(self._pos - 1, 0))
            if i >= 0:
                self._pos = i + 1
                return True
            self._pos = max(self._pos, len(self._buf) - len(pattern))  # keep a tail: a match may straddle chunks
            if not self._more():
                self._pos = len(self._buf)
                return False


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    """`Name: value` lines → {lower-case name: value}; continuation lines join the previous value."""
    headers: dict[str, str] = {}
    last = ""
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line[:1] in (" ", "\t") and last:
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue  # not a header; lenient, as browsers and warcio are
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


@dataclass
class _WarcRecord:
    offset: int  # of its `WARC/` line in the stream
    headers: dict[str, str]
    content: bytes
    truncated: bool


def _read_record(r: _Reader, max_bytes: int) -> _WarcRecord | None:
    """The next record of the stream, None at its end; raises _BadRecord for a damaged one."""
    offset, line = r.tell(), r.readline()
    while line in (b"\r\n", b"\n"):  # some writers put blank lines between records
        offset, line = r.tell(), r.readline()
    if not line:
        return None
    if not line.startswith(b"WARC/"):
        raise _BadRecord("bad_warc_header")
    lines, size = [], len(line)
    while True:
        line = r.readline()
        size += len(line)
        if not line or size > _MAX_HEADER:
            raise _BadRecord("bad_warc_header")
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line)
    headers = _parse_headers(lines)
    try:
        length = int(headers.get("content-length", ""))
    except ValueError:
        raise _BadRecord("bad_length") from None
    if length < 0:
        raise _BadRecord("bad_length")
    start = r.tell()
    content = r.read(min(length, max_bytes))
    if length > max_bytes:
        r.read(length - max_bytes, keep=False)
    if r.tell() - start < length:  # the stream (a gzip member, the file) ended inside the content
        raise _BadRecord("bad_length", resume_at=start)
    end = r.peek(4)
    if end.startswith(b"\r\n\r\n"):
        r.read(4, keep=False)
    elif end.startswith(b"\n\n"):
        r.read(2, keep=False)
    elif end.strip():  # the content does not end where its length says: the length is wrong
        raise _BadRecord("bad_length", resume_at=start)
    else:  # the file ends after the content with a partial (or no) terminator: the record is whole
        r.read(len(end), keep=False)
    return _WarcRecord(offset, headers, content, length > max_bytes)


def _records(r: _Reader, skips: SkipCounter, where: Callable[[int], str], max_bytes: int) -> Iterator[_WarcRecord]:
    """Every record of a stream; damaged ones are counted and the read resumes at the next `WARC/1.x` line.

    `where(offset)` names a place in the stream for the warning about the first damage of each kind.
    """
    while True:
        start = r.tell()
        try:
            rec = _read_record(r, max_bytes)
        except _BadRecord as e:
            skips.skip(e.reason, where(start))
            if e.resume_at is not None:
                r.seek(e.resume_at)
            if not r.skip_to_record():
                return
            continue
        if rec is None:
            return
        yield rec


class _GzipMembers:
    """The gzip members of a file, each decompressed as a stream of chunks (gzip per record, as WARC does)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.end = 0  # after a member has been read to its end: where the next member starts
        self._tail, self._tail_at = b"", -1  # compressed bytes read past the last member's end

    def chunks(self, offset: int) -> Iterator[bytes]:
        """Decompressed chunks of the member at `offset`; raises _GzipError if it is cut short or corrupt."""
        if self._tail_at == offset:
            data = self._tail  # the file is positioned just after it
        else:
            self.f.seek(offset)
            data = b""
        pos = offset  # file offset of data[0]
        d = zlib.decompressobj(31)
        while True:
            if not data:
                data = self.f.read(_READ_BLOCK)
                if not data:
                    raise _GzipError
            try:
                out = d.decompress(data, _OUT_CHUNK)
            except zlib.error:
                raise _GzipError from None
            rest = d.unused_data if d.eof else d.unconsumed_tail
            pos += len(data) - len(rest)
            data = rest
            if d.eof:
                self.end, self._tail, self._tail_at = pos, data, pos
                if out:
                    yield out
                return
            if out:
                yield out

    def _starts_record(self, offset: int) -> bool:
        """Whether a gzip member that decompresses to a WARC record starts at `offset`."""
        self.f.seek(offset)
        d = zlib.decompressobj(31)
        try:
            out = d.decompress(self.f.read(1 << 12), 5)
            if len(out) < 5 and not d.eof:
                out += d.decompress(d.unconsumed_tail + self.f.read(1 << 16), 5 - len(out))
        except zlib.error:
            return False
        return out == b"WARC/"

    def next_member(self, start: int, limit: int) -> int | None:
        """The first offset in [start, limit) where a WARC record's gzip member starts, or None."""
        self._tail_at = -1
        pos = start
        while pos < limit:
            self.f.seek(pos)
            block = self.f.read(min(_SCAN_BLOCK, limit - pos + len(_GZIP_MAGIC) - 1))
            i = block.find(_GZIP_MAGIC)
            while 0 <= i and pos + i < limit:
                if self._starts_record(pos + i):
                    return pos + i
                i = block.find(_GZIP_MAGIC, i + 1)
            if len(block) < _SCAN_BLOCK:
                return None
            pos += len(block) - (len(_GZIP_MAGIC) - 1)
        return None


def _warc_records(path: Path, name: str, skips: SkipCounter, start: int, end: int,
                  max_bytes: int) -> Iterator[tuple[int, _WarcRecord]]:
    """(offset, record) for each record of a WARC file; for .gz, those in members starting in [start, end).

    The offset is the record's byte in an uncompressed file, its gzip member's byte in a compressed one.
    """
    with open(path, "rb") as f:
        if f.read(2) != _GZIP_MAGIC[:2]:  # an uncompressed file, whatever its name says
            f.seek(0)
            r = _Reader(functools.partial(f.read, _READ_BLOCK), f.seek)
            for rec in _records(r, skips, f"{name}, record at byte {{}}".format, max_bytes):
                yield rec.offset, rec
            return
        end = path.stat().st_size if end < 0 else end
        members = _GzipMembers(f)
        offset: int | None = start if start == 0 else members.next_member(start, end)
        while offset is not None and offset < end:
            where = f"{name}, gzip member at byte {offset}"
            r = _Reader(functools.partial(next, members.chunks(offset), b""))
            try:
                for rec in _records(r, skips, lambda _, where=where: where, max_bytes):
                    yield offset, rec
                offset = members.end
            except _GzipError:
                skips.skip("truncated_gzip", where)
                offset = members.next_member(offset + 1, end)


def _split_type(value: str) -> tuple[str, str]:
    """`text/html; charset=UTF-8` → ("text/html", "utf-8")."""
    mime, _, params = value.partition(";")
    charset = ""
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip("\"'").lower()
    return mime.strip().lower(), charset


def looks_binary(payload: bytes) -> bool:
    """Whether bytes are an image/archive/executable, or not text at all (many control bytes)."""
    head = payload[:1024]
    if head.startswith(_UTF16_BOMS):
        return False
    if head.startswith(_BINARY_MAGIC):
        return True
    return len(head.translate(None, _TEXT_BYTES)) * 10 > len(head)


def _sniff_html(payload: bytes) -> bool:
    head = payload[:1024].lower()
    return any(tag in head for tag in (b"<!doctype html", b"<html", b"<head", b"<body", b"<title"))


def _dechunk(body: bytes) -> bytes | None:
    """Undo HTTP chunked transfer coding; None if `body` is not chunked."""
    out, pos = [], 0
    while True:
        nl = body.find(b"\r\n", pos, pos + 64)
        if nl < 0:
            return None
        try:
            n = int(body[pos:nl].split(b";")[0], 16)
        except ValueError:
            return None
        if n == 0:
            return b"".join(out)
        out.append(body[nl + 2 : nl + 2 + n])
        pos = nl + 2 + n + 2
        if pos > len(body):
            return b"".join(out)  # cut short (a truncated record): keep what there is


def _decompress(body: bytes, coding: str, max_bytes: int) -> bytes | None:
    """Undo a Content-Encoding, at most `max_bytes` of output; None if the body cannot be decoded.

    Crawlers often store the decoded body and keep the header, so a body that does not decode as its
    header says passes through as it is (the binary check then rejects one that really was encoded).
    """
    if coding in ("gzip", "x-gzip") and body.startswith(_GZIP_MAGIC[:2]):
        try:
            return zlib.decompressobj(31).decompress(body, max_bytes)
        except zlib.error:
            return None
    if coding == "deflate":
        for wbits in (15, -15):  # zlib-wrapped as the RFC says, or raw deflate as some servers send
            try:
                return zlib.decompressobj(wbits).decompress(body, max_bytes)
            except zlib.error:
                pass
    if coding == "br":
        try:
            import brotli

            return brotli.Decompressor().process(body, output_buffer_limit=max_bytes)[:max_bytes]
        except Exception:  # brotli.error, or brotli not installed
            pass
    return body


def _http_record(headers: dict[str, str], content: bytes, truncated: bool, name: str, offset: int,
                 skips: SkipCounter, max_bytes: int) -> RawRecord | None:
    where = f"{name}, record at byte {offset}"
    head_end, sep = content.find(b"\r\n\r\n", 0, _MAX_HEADER), 4
    if head_end < 0:
        head_end, sep = content.find(b"\n\n", 0, _MAX_HEADER), 2
    if head_end < 0 or not content.startswith(b"HTTP/"):
        skips.skip("bad_http_header", where)
        return None
    status_line, *lines = content[:head_end].split(b"\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[1].isdigit():
        skips.skip("bad_http_header", where)
        return None
    if int(parts[1]) != 200:
        skips.skip("non_200", where)
        return None
    http = _parse_headers(lines)
    mime, charset = _split_type(http.get("content-type", ""))
    body = content[head_end + sep :]
    if "chunked" in http.get("transfer-encoding", "").lower():
        body = _dechunk(body) or body
    decoded = _decompress(body, http.get("content-encoding", "").strip().lower(), max_bytes)
    if decoded is None:
        skips.skip("undecodable", where)
        return None
    if looks_binary(decoded):
        skips.skip("binary", where)
        return None
    if mime not in _HTML_TYPES and not (mime in _VAGUE_TYPES and _sniff_html(decoded)):
        skips.skip("non_html", where)
        return None
    return RawRecord(headers.get("warc-target-uri", ""), headers.get("warc-date", ""), "html", decoded, mime,
                     charset, name, offset, truncated=truncated)


def iter_warc(path: Path, skips: SkipCounter, *, name: str = "", start: int = 0, end: int = -1,
              max_bytes: int = 8 << 20) -> Iterator[RawRecord]:
    """Pages (response/resource records with HTML) and texts (WET conversion records) of a WARC file."""
    name = name or path.name
    for offset, rec in _warc_records(path, name, skips, start, end, max_bytes):
        kind = rec.headers.get("warc-type", "").lower()
        url, date = rec.headers.get("warc-target-uri", ""), rec.headers.get("warc-date", "")
        if kind == "response":
            if not rec.headers.get("content-type", "application/http").lower().startswith("application/http"):
                skips.skip("non_html", f"{name}, record at byte {offset}")  # e.g. Heritrix's `dns:` records
                continue
            raw = _http_record(rec.headers, rec.content, rec.truncated, name, offset, skips, max_bytes)
            if raw is not None:
                yield raw
        elif kind in ("conversion", "resource"):
            mime, charset = _split_type(rec.headers.get("content-type", ""))
            if kind == "conversion" or mime == "text/plain":
                yield RawRecord(url, date, "text", rec.content, mime, charset or "utf-8", name, offset,
                                truncated=rec.truncated)
            elif not looks_binary(rec.content) and (mime in _HTML_TYPES or _sniff_html(rec.content)):
                yield RawRecord(url, date, "html", rec.content, mime, charset, name, offset,
                                truncated=rec.truncated)
            else:
                skips.skip("non_html", f"{name}, record at byte {offset}")
        else:
            skips.skip(f"{kind or 'untyped'}_record", f"{name}, record at byte {offset}")


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
