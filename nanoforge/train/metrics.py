"""`metrics.jsonl` (one JSON object per logged step) and the loss-curve PNG drawn from it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from nanoforge.artifacts import atomic_write_bytes, atomic_write_text, to_jsonable


class MetricsLog:
    """Append-only JSONL log; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, *, resume_step: int | None = None):
        self.path = path
        if resume_step is None:
            atomic_write_text(path, "")
        elif path.exists():
            self._truncate(resume_step)
        self._f = open(path, "a", encoding="utf-8")

    def _truncate(self, step: int) -> None:
        kept = [line for line in self.read(self.path) if line.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def rewind(self, step: int) -> None:
        """Drop the lines past `step` (the run went back to a checkpoint of that step)."""
        self._f.close()
        self._truncate(step)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(to_jsonable(record)) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        rows = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: ignore it
                continue
        return rows


def plot_series(rows: list[dict[str, Any]], png: Path, series: list[tuple[str, str, str]], title: str,
                ylabel: str = "") -> None:
    """Draw each (metrics key, line style, label) of `series` against step into `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style, label in series:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def plot_losses(metrics_path: Path, png: Path, title: str = "loss") -> None:
    """Draw train loss (and val loss where logged) against step into `png`."""
    plot_series(MetricsLog.read(metrics_path), png, [("loss", "-", "train"), ("val_loss", "o-", "val")], title,
                ylabel="loss (nats/token)")
