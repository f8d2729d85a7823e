import json
from html.parser import HTMLParser

from nanoforge.artifacts import atomic_dir, write_manifest
from nanoforge.eval.report import ReportConfig, report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.h2, self.text, self._in_h2 = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


def _stage(run, name, figures, metrics=None):
    with atomic_dir(run / name) as tmp:
        if metrics:
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
        write_manifest(tmp, stage=name.split("-", 1)[1], config={}, inputs={}, figures=figures)


def test_report_has_every_section_embeds_plots_and_escapes(tmp_path):
    run = tmp_path / "tiny"
    _stage(run, "02-crawl", {"pages": 203, "bytes": 8_000_000})
    _stage(run, "03-extract", {"documents": 203, "bytes_out": 2_900_000})
    _stage(run, "04-clean", {"documents_out": 197, "bytes_out": 2_800_000,
                             "removed_by_reason": {"language/language_low_score": 6}})
    _stage(run, "05-tokenizer", {"kind": "bpe", "vocab_size": 4096, "bytes_per_token": 3.7})
    _stage(run, "06-stats", {"documents": 197, "tokens": 760_000, "bytes_per_token": 3.7, "target_tokens": 30e12,
                             "projection_measured": {"tb": 111.0}, "projection_4_bytes_per_token": {"tb": 120.0}})
    _stage(run, "07-tokens", {"tokens": 770_000, "bytes": 2_800_000})
    _stage(run, "08-pretrain", {"params": 1_900_000, "tok_per_s": 14000.0, "mfu": 0.05, "val_loss": 3.6},
           [{"step": s, "loss": 8 - s / 10, "tok_per_s": 14000 + s} for s in range(20)]
           + [{"step": 19, "val_loss": 6.5}])
    _stage(run, "09-sft", {"val_loss": 1.2}, [{"step": s, "loss": 3 - s / 10} for s in range(10)])
    _stage(run, "14-eval", {})
    (run / "14-eval" / "eval.json").write_text(json.dumps({
        "models": {"pretrain": {"doc_qa_f1": 0.1}, "sft": {"doc_qa_f1": 0.4, "arithmetic_acc": 0.3}},
        "samples": {"sft": [{"prompt": "who are you?", "reply": "<script>alert(1)</script> I am nanoforge"}]}}))
    m = report(ReportConfig(), run, run / "15-report")
    page = (run / "15-report" / "index.html").read_text()
    parsed = _Collect()
    parsed.feed(page)
    for title in ("Corpus funnel", "Corpus size and projection", "Tokenizer", "Pretraining throughput and MFU",
                  "Training curves", "Evaluation across stages", "Stages", "Environment"):
        assert title in parsed.h2, title
    assert len(parsed.imgs) == 2 and all(src.startswith("data:image/png;base64,iVBOR") for src in parsed.imgs)
    assert "script" not in parsed.tags and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "language/language_low_score" in page and "111" in page
    md = (run / "15-report" / "report.md").read_text()
    assert "## Corpus funnel" in md and "![sft: metrics.jsonl against step](plot-" in md
    assert all((run / "15-report" / f).exists() for f in ("plot-4-0.png", "plot-4-1.png"))
    assert m["figures"]["plots"] == 2 and set(m["inputs"]) >= {"pretrain", "sft", "eval"}
    # a rerun reads the same stages, not its own previous output
    report(ReportConfig(), run, run / "15-report")
    assert (run / "15-report" / "index.html").read_text().count("<h2>") == page.count("<h2>")


def _outside_code_blocks(md):
    """The lines of `md` a Markdown renderer reads as Markdown (and raw HTML): those outside fenced blocks,
    which a fence of at least as many backticks closes."""
    import re

    lines, fence = [], None
    for line in md.splitlines():
        run = re.fullmatch(r"(`{3,})\s*", line)
        if fence is None and run:
            fence = run[1]
        elif fence is not None:
            if run and len(run[1]) >= len(fence):
                fence = None
        else:
            lines.append(line)
    return lines


def test_markdown_report_escapes_html_and_fences_replies_that_hold_fences(tmp_path):
    run = tmp_path / "run"
    evil = "<img src=x onerror=alert(1)>"
    _stage(run, "14-eval", {"note": evil})
    (run / "14-eval" / "eval.json").write_text(json.dumps({
        "models": {evil: {"bpb": 1.0}}, "descriptions": {"bpb": f"a | b {evil}"},
        "samples": {"m": [{"prompt": "q", "reply": f"a\n```\n{evil}\n```\n````"}]}}))
    report(ReportConfig(title=f"<b>{evil}</b>"), run, run / "15-report")
    md = (run / "15-report" / "report.md").read_text()
    outside = _outside_code_blocks(md)
    assert not [line for line in outside if "<" in line or ">" in line]
    assert f"| {evil.replace('<', '&lt;').replace('>', '&gt;')} | 1 |" in outside
    assert "`````" in md and md.count(evil) == 1  # the reply, whole, inside a fence longer than its own
