"""Artifacts on disk: atomic writes, content hashes and the `manifest.json` contract (DESIGN.md §1).

Every stage writes its output directory through these helpers, so a kill at any moment leaves either the
old artifact or the new one, never half of one:

    with atomic_dir(out) as tmp:          # build everything in a sibling temp directory …
        (tmp / "data.bin").write_bytes(b)
        write_manifest(tmp, stage="tokens", config=cfg, inputs={"docs": docs_dir}, figures={…})
    # … which is renamed over `out` only when the block succeeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nanoforge import __version__
from nanoforge.errors import NanoforgeError

MANIFEST = "manifest.json"
# safetensors writes the header's metadata from a hash map whose order changes from process to process, so
# two keys made equal weights into different files; the one key transformers reads keeps them byte-identical
SAFETENSORS_METADATA = {"format": "pt"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable (where the OS allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (before it is renamed into place)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _host() -> str:
    return re.sub(r"[^\w-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's process
        return True
    return True


def _remove_stale_tmp_dirs(out: Path) -> None:
    """Remove the temp directories of `out` that killed writers left: `.{out.name}.HOST.PID.XXXXXXXX.tmp`
    of this host whose PID is gone. A writer on another host (a shared filesystem), a live PID (perhaps
    reused: then the leftover waits for a later call) and a name without them (older versions) are left be.
    """
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return
    head, host = f".{out.name}.", _host()
    for p in out.parent.iterdir():
        name = p.name
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        fields = name[len(head):-len(".tmp")].split(".")  # HOST, PID, mkdtemp's letters (no dots in either)
        if len(fields) == 3 and fields[0] == host and fields[1].isdigit() and p.is_dir() and not _alive(
                int(fields[1])):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path | str) -> Iterator[Path]:
    """Yield a fresh temp directory beside `out`; on success it replaces `out` in (nearly) one rename.

    If `out` already exists it is first moved aside and deleted only after the new one is in place, so
    an interruption leaves either the old or the new directory (plus, at worst, a `.old` leftover that
    the next call cleans up). On an exception the temp directory is removed and `out` is untouched. A
    killed process cannot remove its temp directory; it is named with the host and process id, so that
    the next call for `out` can tell it from a live writer's and remove it.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(f".{out.name}.old")
    if old.exists() and not out.exists():  # interrupted between the two renames last time
        os.replace(old, out)
    shutil.rmtree(old, ignore_errors=True)
    _remove_stale_tmp_dirs(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{_host()}.{os.getpid()}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Files under `root` that make up the artifact (sorted; the manifest itself and dotfiles excluded)."""
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.name != MANIFEST and not any(part.startswith(".") for part in rel.parts):
            files.append(p)
    return files


def content_hash(path: Path | str) -> str:
    """A sha256 over the artifact's files (names and bytes); for a single file, of that file."""
    path = Path(path)
    if not path.exists():
        raise NanoforgeError(f"{path}: does not exist")
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in tree_files(path):
        h.update(str(f.relative_to(path)).encode())
        h.update(b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def input_hash(path: Path | str) -> str:
    """The hash that identifies an input: its manifest's `content_hash` if it is an artifact, else its bytes."""
    path = Path(path)
    m = path / MANIFEST if path.is_dir() else None
    if m is not None and m.exists():
        try:
            recorded = json.loads(m.read_text()).get("content_hash")
        except (json.JSONDecodeError, OSError):
            recorded = None
        if recorded:
            return recorded
    return content_hash(path)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def versions() -> dict[str, str]:
    v = {"nanoforge": __version__, "python": platform.python_version()}
    for mod in ("torch", "tokenizers", "numpy", "pyarrow"):
        m = sys.modules.get(mod)
        if m is not None:
            v[mod] = getattr(m, "__version__", "?")
    return v


def write_manifest(
    out: Path,
    *,
    stage: str,
    config: Any,
    inputs: dict[str, Path | str] | None = None,
    figures: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `out/manifest.json`: stage, full config, input hashes, figures, versions, output hash."""
    out = Path(out)
    manifest = {
        "stage": stage,
        "config": to_jsonable(config),
        "inputs": {k: {"path": str(p), "hash": input_hash(p)} for k, p in (inputs or {}).items()},
        "figures": to_jsonable(figures or {}),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "content_hash": content_hash(out),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(path: Path | str) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None if it has none (or it is unreadable)."""
    m = Path(path) / MANIFEST
    if not m.exists():
        return None
    try:
        return json.loads(m.read_text())
    except (json.JSONDecodeError, OSError):
        return None
