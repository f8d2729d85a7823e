"""The `clean` stage: a configurable chain of curation steps over document shards, with a report.

    nanoforge clean runs/demo/03-extract --out /tmp/clean [--config clean.toml]

Each step takes documents and yields documents (`nanoforge.data.filters.Step`); a filter drops a
document with a reason. Every input file is a shard and a task: the per-document steps run over it and
it writes its kept documents, exact-dedup keys and MinHash band rows to a work directory beside the
output (`.OUT.work/`). Tasks run in a local process pool, or on Ray with `executor="ray"` (on a
multi-node cluster the paths must be on a shared filesystem). A finished shard is never redone: a killed
run started again with the same inputs and config resumes at the first unfinished shard.

Then the corpus-wide steps, out of core: exact duplicates (hash of the normalized text, 16 bytes per
document in memory) and near-duplicates (MinHash LSH: one band of every shard in memory at a time,
buckets -> verified edges -> union-find; the smallest id of each cluster is kept). Last, each shard is
rewritten without its duplicates. Output, written atomically (the work directory is removed after):

    docs-SSSSS.parquet              the clean documents of input file SSSSS (language etc. as columns)
    removed/removed-SSSSS.parquet   every removed document with its step, reason and duplicate_of
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

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nanoforge.artifacts import atomic_dir, atomic_write_json, to_jsonable, write_manifest
from nanoforge.console import info
from nanoforge.data.dedup import (
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    LSHConfig,
    begin_signatures,
    cluster,
    drops_by_key,
    exact_key,
    find_edges,
    write_shard_signatures,
)
from nanoforge.data.documents import Document, iter_documents, list_document_files, write_document_shards
from nanoforge.data.executors import open_executor
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
    """The chain of steps and their settings; `c4` is off by default (it rewrites pages down to
    their lines that end in punctuation, which strips code)."""

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


def _shard_dir(work: Path, index: int) -> Path:
    return work / f"shard-{index:05d}"


def _clean_shard(path: str, index: int, work: str, cfg: CleanConfig, root: str) -> int:
    """One task: the per-document steps over input file `path` (of the input `root`, which the ids the
    documents are given name it under), written to `work/shard-NNNNN/`.

    A file that cannot be read as documents (a missing or mistyped `text` column, bad JSON, …) is not
    fatal: the documents read before the error are kept and the error goes to the report. The shard
    directory appears (atomically) only when everything else of this shard is on disk, so its presence
    is what marks the shard done.
    """
    steps = [(name, _build_step(name, cfg)) for name in cfg.steps if name in DOCUMENT_STEPS]
    kept: list[Document] = []
    removed: list[Document] = []
    bytes_in, error = 0, None
    try:
        for doc in iter_documents(path, root=root):
            bytes_in += _clean_one(doc, steps, kept, removed)
    except NanoforgeError as e:
        error = str(e)
    if "near_dedup" in cfg.steps:
        lsh = _lsh_config(cfg)
        write_shard_signatures(Path(work) / "near", index, [d.id for d in kept],
                               lsh.hasher().signatures(d.text for d in kept), lsh)
    reports = {name: {**step.report(), "redacted": {k.split("/", 1)[1]: v for k, v in step.stats.items()
                                                    if k.startswith("redacted/")}} for name, step in steps}
    with atomic_dir(_shard_dir(Path(work), index)) as tmp:
        write_document_shards(kept, tmp, prefix="kept", shard_bytes=1 << 62,
                              meta_columns=sorted({k for d in kept for k in d.meta}))
        write_document_shards(removed, tmp, prefix="removed", shard_bytes=1 << 62, meta_columns=REMOVED_COLUMNS)
        np.save(tmp / "exact.npy", np.frombuffer(b"".join(exact_key(d.text) for d in kept), dtype=np.uint8
                                                 ).reshape(-1, 16))
        atomic_write_json(tmp / "result.json", {"file": path, "ids": [d.id for d in kept], "removed": len(removed),
                                                "bytes_in": bytes_in, "error": error, "reports": reports})
    return len(kept)


def _finish_shard(index: int, work: str, out: str, drops: dict[str, list[str]], per_reason: int,
                  ) -> dict[str, Any]:
    """One task: shard `index` without its duplicates -> `out/docs-NNNNN.parquet`, removed documents with
    their reason -> `out/removed/removed-NNNNN.parquet`; returns counts and dedup examples."""
    shard = _shard_dir(Path(work), index)
    kept, removed, examples = [], [], {}
    for doc in iter_documents(shard / "kept-00000.parquet") if (shard / "kept-00000.parquet").exists() else ():
        if doc.id in drops:
            step, reason, of = drops[doc.id]
            removed.append(_removed(doc, step, reason, of))
            ex = examples.setdefault(step, [])
            if len(ex) < per_reason:
                ex.append({"id": doc.id, "url": doc.url, "text": doc.text[:200]})
        else:
            kept.append(doc)
    if (shard / "removed-00000.parquet").exists():
        removed = list(iter_documents(shard / "removed-00000.parquet")) + removed
    out = Path(out)
    counts = write_document_shards(kept, out, shard_bytes=1 << 62, first_shard=index,
                                   meta_columns=sorted({k for d in kept for k in d.meta}))
    write_document_shards(removed, out / "removed", prefix="removed", shard_bytes=1 << 62, first_shard=index,
                          meta_columns=REMOVED_COLUMNS)
    return {"documents": counts["documents"], "bytes": counts["bytes"], "removed": len(removed),
            "examples": examples}


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


def _exact_duplicates(work: Path, shards: int, ids: list[str], gone: dict[str, list[str]]) -> dict[str, str]:
    """{dropped id: kept id} over the shards' 16-byte keys; documents already in `gone` take no part."""
    keys = np.concatenate([np.load(_shard_dir(work, s) / "exact.npy") for s in range(shards)])
    return drops_by_key((key.tobytes(), doc_id) for doc_id, key in zip(ids, keys, strict=True) if doc_id not in gone)


