"""What every benchmark script shares: the CPU's name for the record, and appending the record to --out."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def append_record(path: Path, record: dict) -> None:
    """One JSON line at the end of `path` (created with its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {path}")
