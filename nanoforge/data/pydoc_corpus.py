"""The embedded default corpus: the Python standard library documentation as `pydoc` renders it.

Every Python installation carries it, so nanoforge can train on real English technical prose with no
download. Modules are imported and rendered in child processes (imports have side effects) and written
as Document shards, one document per module:

    nanoforge corpus --out /tmp/pydoc-docs
"""

from __future__ import annotations

import contextlib
import html
import importlib
import io
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import types
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
# Object reprs carry memory addresses ("<object object at 0x7f…>", "handle 7f…") that differ per run; in
# pydoc's HTML the spaces around them are "&nbsp;".
_ADDRESS = re.compile(r"(?: |&nbsp;)at(?: |&nbsp;)0x[0-9a-fA-F]+")
_HANDLE = re.compile(r"(handle(?: |&nbsp;))[0-9a-fA-F]+")
# A fixed environment for the rendering processes: pages such as os.environ or cgi.FieldStorage print
# the environment, which must neither leak into a corpus (it may hold secrets) nor make it vary.
_CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/user", "LANG": "C.UTF-8"}
_ORIGINAL_HOME = os.path.expanduser("~")


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


def _machine_paths() -> list[tuple[str, str]]:
    """Paths of this installation and checkout, longest first, with the placeholder that replaces each."""
    pairs = {sys.prefix: "<prefix>", sys.exec_prefix: "<prefix>", sys.base_prefix: "<python>",
             os.getcwd(): "<cwd>", str(Path(__file__).resolve().parents[2]): "<src>",
             _ORIGINAL_HOME: "<home>"}
    # directories the documentation itself names in examples ("/tmp/myimport.zip") stay as they are
    generic = {"/", "/tmp", "/var/tmp", "/usr", "/usr/local", "/home", "/opt", "/srv"}
    return sorted(((p, r) for p, r in pairs.items() if p.rstrip("/") and p.rstrip("/") not in generic),
                  key=lambda pr: -len(pr[0]))


def _sanitize_process(names: list[str] | None = None) -> None:
    """Run in each rendering process before any module is rendered (see _CLEAN_ENV). Then every module
    of the run (`names`) is imported, in order: what pydoc writes about a module depends on what else is
    imported (a class defined elsewhere is listed only while its home module is not loaded), so every
    process renders from the same set of loaded modules, whichever modules it is handed."""
    global _ORIGINAL_HOME
    _ORIGINAL_HOME = os.path.expanduser("~")  # already baked into e.g. site.USER_BASE
    # How the run was launched shows in pages such as sys's (sys.path, sys.modules, the importer cache) and
    # rlcompleter's (the main module): a script's directory or the current one first on sys.path, the
    # PYTHONPATH entries, `__main__` or spawn's `__mp_main__`. Those become the same for every launch.
    launch = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    if sys.path and not sys.path[0].startswith(os.path.join(sys.base_prefix, "lib")):
        launch.add(sys.path[0])  # the script's directory, or "" / the cwd for -c and -m
    sys.path[:] = [p for p in sys.path if p and p not in launch]
    sys.path_importer_cache.clear()
    sys.modules["__main__"] = types.ModuleType("__main__")
    sys.modules.pop("__mp_main__", None)
    os.environ.clear()
    os.environ.update(_CLEAN_ENV)
    sys.argv = ["python"]
    sys.orig_argv = ["python"]
    sink = io.StringIO()
    for name in names or []:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), contextlib.suppress(BaseException):
            importlib.import_module(name)


def render_module(name: str, fmt: str = "text") -> str | None:
    """pydoc's page for module `name` as plain text (`fmt="text"`) or an HTML page (`fmt="html"`), or
    None if the module cannot be imported here.

    Call it in a process prepared by `_sanitize_process`; machine-specific paths and memory addresses
    are replaced by placeholders, so the page is the same on every run of the same Python.
    """
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            import pydoc

            module = importlib.import_module(name)
            # set by the warnings machinery when the module warned; its "version" counts filter changes
            # made anywhere in the process, so it says nothing about the module and differs run to run
            with contextlib.suppress(TypeError, AttributeError):  # a non-module object in sys.modules
                vars(module).pop("__warningregistry__", None)
            if fmt == "html":
                text = pydoc.html.page(pydoc.describe(module), pydoc.html.document(module, name))
            else:
                text = _FILE_SECTION.sub("\n", pydoc.render_doc(module, renderer=pydoc.plaintext))
    except BaseException:  # ImportError, platform-specific modules, SystemExit from odd imports
        return None
    text = _HANDLE.sub(r"\1", _ADDRESS.sub("", text))
    for path, placeholder in _machine_paths():
        text = text.replace(path, html.escape(placeholder) if fmt == "html" else placeholder)
    return text.strip() + "\n"


def _render_many(names: list[str], fmt: str = "text") -> list[tuple[str, str | None]]:
    return [(n, render_module(n, fmt)) for n in names]


def render_modules(names: list[str], workers: int, fmt: str = "text") -> dict[str, str | None]:
    """Render many modules in sanitized child processes (imports have side effects), with a progress bar."""
    n_chunks = max(1, workers * 4)
    chunks = [c for c in (names[i::n_chunks] for i in range(n_chunks)) if c]
    rendered: dict[str, str | None] = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=_sanitize_process,
                             initargs=(names,)) as pool:
        bar = tqdm(total=len(names), desc="pydoc", unit="mod", leave=False)
        for part in pool.map(_render_many, chunks, [fmt] * len(chunks)):
            rendered.update(part)
            bar.update(len(part))
        bar.close()
    return rendered


def selected_modules(cfg: CorpusConfig) -> list[str]:
    names = cfg.modules or stdlib_modules()
    if cfg.max_modules is not None:
        names = names[: cfg.max_modules]
    if not names:
        raise NanoforgeError("corpus: no modules selected")
    return names


def build_corpus(cfg: CorpusConfig, out: Path) -> dict:
    """The `corpus` stage: render the modules as plain text and write Parquet document shards to `out`."""
    names = selected_modules(cfg)
    t0 = time.time()
    rendered = render_modules(names, cfg.workers)
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
