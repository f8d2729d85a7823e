"""The `clean` stage: a configurable chain of curation steps over document shards, with a report.

    nanoforge clean runs/demo/03-extract --out /tmp/clean [--config clean.toml]

Each step takes documents and yields documents (`nanoforge.data.filters.Step`); a filter drops a
document with a reason. The per-document steps run over the input files in a local process pool; then
exact duplicates (hash of the normalized text) and near-duplicates (MinHash LSH, connected components,
the smallest id kept per cluster) are removed across the whole corpus. Output, written atomically:

    docs-00000.parquet …            the clean documents (language and other metadata as columns)
    removed/removed-00000.parquet   every removed document with its step, reason and duplicate_of
    report.json                     counts per step and reason, bytes in and out, examples per reason
    manifest.json

The config names the steps in order and gives each step's settings (the dataclass fields of its class):

    [clean]
    steps = ["language", "gopher_repetition", "gopher_quality", "fineweb", "harmful", "pii",
             "exact_dedup", "near_dedup"]
    [clean.options.language]
    languages = ["en", "es"]
    [clean.options.near_dedup]
    bands = 14
    rows = 8
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nanoforge.artifacts import atomic_dir, atomic_write_json, write_manifest
from nanoforge.console import info
from nanoforge.data.dedup import EXACT_DUPLICATE, NEAR_DUPLICATE, ExactDeduplicator, LSHConfig, near_duplicates
from nanoforge.data.documents import Document, iter_documents, list_document_files, write_document_shards
from nanoforge.data.filters import (
    C4Filter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    HarmfulContentFilter,
    LanguageFilter,
    Step,
)
from nanoforge.data.pii import PIIRedactor
from nanoforge.errors import NanoforgeError

DOCUMENT_STEPS: dict[str, type[Step]] = {
    "language": LanguageFilter, "gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
    "c4": C4Filter, "fineweb": FineWebQualityFilter, "harmful": HarmfulContentFilter, "pii": PIIRedactor,
}
CORPUS_STEPS = ("exact_dedup", "near_dedup")
REMOVED_COLUMNS = ("step", "reason", "duplicate_of")


@dataclass
class CleanConfig:
    """The chain of steps and their settings; `c4` is off by default (its curly-brace rule drops code)."""

    steps: list[str] = field(default_factory=lambda: [
        "language", "gopher_repetition", "gopher_quality", "fineweb", "harmful", "pii", "exact_dedup", "near_dedup"])
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: int = 0  # processes for the per-document steps; 0 = one per core
    examples_per_reason: int = 3


def _check(cfg: CleanConfig) -> None:
    known = set(DOCUMENT_STEPS) | set(CORPUS_STEPS)
    unknown = [s for s in cfg.steps if s not in known]
    if unknown:
        raise NanoforgeError(f"clean: unknown step(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    stray = sorted(set(cfg.options) - set(cfg.steps))
    if stray:
        raise NanoforgeError(f"clean: options given for step(s) not in the chain: {', '.join(stray)}")
    for name in cfg.steps:
        if name in DOCUMENT_STEPS:
            _build_step(name, cfg)
    if "near_dedup" in cfg.steps:
        _lsh_config(cfg)


def _build_step(name: str, cfg: CleanConfig) -> Step:
    try:
        return DOCUMENT_STEPS[name](**cfg.options.get(name, {}), max_examples=cfg.examples_per_reason)
    except TypeError as e:
        raise NanoforgeError(f"clean: bad options for step {name!r} ({e})") from None


def _lsh_config(cfg: CleanConfig) -> LSHConfig:
    try:
        return LSHConfig(**cfg.options.get("near_dedup", {}))
    except TypeError as e:
        raise NanoforgeError(f"clean: bad options for step 'near_dedup' ({e})") from None


def _removed(doc: Document, step: str, reason: str, duplicate_of: str = "") -> Document:
    return replace(doc, meta={**doc.meta, "step": step, "reason": reason, "duplicate_of": duplicate_of})


def _clean_file(path: Path, cfg: CleanConfig) -> tuple[list[Document], list[Document], list[dict[str, Any]], int,
                                                      str | None]:
    """Run the per-document steps over one input file: (kept, removed, step reports, bytes in, file error).

    A file that cannot be read as documents (a missing or mistyped `text` column, bad JSON, …) is not
    fatal: the documents read before the error are kept, and the error is returned for the report.
    """
    steps = [(name, _build_step(name, cfg)) for name in cfg.steps if name in DOCUMENT_STEPS]
    kept, removed, bytes_in, error = [], [], 0, None
    try:
        for doc in iter_documents(path):
            bytes_in += _clean_one(doc, steps, kept, removed)
    except NanoforgeError as e:
        error = str(e)
    reports = [{"name": name, **step.report(),
                "redacted": {k.split("/", 1)[1]: v for k, v in step.stats.items() if k.startswith("redacted/")}}
               for name, step in steps]
    return kept, removed, reports, bytes_in, error


def _clean_one(doc: Document, steps: list[tuple[str, Step]], kept: list[Document], removed: list[Document]) -> int:
    """Pass one document through the steps, appending it to `kept` or `removed`; its size in bytes."""
    size = len(doc.text.encode("utf-8", "replace"))
    current: Document | None = doc
    for name, step in steps:
        current, reason = step.process(current)
        if current is None:
            removed.append(_removed(doc, name, reason or "dropped"))
            break
    if current is not None:
        kept.append(current)
    return size


def _merge_reports(reports: list[dict[str, Any]], per_reason: int) -> dict[str, Any]:
    merged = {"kept": 0, "dropped": 0, "modified": 0, "reasons": Counter(), "redacted": Counter(), "examples": {}}
    for r in reports:
        merged["redacted"].update(r.get("redacted", {}))
        for k in ("kept", "dropped", "modified"):
            merged[k] += r.get(k, 0)
        merged["reasons"].update(r.get("reasons", {}))
        for reason, examples in r.get("examples", {}).items():
            merged["examples"].setdefault(reason, []).extend(examples)
    merged["examples"] = {k: v[:per_reason] for k, v in merged["examples"].items()}
    merged["reasons"] = dict(merged["reasons"])
    merged["redacted"] = dict(merged["redacted"])
    return merged


def clean(cfg: CleanConfig, docs: Path, out: Path) -> dict[str, Any]:
    """Run the chain over the documents in `docs`; write clean shards, removed documents and the report."""
    _check(cfg)
    t0 = time.time()
    out = Path(out)
    files = [f for f in list_document_files(docs) if out.resolve() not in f.resolve().parents]  # not our output
    workers = min(cfg.workers or os.cpu_count() or 1, len(files))
    results = []
    with tqdm(total=len(files), desc="clean", unit="file", dynamic_ncols=True) as bar:
        if workers <= 1:
            for f in files:
                results.append(_clean_file(f, cfg))
                bar.update(1)
        else:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for result in pool.map(_clean_file, files, [cfg] * len(files)):
                    results.append(result)
                    bar.update(1)
    file_errors = [r[4] for r in results if r[4]]
    for err in file_errors:
        info(f"clean: skipped the rest of a file: {err}")
    kept = [d for r in results for d in r[0]]
    removed = [d for r in results for d in r[1]]
    step_reports: dict[str, dict[str, Any]] = {}
    for name in cfg.steps:
        if name in DOCUMENT_STEPS:
            step_reports[name] = _merge_reports([rep for r in results for rep in r[2] if rep["name"] == name],
                                                cfg.examples_per_reason)
    for name in (s for s in cfg.steps if s in CORPUS_STEPS):
        reason = EXACT_DUPLICATE if name == "exact_dedup" else NEAR_DUPLICATE
        dropped = (ExactDeduplicator().duplicates(kept) if name == "exact_dedup"
                   else near_duplicates(kept, _lsh_config(cfg)))
        gone = [d for d in kept if d.id in dropped]
        removed += [_removed(d, name, reason, dropped[d.id]) for d in gone]
        kept = [d for d in kept if d.id not in dropped]
        step_reports[name] = {"kept": len(kept), "dropped": len(gone), "modified": 0,
                              "reasons": {reason: len(gone)} if gone else {},
                              "examples": {reason: [{"id": d.id, "url": d.url, "text": d.text[:200]}
                                                    for d in gone[: cfg.examples_per_reason]]} if gone else {}}
    if not kept:
        top = Counter(f"{d.meta['step']}/{d.meta['reason']}" for d in removed).most_common(3)
        raise NanoforgeError(f"{docs}: every document was removed ({', '.join(f'{r} {n}' for r, n in top)})")
    meta_columns = sorted({k for d in kept for k in d.meta})
    with atomic_dir(out) as tmp:
        counts = write_document_shards(kept, tmp, meta_columns=meta_columns)
        (tmp / "removed").mkdir()
        write_document_shards(removed, tmp / "removed", prefix="removed", meta_columns=REMOVED_COLUMNS)
        report = {
            "documents_in": len(kept) + len(removed), "documents_out": len(kept), "removed": len(removed),
            "bytes_in": sum(r[3] for r in results), "bytes_out": counts["bytes"], "file_errors": file_errors,
            "steps": step_reports,
            "seconds": round(time.time() - t0, 2),
        }
        atomic_write_json(tmp / "report.json", report)
        figures = {k: v for k, v in report.items() if k != "steps"}
        figures["files_with_errors"] = len(file_errors)
        figures["removed_by_reason"] = {f"{name}/{reason}": n for name, rep in step_reports.items()
                                        for reason, n in rep["reasons"].items()}
        manifest = write_manifest(tmp, stage="clean", config=cfg, inputs={"docs": docs}, figures=figures)
    return manifest


def report_table(report: dict[str, Any]) -> str:
    """The report as a terminal table: one row per step and reason."""
    rows = [("step", "reason", "documents")]
    for name, rep in report["steps"].items():
        rows.append((name, "kept", str(rep["kept"])))
        rows += [(name, reason, str(n)) for reason, n in sorted(rep["reasons"].items())]
        if rep.get("modified"):
            rows.append((name, "modified", str(rep["modified"])))
        rows += [(name, f"redacted {kind}", str(n)) for kind, n in sorted(rep.get("redacted", {}).items())]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    lines.append(f"  {report['documents_in']} documents in, {report['documents_out']} out; "
                 f"{report['bytes_in'] / 1e6:.2f} MB in, {report['bytes_out'] / 1e6:.2f} MB out")
    return "\n".join(lines)
