"""Main-text extraction: crawled pages (and any other text input) → Parquet documents.

    nanoforge extract crawl/ --out docs/                        # the crawler's crawl-*.warc.gz files
    nanoforge extract CC-MAIN-x.warc.gz pages/ more.jsonl --out docs/ --extractor trafilatura --workers 8

Inputs are WARC/WARC.gz (ours and Common Crawl's), WET, folders of .html/.htm files, JSONL and Parquet
with a `text` column (see `nanoforge.data.sources`). Each HTML page is cut to `max_page_bytes` and decoded
(byte-order mark, then UTF-8 if the bytes are UTF-8 but for a character cut at the end or a few bad bytes,
then the charset the HTTP header or `<meta>` declares if the bytes agree with it, then `uchardet`
detection), and its main text is extracted; WET/JSONL/Parquet text is taken as it is. Control characters
are removed and non-breaking spaces become spaces; a text shorter than `min_chars` is skipped as
`too_short`, a page an extractor fails on as `extract_error` (the reasons the readers count are listed in
`nanoforge.data.sources`).

Output: `docs-00000.parquet`, … with columns `id, text, url, source, fetch_date, content_hash, language,
extractor`. `id` is the input's own id (JSONL/Parquet) or sha256(url, fetch date)[:32], so it is stable
across runs; `content_hash` is the sha256 of the text; `language` is resiliparse's `detect_fast` guess on
the first 4 K characters (ISO 639-1, "unknown" when no profile is near). `manifest.json` has the figures:
records read, documents, bytes in/out, skipped records by reason, pages cut, languages, docs/s, MB/s.

Work is split into tasks of ~`task_bytes` (a file, a byte range of a .warc.gz, or a batch of HTML files)
run in a process pool; each task writes its documents to a temporary part, and the parts are joined in
task order, so the shards are byte-identical for any number of workers.

Extractors, measured by `benchmarks/bench_extract.py` (206 stdlib modules' pydoc HTML pages, a 97 MB crawl;
2-vCPU AMD EPYC VM, Python 3.11, resiliparse 2.0.1, trafilatura 2.3.1). Quality: mean per-page token
precision / recall / F1 against pydoc's plain-text rendering of the same module, on the bare pages and with
site chrome (header, 120-link navigation, sidebar, footer) around them. Speed: per CPU-second, best of 3.

    extractor                                bare P / R / F1        chrome F1   docs/s per core    MB/s per core
    resiliparse (default; the whole stage)   0.978 / 0.883 / 0.921  0.921       415 (2 procs: 396)  16.3 (15.5)
    trafilatura, our setting (favor_recall)  0.979 / 0.854 / 0.904  0.907       34.4                1.35
    trafilatura.extract, its defaults        0.977 / 0.612 / 0.726  0.787       27.1                1.06

Both remove the chrome entirely here (precision does not move); they differ in recall: trafilatura's
defaults lose about a third of each page (pydoc lays out classes and functions in tables), `favor_recall`
brings most of it back (and here is faster too). resiliparse is the default: it keeps the most of each
page, at ~15x trafilatura's throughput per core (15.3x in one process, 14.6x in two; the whole stage from
.warc.gz to Parquet against `trafilatura.extract` alone on pages in memory; runs on this shared VM vary by
±15%). Of the stage's time, resiliparse's parse and extraction are ~80%; reading the WARC ~5%.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding, map_encoding_to_html5
from resiliparse.parse.html import HTMLTree
from resiliparse.parse.lang import detect_fast
from tqdm import tqdm

from nanoforge.artifacts import atomic_dir, write_manifest
from nanoforge.console import info
from nanoforge.data.documents import Document, iter_documents, write_document_shards
from nanoforge.data.records import DAMAGE_REASONS, RawRecord, SkipCounter
from nanoforge.data.sources import ReadTask, find_inputs, iter_task_records, plan_tasks
from nanoforge.errors import NanoforgeError

EXTRACTORS = ("resiliparse", "trafilatura")
META_COLUMNS = ("fetch_date", "content_hash", "language", "extractor")
_LANG_CHARS = 4096  # of each text given to the language guess: enough for a stable guess, and cheap
# control characters (tab and newline stay), U+FFFD (what a page's binary garbage decodes to) and lone
# surrogates (JSON "\ud800" escapes), which UTF-8 cannot encode
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")


@dataclass
class ExtractConfig:
    """How `nanoforge extract` reads inputs and extracts main text."""

    extractor: str = "resiliparse"  # or "trafilatura": measured trade-off in the module docstring
    workers: int = 0  # processes; 0 = one per CPU core
    min_chars: int = 1  # drop documents whose text is shorter
    language: bool = True  # guess each document's language (resiliparse detect_fast, ~50 µs a document)
    shard_bytes: int = 64 << 20  # text per output Parquet shard
    max_page_bytes: int = 8 << 20  # longer pages/records are cut to this before extraction
    task_bytes: int = 32 << 20  # input bytes per parallel task (.warc.gz files are split at gzip members)


# ---------------------------------------------------------------------------------------------- one page


def _utf8_tally(text: str, payload: bytes) -> tuple[int, int]:
    """(valid non-ASCII characters, invalid sequences) of `text`, `payload` decoded as UTF-8 with errors replaced.

    Other charsets' non-ASCII bytes rarely form valid UTF-8: Windows-1252 and Cyrillic text next to never,
    GBK/Shift_JIS/EUC-KR/Big5 text at under 0.4 valid characters per invalid sequence, while a UTF-8 page with
    a stray Latin-1 byte has many valid ones per bad one.
    """
    replaced = text.count("\ufffd")
    return len(text) - len(text.encode("ascii", "ignore")) - replaced, replaced - payload.count("\ufffd".encode())


def _decode(payload: bytes, label: str) -> str:
    """`payload` in the charset `label`, undecodable bytes replaced. UTF-8 is decoded here: resiliparse's
    bytes_to_str would fall back to Windows-1252 on one bad byte and make the whole text mojibake."""
    if map_encoding_to_html5(label, fallback_utf8=False) == "utf-8":
        return payload.decode("utf-8", "replace")
    return bytes_to_str(payload, label, errors="replace")


def decode_html(payload: bytes, charset_hint: str = "") -> str:
    """A page's bytes as text: BOM, then UTF-8, then a declared charset the bytes agree with, then detection.

    UTF-8 wins if the bytes are valid UTF-8 but for a character cut at the end (pages are cut at
    `max_page_bytes`) or a few bad bytes (`_utf8_tally`; fewer valid characters are enough where UTF-8 is
    declared): valid UTF-8 is almost never another charset, and decoding the rest as Windows-1252 would make
    every character mojibake to save one. Another declaration is trusted only if the bytes decode under it
    without error, because servers and pages lie (UTF-8 declared over Windows-1252 bytes is the classic); the
    last resort never fails.
    """
    if payload.startswith(codecs.BOM_UTF8):
        return payload[3:].decode("utf-8", "replace")
    if payload.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return payload.decode("utf-16", "replace")
    try:
        # pure ASCII too; final=False leaves out a character cut at the end instead of failing on it
        return codecs.utf_8_decode(payload, "strict", False)[0]
    except UnicodeDecodeError:
        pass
    # the HTTP charset, then <meta charset> (detect_encoding reads it, or guesses when there is none)
    labels = (charset_hint, detect_encoding(payload, from_html_meta=True))
    encodings = [map_encoding_to_html5(label, fallback_utf8=False) if label else None for label in labels]
    text = payload.decode("utf-8", "replace")
    good, bad = _utf8_tally(text, payload)
    if good >= 4 * bad or ("utf-8" in encodings and good >= bad):
        return text
    for encoding in encodings:
        if encoding and encoding != "utf-8":
            try:
                return payload.decode(encoding)
            except (LookupError, UnicodeDecodeError):
                pass
    return _decode(payload, detect_encoding(payload))


def main_text(html: str, extractor: str = "resiliparse") -> str:
    """The main text of a page (navigation, footers, sidebars dropped), paragraphs on their own lines."""
    if extractor == "resiliparse":
        tree = HTMLTree.parse(html)
        return extract_plain_text(tree, preserve_formatting=True, main_content=True, alt_texts=False,
                                  comments=False)
    import trafilatura  # imported on first use: ~1 s, and only this extractor needs it

    # favor_recall: on documentation pages the defaults lose much of the tables (token F1 0.73 vs 0.90)
    return trafilatura.extract(html, favor_recall=True, include_comments=False, include_tables=True,
                               deduplicate=False, with_metadata=False) or ""


def clean_text(text: str) -> str:
    """Text without control characters, U+FFFD or lone surrogates, with plain spaces and \\n line ends, stripped."""
    # non-breaking spaces become spaces: pages use them for layout (pydoc puts one between every two words of
    # a docstring), and a model should not learn two kinds of space between words. str.replace, not
    # str.translate: a translation table costs ~40 ns a character, which halved the stage's throughput
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    return _CONTROL.sub("", text).strip()


def guess_language(text: str) -> str:
    """ISO 639-1 code of the text's language, or "unknown"."""
    return detect_fast(text[:_LANG_CHARS])[0]


