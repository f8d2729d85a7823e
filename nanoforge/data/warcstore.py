"""The crawl's store on disk: WARC 1.1 files holding every HTTP exchange, and the journal that makes a crawl resumable.

    nanoforge crawl https://example.org/ --out crawl    # stopped? the same command again continues it

`nanoforge.data.crawl` fetches; this module writes what it fetched into `out/` and reads it back on resume:

- `crawl-00000.warc.gz`, …: WARC 1.1, one gzip member per record. A `warcinfo` record opens each file; then a
  `request` and a `response` record for every exchange (pages, redirects, errors, robots.txt, sitemaps), linked
  both ways by `WARC-Concurrent-To`, with block and payload digests. Files rotate at about `CrawlConfig.warc_max_bytes`.
- `crawl-state.jsonl`, the journal: one JSON line per exchange or decision. `start` (seeds and allowed domains)
  opens it, `session` marks each run, `warc` each new file; a `robots` or `fetch` line gives the URL, its outcome
  (status and bytes, or the error), the file and new end offset of its records, and the URLs it added to the
  frontier (`new`).

The resume guarantee: a journal line is appended only after its exchange's records are in the WARC file and
fsynced, so the journal never names a record that is not on disk. After a stop (Ctrl-C, SIGKILL, power loss),
`recover` cuts a torn last journal line and cuts each WARC file back to the end the journal last recorded for it
(records written after that belong to URLs that are fetched again), so every file reads to its end; a WARC file
the journal does not know, or one shorter than it says, is refused. Replaying the lines brings back the figures
(`CrawlStats`) and the crawler's frontier: no URL the journal has finished is fetched twice, and URLs that were in
flight are queued again.

One writer thread (`WarcStore`) appends records and lines in commit order, with group commit: one fsync per
batch, then the batch's journal lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from warcio.statusandheaders import StatusAndHeaders
from warcio.timeutils import datetime_to_iso_date
from warcio.warcwriter import WARCWriter

from nanoforge import __version__
from nanoforge.artifacts import fsync_dir
from nanoforge.errors import NanoforgeError

JOURNAL = "crawl-state.jsonl"
_WARC_NAME = re.compile(r"crawl-(\d{5,})\.warc\.gz")


@dataclass
class Exchange:
    """One HTTP request and the response to it, as the WARC records will hold them."""

    url: str
    date: datetime
    request_headers: list[tuple[str, str]]
    version: str  # "HTTP/1.1"
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as received, in order
    content_type: str | None
    body: bytes = b""
    truncated: str | None = None  # WARC-Truncated reason: "length" (cut at the cap), "unspecified" (not HTML)

    @property
    def location(self) -> str | None:
        if 300 <= self.status < 400:
            return next((v for k, v in self.headers if k.lower() == "location"), None)
        return None

    def fields(self) -> dict[str, Any]:
        return {"status": self.status, "bytes": len(self.body)}


_record_writers = threading.local()


def warc_records(ex: Exchange) -> bytes:
    """The `request` and `response` WARC records of one exchange, each its own gzip member (warcio's writer),
    linked both ways by WARC-Concurrent-To; warcio adds the block and payload digests."""
    if not hasattr(_record_writers, "writer"):  # one per thread: making a WARCWriter looks up the host name
        _record_writers.buf = BytesIO()
        _record_writers.writer = WARCWriter(_record_writers.buf, gzip=True, warc_version="1.1")
    buf, writer = _record_writers.buf, _record_writers.writer
    buf.seek(0)
    buf.truncate()
    parts = urlsplit(ex.url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    date = datetime_to_iso_date(ex.date.replace(tzinfo=None), use_micros=True)  # warcio wants naive UTC
    request = writer.create_warc_record(
        ex.url, "request", warc_headers_dict={"WARC-Date": date},
        http_headers=StatusAndHeaders(f"GET {target} HTTP/1.1", ex.request_headers, is_http_request=True))
    response_headers = {"WARC-Date": date, "WARC-Concurrent-To": request.rec_headers.get_header("WARC-Record-ID")}
    if ex.truncated:
        response_headers["WARC-Truncated"] = ex.truncated
    response = writer.create_warc_record(
        ex.url, "response", payload=BytesIO(ex.body), length=len(ex.body), warc_headers_dict=response_headers,
        http_headers=StatusAndHeaders(f"{ex.status} {ex.reason}", _stored_headers(ex), protocol=ex.version))
    request.rec_headers.add_header("WARC-Concurrent-To", response.rec_headers.get_header("WARC-Record-ID"))
    writer.write_record(request)
    writer.write_record(response)
    return buf.getvalue()


class WarcStore:
    """The WARC files and the journal, written by one thread in commit order, with group commit.

    `commit(line, records)` hands over a journal line and the WARC records (bytes) of its exchange, if any. The
    thread takes whatever has queued up, writes the records, fsyncs once, and only then appends the lines: so a
    line never names records that are not on disk, and a busy crawl pays one fsync (and one GIL hand-off with
    the event loop) per batch rather than per page.
    """

    def __init__(self, out: Path, next_index: int, *, max_bytes: int, user_agent: str):
        self.out, self.index = out, next_index
        self.max_bytes = max_bytes  # a file is closed once it is this big
        self.user_agent = user_agent  # recorded in each file's warcinfo record
        self.file: Any = None
        self.name = ""
        self.journal = open(out / JOURNAL, "a", encoding="utf-8")
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="warc-writer", daemon=True)
        self.thread.start()

    def commit(self, line: dict[str, Any], records: bytes | None) -> asyncio.Future:
        """A future of the journal lines written for this commit (a new WARC file's line, then `line`)."""
        assert self.loop is not None
        future = self.loop.create_future()
        self.queue.put((line, records, future))
        return future

    def write(self, items: list[tuple[dict[str, Any], bytes | None]]) -> list[list[dict[str, Any]]]:
        written = []
        for line, records in items:
            lines = []
            if records is not None:
                if self.file is None:
                    lines.append(self._open())
                self.file.write(records)
                line.update(file=self.name, end=self.file.tell())
                if self.file.tell() >= self.max_bytes:
                    self._close_warc()
            written.append([*lines, line])
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())  # the records are on disk before the journal says they are
        for lines in written:
            for line in lines:
                self.journal.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.journal.flush()
        return written

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get())
            if batch[-1] is None:  # close(): nothing comes after it
                stop = True
                batch.pop()
            try:
                result: Any = self.write([(line, records) for line, records, _ in batch])
            except Exception as e:  # e.g. disk full: every waiting worker gets the error, the crawl stops
                result = e
            try:
                self.loop.call_soon_threadsafe(self._resolve, [f for _, _, f in batch], result)
            except RuntimeError:  # the loop is closed (Ctrl-C): the records are written, nobody waits for them
                pass

    @staticmethod
    def _resolve(futures: list[asyncio.Future], result: Any) -> None:
        for i, future in enumerate(futures):
            if future.done():  # its worker was cancelled
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result[i])

    def _open(self) -> dict[str, Any]:
        self.name = f"crawl-{self.index:05d}.warc.gz"
        self.index += 1
        self.file = open(self.out / self.name, "xb")
        fsync_dir(self.out)
        writer = WARCWriter(self.file, gzip=True, warc_version="1.1")
        writer.write_record(writer.create_warcinfo_record(self.name, {
            "software": f"nanoforge/{__version__} (aiohttp {aiohttp.__version__}, warcio {metadata.version('warcio')})",
            "format": "WARC File Format 1.1",
            "conformsTo": "https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/",
            "robots": "obey (RFC 9309)",
            "http-header-user-agent": self.user_agent,
            "isPartOf": self.out.name,
        }))
        return {"t": "warc", "file": self.name, "end": self.file.tell()}

    def _close_warc(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def close(self) -> None:
        """Write what was handed over (so files end on a whole record), then close the files."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        self._close_warc()
        self.journal.close()


_FRAMING = ("content-encoding", "transfer-encoding", "content-length")


def _stored_headers(ex: Exchange) -> list[tuple[str, str]]:
    """Response headers as stored. When the stored body is not the bytes on the wire (decompressed, de-chunked,
    cut off or not downloaded), the framing headers are kept as X-Crawler-* and Content-Length gives the stored
    length, as Common Crawl does, so that WARC readers do not try to decode the body again."""
    if not ex.truncated and not any(k.lower() in _FRAMING[:2] for k, _ in ex.headers):
        return ex.headers
    kept = [(f"X-Crawler-{k}", v) if k.lower() in _FRAMING else (k, v) for k, v in ex.headers]
    return [*kept, ("Content-Length", str(len(ex.body)))]


def recover(out: Path) -> tuple[list[dict[str, Any]], int]:
    """Read the journal (cutting a torn last line) and cut each WARC file back to the end the journal last
    recorded for it; returns the journal's lines and the index of the next WARC file."""
    path = out / JOURNAL
    lines: list[dict[str, Any]] = []
    good = 0
    if path.exists():
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("no end of line")
                    lines.append(json.loads(raw))
                    good += len(raw)
                except ValueError:
                    if f.read(1):  # only the last line can be torn by a kill; damage inside is not ours to fix
                        raise NanoforgeError(f"{path}: line {n} is not JSON; the crawl state is damaged") from None
        if good < path.stat().st_size:
            os.truncate(path, good)
    ends = {line["file"]: line["end"] for line in lines if "file" in line}
    missing = [name for name in ends if not (out / name).exists()]
    if missing:
        raise NanoforgeError(f"{out / missing[0]}: missing, but the crawl journal {JOURNAL} has records in it")
    next_index = max((int(_WARC_NAME.fullmatch(name)[1]) for name in ends), default=-1) + 1
    for p in sorted(out.iterdir()):
        m = _WARC_NAME.fullmatch(p.name)
        if not m:
            continue
        end, size = ends.get(p.name), p.stat().st_size
        if end is None and int(m[1]) >= next_index and lines:  # opened, then killed before its warcinfo was logged
            p.unlink()
        elif end is None or size < end:
            raise NanoforgeError(f"{p}: {'not in' if end is None else 'shorter than'} the crawl journal "
                                 f"{JOURNAL}; use an empty --out")
        elif size > end:  # records written after the last journal line: their URLs are fetched again
            os.truncate(p, end)
    return lines, next_index


@dataclass
class CrawlStats:
    """The crawl's figures, a pure function of the journal: live lines and replayed ones go through `apply`."""

    pages: int = 0
    bytes: int = 0
    by_status: Counter = field(default_factory=Counter)
    robots_by_status: Counter = field(default_factory=Counter)
    robots_disallowed: int = 0
    skipped: Counter = field(default_factory=Counter)
    redirects: int = 0
    retries: int = 0
    sitemaps: int = 0
    warc_files: list[str] = field(default_factory=list)
    sessions: int = 0

    def apply(self, line: dict[str, Any]) -> None:
        kind, outcome = line["t"], line.get("outcome")
        if kind == "session":
            self.sessions += 1
        elif kind == "warc":
            self.warc_files.append(line["file"])
        elif kind == "robots":
            self.robots_by_status[str(line.get("status", line.get("error", outcome)))] += 1
            self.bytes += line.get("bytes", 0)
        elif kind == "fetch":
            if "status" in line:
                self.by_status[str(line["status"])] += 1
                self.bytes += line["bytes"]
            if outcome == "page":
                self.pages += 1
            elif outcome == "retry":
                self.retries += 1
            elif outcome == "redirect":
                self.redirects += 1
            elif outcome == "sitemap":
                self.sitemaps += 1
            elif outcome == "robots":
                self.robots_disallowed += 1
            else:
                self.skipped[outcome] += 1
            self.skipped.update(line.get("skips", {}))
