"""Reading WARC and WET files (WARC 1.0/1.1, the layout warcio and Common Crawl write), plain or gzipped,
into `RawRecord`s: HTML pages from response and resource records (their HTTP layer undone: status, chunked
transfer coding, Content-Encoding, declared and sniffed types), plain text from WET conversion records.

    skips = SkipCounter()
    for rec in iter_warc(Path("crawl/pages-00000.warc.gz"), skips):
        print(rec.url, rec.kind, len(rec.payload))

This is our own small reader rather than warcio because damaged input must not end the read: a gzip
member that is cut short or corrupt is counted and reading resumes at the next member that starts with a
WARC record; a record whose Content-Length does not land on
the `\\r\\n\\r\\n` that ends it is counted and reading resumes at the next `WARC/1.x` line (in an
uncompressed file, searched from the record's start, so records a too-long length swallowed come back).
Every skipped record is counted by reason in the `SkipCounter` (the reasons are listed in
`nanoforge.data.sources`).

`iter_warc(start=, end=)` reads the gzip members that start inside a byte range: `sources.plan_tasks` cuts a
big `.warc.gz`/`.wet.gz` into ranges read in parallel, and the records, and their order, do not depend on
the split.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nanoforge.data.records import RawRecord, SkipCounter

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")
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


def is_gzip_file(path: Path) -> bool:
    """Whether the file starts with a gzip member (a `.warc.gz` may also be stored uncompressed)."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC[:2]


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
