"""The run report: one self-contained HTML page (and a Markdown twin) of everything a run did.

    nanoforge report runs/demo                 # -> runs/demo/report/index.html, report.md, *.png

It reads only artifacts: each stage directory's `manifest.json` and `metrics.jsonl`. Sections: the
corpus funnel (pages → documents → clean → tokens, with removal reasons), the corpus-size projection,
tokenizer compression, every training stage's curves (pretrain, SFT, reward, DPO, PPO, GRPO: whatever
the run has), throughput and MFU, the eval table across stages with sample conversations (from the
`eval` stage), each stage's figures, and the environment. Plots are PNGs embedded as data URIs in the
HTML and written beside the Markdown. Every string that came from a run is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoforge.artifacts import atomic_dir, read_manifest, write_manifest
from nanoforge.errors import NanoforgeError
from nanoforge.train.metrics import MetricsLog

# metrics.jsonl keys that are bookkeeping rather than curves worth a plot
_NOT_CURVES = {"step", "epoch", "time", "seconds", "elapsed", "tokens", "lr_scale", "skipped", "rollbacks",
               "skipped_steps", "iteration"}
_MAX_SERIES = 6


@dataclass
class ReportConfig:
    title: str = ""  # default: "nanoforge run <name>"
    max_examples: int = 3  # examples shown per removal reason and sample conversations per stage


@dataclass
class Section:
    """One part of the report: a title, paragraphs and tables, and plots (PNG bytes with a caption)."""

    title: str
    paragraphs: list[str]
    tables: list[tuple[list[str], list[list[Any]]]]
    plots: list[tuple[str, bytes]]


def _stages(run_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(stage name, directory, manifest) of each finished stage of the run, in run order."""
    out = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = read_manifest(d)
        if m is not None and m.get("stage") != "report":
            out.append((m.get("stage", d.name), d, m))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _scalars(figures: dict[str, Any]) -> list[list[Any]]:
    return [[k, _fmt(v)] for k, v in figures.items() if isinstance(v, (int, float, str, bool)) and v is not None]