def document_id(url: str, date: str) -> str:
    """A stable id for a fetch of `url` at `date`: 32 hex digits of sha256."""
    return hashlib.sha256(f"{url}\n{date}".encode()).hexdigest()[:32]


def to_document(rec: RawRecord, cfg: ExtractConfig, skips: SkipCounter) -> Document | None:
    """The document for a raw record, or None (counted in `skips`) if it has no usable text."""
    where = f"{rec.source_file}, record at {rec.offset} ({rec.url})"
    if rec.kind == "html":
        assert isinstance(rec.payload, bytes)
        try:
            text = main_text(decode_html(rec.payload, rec.charset_hint), cfg.extractor)
        except Exception:  # the extractors' parsers raise several types on hostile pages; one page, not the run
            skips.skip("extract_error", where)
            return None
    elif isinstance(rec.payload, bytes):  # WET conversion records: UTF-8 (possibly cut mid-character)
        text = _decode(rec.payload, rec.charset_hint or "utf-8")
    else:
        text = rec.payload
    text = clean_text(text)
    if len(text) < max(cfg.min_chars, 1):
        skips.skip("too_short", where)
        return None
    meta = {"fetch_date": rec.date, "content_hash": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "language": guess_language(text) if cfg.language else "",
            "extractor": cfg.extractor if rec.kind == "html" else ""}
    return Document(rec.id or document_id(rec.url, rec.date), text, rec.url, rec.source_file, meta)


