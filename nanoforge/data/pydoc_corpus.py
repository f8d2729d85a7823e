"""The embedded default corpus: the Python standard library documentation as `pydoc` renders it.

Every Python installation carries it, so nanoforge can train on real English technical prose with no
download. Modules are imported and rendered in child processes (imports have side effects) and written
as Document shards, one document per module:

    nanoforge corpus --out runs/demo/01-corpus
"""

from __future__ import annotations

import contextlib
import importlib
import io
import multiprocessing as mp
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from nanoforge.artifacts import atomic_dir, write_manifest
from nanoforge.data.documents import Document, write_document_shards
from nanoforge.errors import NanoforgeError

# Modules whose import opens windows or browsers, prints, or that only exist for packaging/IDLE.
EXCLUDED = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
    "venv", "pydoc_data", "msilib", "msvcrt", "nt", "winreg", "winsound", "_winapi",
})
# The FILE section names a path on this machine; it says nothing about the module.
_FILE_SECTION = re.compile(r"\nFILE\n    [^\n]*\n?")


@dataclass
class CorpusConfig:
    """Which standard-library modules to render (empty = every public top-level module)."""

    modules: list[str] = field(default_factory=list)
    max_modules: int | None = None
    workers: int = 2


def stdlib_modules() -> list[str]:
    """Public top-level standard-library module names, sorted."""
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:  # Python 3.9 has no list; fall back to what pkgutil sees in the stdlib dir
        import pkgutil
        import sysconfig

        stdlib = sysconfig.get_paths()["stdlib"]
        names = {m.name for m in pkgutil.iter_modules([stdlib])}
    return sorted(n for n in names if not n.startswith("_") and n not in EXCLUDED)


def render_module(name: str) -> str | None:
    """pydoc's plain-text page for module `name`, or None if it cannot be imported here."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            import pydoc

            module = importlib.import_module(name)
            text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    except BaseException:  # ImportError, platform-specific modules, SystemExit from odd imports
        return None
    return _FILE_SECTION.sub("\n", text).strip() + "\n"


def _render_many(names: list[str]) -> list[tuple[str, str | None]]:
    return [(n, render_module(n)) for n in names]


def build_corpus(cfg: CorpusConfig, out: Path) -> dict:
    """The `corpus` stage: render the modules and write Parquet document shards to `out`."""
    names = cfg.modules or stdlib_modules()
    if cfg.max_modules is not None:
        names = names[: cfg.max_modules]
    if not names:
        raise NanoforgeError("corpus: no modules selected")
    t0 = time.time()
    chunks = [names[i::max(1, cfg.workers * 4)] for i in range(max(1, cfg.workers * 4))]
    rendered: dict[str, str | None] = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers), mp_context=ctx) as pool:
        bar = tqdm(total=len(names), desc="pydoc", unit="mod", leave=False)
        for part in pool.map(_render_many, [c for c in chunks if c]):
            rendered.update(part)
            bar.update(len(part))
        bar.close()
    docs = [
        Document(id=n, text=rendered[n], url=f"pydoc:{n}", source="python-stdlib-pydoc")
        for n in names if rendered.get(n)
    ]
    missing = sorted(n for n in names if not rendered.get(n))
    if not docs:
        raise NanoforgeError("corpus: none of the selected modules could be imported and rendered")
    with atomic_dir(out) as tmp:
        counts = write_document_shards(docs, tmp)
        figures = {**counts, "modules_skipped": missing, "python": platform.python_version(),
                   "seconds": round(time.time() - t0, 2)}
        manifest = write_manifest(tmp, stage="corpus", config=cfg, figures=figures)
    return manifest