def _plot_metrics(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """Small multiples of the numeric series of a metrics.jsonl against step; None if nothing to draw."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        step = r.get("step")
        if not isinstance(step, (int, float)):
            continue
        for k, v in r.items():
            if k not in _NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                series.setdefault(k, []).append((step, float(v)))
    keys = [k for k in series if len(series[k]) >= 2]
    # the headline curves first: losses, then rewards and accuracies, then the rest
    keys.sort(key=lambda k: (0 if "loss" in k else 1 if ("reward" in k or "acc" in k) else 2, k))
    keys = keys[:_MAX_SERIES]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), dpi=90, squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        xs, ys = zip(*series[k], strict=True)
        ax.plot(xs, ys, "-" if len(xs) > 12 else "o-", linewidth=1, markersize=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _funnel(stages: dict[str, dict[str, Any]], per_reason: int) -> Section | None:
    rows = []
    crawl, extract, clean, tokens = (stages.get(k, {}) for k in ("crawl", "extract", "clean", "tokens"))
    if crawl:
        rows.append(["crawl", "pages fetched", _fmt(crawl.get("pages")), _fmt(crawl.get("bytes"))])
    if extract:
        rows.append(["extract", "documents", _fmt(extract.get("documents")), _fmt(extract.get("bytes_out"))])
    if clean:
        rows.append(["clean", "documents kept", _fmt(clean.get("documents_out")), _fmt(clean.get("bytes_out"))])
    if tokens:
        rows.append(["tokens", "tokens", _fmt(tokens.get("tokens")), _fmt(tokens.get("bytes"))])
    if not rows:
        return None
    tables = [(["stage", "what", "count", "bytes"], rows)]
    removed = clean.get("removed_by_reason") or {}
    if removed:
        tables.append((["step/reason", "documents removed"], [[k, _fmt(v)] for k, v in sorted(removed.items())]))
    paragraphs = ["What each corpus stage kept, and why the clean stage removed what it removed."]
    return Section("Corpus funnel", paragraphs, tables, [])


def _projection(stats: dict[str, Any]) -> Section | None:
    if not stats:
        return None
    rows = [[k, _fmt(stats.get(k))] for k in ("documents", "bytes", "words", "tokens", "bytes_per_token",
                                               "tokens_counted_with") if k in stats]
    paragraphs = []
    target = stats.get("target_tokens")
    for key, label in (("projection_measured", "at the measured bytes/token"),
                       ("projection_4_bytes_per_token", "at 4 bytes/token")):
        proj = stats.get(key)
        if isinstance(proj, dict) and target:
            paragraphs.append(f"{_fmt(float(target))} tokens {label} would be {_fmt(proj.get('tb'))} TB of text.")
    return Section("Corpus size and projection", paragraphs, [(["figure", "value"], rows)], [])


def _tokenizer(fig: dict[str, Any]) -> Section | None:
    if not fig:
        return None
    rows = [[k, _fmt(v)] for k, v in fig.items() if isinstance(v, (int, float, str)) and k != "special_tokens"]
    return Section("Tokenizer", ["Compression is measured on held-out text."], [(["figure", "value"], rows)], [])


def _throughput(fig: dict[str, Any]) -> Section | None:
    keys = ("params", "steps", "tokens", "seconds", "tok_per_s", "mfu", "dtype", "device", "world_size",
            "val_loss", "val_bpb", "unigram_entropy", "skipped_steps", "rollbacks")
    rows = [[k, f"{100 * fig[k]:.1f}%" if k == "mfu" and isinstance(fig[k], float) else _fmt(fig[k])]
            for k in keys if k in fig]
    return Section("Pretraining throughput and MFU", [], [(["figure", "value"], rows)], []) if rows else None


def _evals(stage_dirs: list[tuple[str, Path, dict[str, Any]]], per_stage: int) -> Section | None:
    """The eval stage's `eval.json`: {"models": {name: {metric: value}}, "samples": {name: [..]}}."""
    for name, d, _ in stage_dirs:
        if name == "eval" and (d / "eval.json").exists():
            data = json.loads((d / "eval.json").read_text())
            models = data.get("models", {})
            metrics = sorted({k for v in models.values() for k in v})
            rows = [[m, *(_fmt(v.get(k, "")) for k in metrics)] for m, v in models.items()]
            paragraphs = [f"{m}: {desc}" for m, desc in data.get("descriptions", {}).items()]
            for model, samples in data.get("samples", {}).items():
                for s in samples[:per_stage]:
                    paragraphs.append(f"[{model}] user: {s.get('prompt', '')}\n→ {s.get('reply', '')}")
            return Section("Evaluation across stages", paragraphs, [(["model", *metrics], rows)], [])
    return None


def _environment(stage_dirs: list[tuple[str, Path, dict[str, Any]]]) -> Section:
    versions: dict[str, str] = {}
    for _, _, m in stage_dirs:
        versions.update({k: str(v) for k, v in (m.get("versions") or {}).items()})
    rows = [["python", platform.python_version()], ["platform", platform.platform()],
            ["cpu cores", str(os.cpu_count())], *([k, v] for k, v in sorted(versions.items()))]
    return Section("Environment", ["Versions as recorded in the stages' manifests."], [(["", ""], rows)], [])


def collect(run_dir: Path, cfg: ReportConfig) -> tuple[str, list[Section]]:
    """The report's title and sections, from the artifacts under `run_dir`."""
    if not run_dir.is_dir():
        raise NanoforgeError(f"{run_dir}: not a run directory")
    stage_dirs = _stages(run_dir)
    if not stage_dirs:
        raise NanoforgeError(f"{run_dir}: no finished stage (no manifest.json in any subdirectory)")
    figures = {name: m.get("figures", {}) for name, _, m in stage_dirs}
    sections = [s for s in (_funnel(figures, cfg.max_examples), _projection(figures.get("stats", {})),
                            _tokenizer(figures.get("tokenizer", {})), _throughput(figures.get("pretrain", {})))
                if s is not None]
    curves = []
    for name, d, _ in stage_dirs:
        if (d / "metrics.jsonl").exists():
            png = _plot_metrics(MetricsLog.read(d / "metrics.jsonl"), f"{name} ({d.name})")
            if png:
                curves.append((f"{name}: metrics.jsonl against step", png))
    if curves:
        sections.append(Section("Training curves", ["Every training stage's logged series."], [], curves))
    ev = _evals(stage_dirs, cfg.max_examples)
    if ev is not None:
        sections.append(ev)
    stage_rows = [[d.name, name, _fmt(m.get("created", "")),
                   ", ".join(f"{k} {_fmt(v)}" for k, v in list(m.get("figures", {}).items())[:6]
                             if isinstance(v, (int, float, str)))] for name, d, m in stage_dirs]
    sections.append(Section("Stages", ["Each stage's directory, when it finished, and its first figures."],
                            [(["directory", "stage", "created", "figures"], stage_rows)], []))
    sections.append(_environment(stage_dirs))
    return cfg.title or f"nanoforge run {run_dir.name}", sections


_CSS = ("body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}"
        "p.pre{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;background:#f8f8f8;"
        "padding:.4em}")


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'\">", f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
             f"<p>Written {e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p><nav><ul>"]
    parts += [f"<li><a href='#s{i}'>{e(s.title)}</a></li>" for i, s in enumerate(sections)]
    parts.append("</ul></nav>")
    for i, s in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{e(s.title)}</h2>")
        parts += [f"<p class='{'pre' if chr(10) in p else ''}'>{e(p)}</p>" for p in s.paragraphs]
        for header, rows in s.tables:
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        for caption, png in s.plots:
            data = base64.b64encode(png).decode()
            parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{e(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_text(v: Any) -> str:
    """Text from a run on one line of Markdown: Markdown renders raw HTML, so `<`, `>` and `&` are escaped
    (a reply `<img src=x onerror=…>` stays text)."""
    return html.escape(str(v), quote=False).replace("\n", " ")


def _md_cell(v: Any) -> str:
    return _md_text(v).replace("|", "\\|")


def _md_fenced(text: str) -> list[str]:
    """`text` as a code block, shown as written: its fence is longer than any run of backticks in it, so that
    a reply holding ``` cannot close the block and put the rest of it into the page as Markdown (and HTML)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def render_markdown(title: str, sections: list[Section], image_names: list[list[str]]) -> str:
    lines = [f"# {_md_text(title)}", ""]
    for s, names in zip(sections, image_names, strict=True):
        lines += [f"## {_md_text(s.title)}", ""]
        for p in s.paragraphs:
            lines += (_md_fenced(p) if "\n" in p else [_md_text(p)]) + [""]
        for header, rows in s.tables:
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        lines += [f"![{_md_text(caption).replace('[', '(').replace(']', ')')}]({name})\n"
                  for (caption, _), name in zip(s.plots, names, strict=True)]
    return "\n".join(lines)


def report(cfg: ReportConfig, run_dir: Path, out: Path) -> dict[str, Any]:
    """Write `index.html` (self-contained) and `report.md` + its PNGs into `out`; returns the manifest."""
    run_dir, out = Path(run_dir), Path(out)
    title, sections = collect(run_dir, cfg)
    names = [[f"plot-{i}-{j}.png" for j in range(len(s.plots))] for i, s in enumerate(sections)]
    with atomic_dir(out) as tmp:
        (tmp / "index.html").write_text(render_html(title, sections), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(title, sections, names), encoding="utf-8")
        for s, ns in zip(sections, names, strict=True):
            for (_, png), name in zip(s.plots, ns, strict=True):
                (tmp / name).write_bytes(png)
        figures = {"sections": [s.title for s in sections], "plots": sum(len(s.plots) for s in sections)}
        inputs = {name: d for name, d, _ in _stages(run_dir)}
        manifest = write_manifest(tmp, stage="report", config=cfg, inputs=inputs, figures=figures)
    return manifest