# --------------------------------------------------------------------------------------------- the stage


@dataclass
class _Tally:
    """What reading and extracting a task saw, beyond the documents."""

    skips: SkipCounter = field(default_factory=SkipCounter)
    documents: int = 0
    truncated: int = 0
    languages: Counter[str] = field(default_factory=Counter)


def _task_documents(task: ReadTask, cfg: ExtractConfig, tally: _Tally) -> Iterator[Document]:
    for rec in iter_task_records(task, tally.skips, cfg.max_page_bytes):
        tally.truncated += rec.truncated
        doc = to_document(rec, cfg, tally.skips)
        if doc is not None:
            tally.documents += 1
            if cfg.language:
                tally.languages[doc.meta["language"]] += 1
            yield doc


def _part_prefix(index: int) -> str:
    return f"part-{index:06d}"


def _run_task(index: int, task: ReadTask, cfg: ExtractConfig, parts: str) -> _Tally:
    """In a worker: extract one task into Parquet parts `parts/part-<index>-*.parquet`."""
    tally = _Tally()
    write_document_shards(_task_documents(task, cfg, tally), Path(parts), shard_bytes=cfg.shard_bytes,
                          prefix=_part_prefix(index), meta_columns=META_COLUMNS)
    return tally


class _Progress:
    """Merges task tallies in task order: the bar, the totals and one warning per kind of damage."""

    def __init__(self, bar: tqdm) -> None:
        self.bar, self.total = bar, _Tally()

    def done(self, task: ReadTask, tally: _Tally) -> None:
        for reason, where in tally.skips.first.items():
            if reason in DAMAGE_REASONS | {"extract_error"} and reason not in self.total.skips.first:
                info(f"extract: skipped {where}: {reason} (further ones are only counted, in manifest.json)")
            self.total.skips.first.setdefault(reason, where)
        self.total.skips.counts.update(tally.skips.counts)
        self.total.documents += tally.documents
        self.total.truncated += tally.truncated
        self.total.languages.update(tally.languages)
        self.bar.update(task.size)
        self.bar.set_postfix_str(f"{self.total.documents} docs")