def _refuse_duplicate_ids(docs: Path, results: list[dict[str, Any]], ids: list[str]) -> None:
    """The dedup steps tell documents apart by id (the drop map is keyed by it): with two documents of one
    id, dropping the duplicate would drop the other as well, so such a corpus is refused."""
    counts = Counter(ids)
    if len(counts) == len(ids):
        return
    dup = next(i for i in ids if counts[i] > 1)
    where = [r["file"] for r in results if dup in r["ids"]]
    repeated = sum(n > 1 for n in counts.values())
    raise NanoforgeError(f"{docs}: {repeated} document id(s) occur more than once, e.g. {dup!r} "
                         f"(in {', '.join(where)}); exact_dedup and near_dedup need unique ids")


def _work_state(cfg: CleanConfig, files: list[Path]) -> dict[str, Any]:
    """What a resumed run must share with the run that left the work directory: config and input files."""
    return {"config": to_jsonable(cfg),
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _open_work(out: Path, cfg: CleanConfig, files: list[Path]) -> tuple[Path, int]:
    """The work directory beside `out` (reset if it belongs to other inputs or settings); shards done."""
    work = out.with_name(f".{out.name}.work")
    state = _work_state(cfg, files)
    try:
        previous = json.loads((work / "state.json").read_text())
    except (OSError, ValueError):
        previous = None
    if previous != state:
        if work.exists():
            info(f"clean: {work} is from other inputs or settings; starting over")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        atomic_write_json(work / "state.json", state)
    if "near_dedup" in cfg.steps:
        begin_signatures(work / "near", _lsh_config(cfg), len(files))
    return work, sum(_shard_dir(work, i).exists() for i in range(len(files)))


def clean(cfg: CleanConfig, docs: Path, out: Path, *, executor: str = "local", address: str | None = None,
          ) -> dict[str, Any]:
    """Run the chain over the documents in `docs`; write clean shards, removed documents and the report.

    `executor` is "local" (a process pool of `cfg.workers`) or "ray" (`address` names a running cluster;
    without it a local Ray instance is started). Both give the same output.
    """
    _check(cfg)
    t0 = time.time()
    out = Path(out)
    files = [f for f in list_document_files(docs) if out.resolve() not in f.resolve().parents]  # not our output
    if not files:
        raise NanoforgeError(f"{docs}: no document files outside the output directory {out}")
    work, done = _open_work(out, cfg, files)
    todo = [i for i in range(len(files)) if not _shard_dir(work, i).exists()]
    if done:
        info(f"clean: resuming, {done} of {len(files)} shards already done in {work}")
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, len(files)))
    with open_executor(executor, workers=workers, address=address) as ex:
        with tqdm(total=len(files), initial=done, desc="clean", unit="shard", dynamic_ncols=True) as bar:
            for _ in ex.map_unordered(_clean_shard, [(str(files[i]), i, str(work), cfg, str(docs)) for i in todo]):
                bar.update(1)
        results = [json.loads((_shard_dir(work, s) / "result.json").read_text()) for s in range(len(files))]
        file_errors = [r["error"] for r in results if r["error"]]
        for err in file_errors:
            info(f"clean: skipped the rest of a file: {err}")
        step_reports: dict[str, dict[str, Any]] = {
            name: _merge_reports([r["reports"][name] for r in results], cfg.examples_per_reason)
            for name in cfg.steps if name in DOCUMENT_STEPS}
        ids = [i for r in results for i in r["ids"]]
        if any(s in CORPUS_STEPS for s in cfg.steps):
            _refuse_duplicate_ids(docs, results, ids)
        gone: dict[str, list[str]] = {}  # dropped id -> [step, reason, duplicate_of]
        for name in (s for s in cfg.steps if s in CORPUS_STEPS):
            if name == "exact_dedup":
                reason, dropped = EXACT_DUPLICATE, _exact_duplicates(work, len(files), ids, gone)
            else:
                reason = NEAR_DUPLICATE
                find_edges(work / "near", exclude=gone)
                dropped = cluster(work / "near")
            gone.update({d: [name, reason, kept] for d, kept in dropped.items()})
            step_reports[name] = {"kept": len(ids) - len(gone), "dropped": len(dropped), "modified": 0,
                                  "reasons": {reason: len(dropped)} if dropped else {}, "examples": {}}
        if len(gone) == len(ids):
            top = Counter({f"{n}/{why}": c for n, rep in step_reports.items()
                           for why, c in rep["reasons"].items()}).most_common(3)
            raise NanoforgeError(f"{docs}: every document was removed ({', '.join(f'{r} {n}' for r, n in top)})")
        by_shard = [{i: gone[i] for i in r["ids"] if i in gone} for r in results]
        with atomic_dir(out) as tmp:
            (tmp / "removed").mkdir()
            finished: list[dict[str, Any]] = [{} for _ in files]
            args = [(s, str(work), str(tmp), by_shard[s], cfg.examples_per_reason) for s in range(len(files))]
            for s, res in tqdm(ex.map_unordered(_finish_shard, args), total=len(files), desc="write",
                               unit="shard", dynamic_ncols=True):
                finished[s] = res
            for name in (s for s in cfg.steps if s in CORPUS_STEPS):
                examples = sorted((e for f in finished for e in f["examples"].get(name, [])), key=lambda e: e["id"])
                reason = EXACT_DUPLICATE if name == "exact_dedup" else NEAR_DUPLICATE
                step_reports[name]["examples"] = {reason: examples[:cfg.examples_per_reason]} if examples else {}
            report = {
                "documents_in": len(ids) + sum(r["removed"] for r in results),
                "documents_out": sum(f["documents"] for f in finished),
                "removed": sum(f["removed"] for f in finished),
                "bytes_in": sum(r["bytes_in"] for r in results), "bytes_out": sum(f["bytes"] for f in finished),
                "shards": len(files), "shards_resumed": done, "file_errors": file_errors, "steps": step_reports,
                "seconds": round(time.time() - t0, 2),
            }
            atomic_write_json(tmp / "report.json", report)
            figures = {k: v for k, v in report.items() if k != "steps"}
            figures["files_with_errors"] = len(file_errors)
            figures["removed_by_reason"] = {f"{name}/{reason}": n for name, rep in step_reports.items()
                                            for reason, n in rep["reasons"].items()}
            manifest = write_manifest(tmp, stage="clean", config=cfg, inputs={"docs": docs}, figures=figures)
    shutil.rmtree(work, ignore_errors=True)
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