def _documents(tasks: list[ReadTask], cfg: ExtractConfig, workers: int, parts: Path,
               progress: _Progress) -> Iterator[Document]:
    """Every task's documents, in task order."""
    if workers <= 1:
        for task in tasks:
            tally = _Tally()
            yield from _task_documents(task, cfg, tally)
            progress.done(task, tally)
        return
    parts.mkdir()
    # spawn, not fork: the parent may hold threads (tqdm's monitor, pyarrow's pool) that a fork would break
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque[tuple[int, Any]] = deque()
        queue = iter(enumerate(tasks))

        def submit(n: int) -> None:
            for index, task in itertools.islice(queue, n):
                pending.append((index, pool.apply_async(_run_task, (index, task, cfg, str(parts)))))

        submit(2 * workers)  # bounded read-ahead: finished parts wait on disk, not in memory
        while pending:
            index, result = pending.popleft()
            tally = result.get()
            for part in sorted(parts.glob(f"{_part_prefix(index)}-*.parquet")):
                yield from iter_documents(part)
                part.unlink()
            progress.done(tasks[index], tally)
            submit(1)


def _check_config(cfg: ExtractConfig) -> None:
    if cfg.extractor not in EXTRACTORS:
        raise NanoforgeError(f"extract: unknown extractor {cfg.extractor!r} (choose {', '.join(EXTRACTORS)})")
    if cfg.extractor == "trafilatura":
        try:
            import trafilatura  # noqa: F401 — checked here so a missing package is one clear line
        except ImportError:
            raise NanoforgeError("extract: the trafilatura extractor needs `pip install trafilatura`") from None
    for name in ("shard_bytes", "max_page_bytes", "task_bytes"):
        if getattr(cfg, name) < 1:
            raise NanoforgeError(f"extract: {name} must be positive, got {getattr(cfg, name)}")
    for name in ("workers", "min_chars"):
        if getattr(cfg, name) < 0:
            raise NanoforgeError(f"extract: {name} must be ≥ 0, got {getattr(cfg, name)}")


def extract(cfg: ExtractConfig, inputs: list[Path], out: Path) -> dict[str, Any]:
    """The `extract` stage: read every input, extract main text, write document shards to `out`.

    Returns the manifest; refuses (NanoforgeError) when no document comes out.
    """
    _check_config(cfg)
    t0 = time.perf_counter()
    inputs, out = [Path(p) for p in inputs], Path(out)
    files = find_inputs(inputs, exclude=out)
    tasks = plan_tasks(files, cfg.task_bytes)
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, len(tasks)))
    bytes_in = sum(t.size for t in tasks)
    with atomic_dir(out) as tmp, tqdm(total=bytes_in, unit="B", unit_scale=True, desc="extract",
                                      dynamic_ncols=True) as bar:
        progress = _Progress(bar)
        parts = tmp / ".parts"  # hidden: never part of the artifact, removed before it is renamed into place
        counts = write_document_shards(_documents(tasks, cfg, workers, parts, progress), tmp,
                                       shard_bytes=cfg.shard_bytes, meta_columns=META_COLUMNS)
        shutil.rmtree(parts, ignore_errors=True)
        total = progress.total
        skipped = dict(sorted(total.skips.counts.items()))
        if counts["documents"] == 0:
            summary = ", ".join(f"{k} {v}" for k, v in skipped.items()) or "no records"
            raise NanoforgeError(f"extract: no documents in {len(files)} input file(s) ({summary})")
        seconds = time.perf_counter() - t0
        figures = {
            # every record read becomes a document or is skipped with a reason
            "files": len(files), "records": counts["documents"] + sum(skipped.values()),
            "documents": counts["documents"], "shards": counts["shards"], "bytes_in": bytes_in,
            "bytes_out": counts["bytes"], "skipped": skipped, "truncated": total.truncated,
            "languages": dict(total.languages.most_common(10)), "extractor": cfg.extractor,
            "workers": workers, "docs_per_s": round(counts["documents"] / seconds, 2),
            "mb_per_s": round(bytes_in / 1e6 / seconds, 3), "seconds": round(seconds, 3),
        }
        manifest = write_manifest(tmp, stage="extract", config=cfg,
                                  inputs={f"input{i}": p for i, p in enumerate(inputs)}, figures=figures)
    return manifest
