"""The extract stage: WARC/WET/HTML/JSONL/Parquet in, main-text documents out; damage counted, not fatal."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from nanoforge.artifacts import read_manifest
from nanoforge.data.documents import Document, iter_documents
from nanoforge.data.extract import ExtractConfig, decode_html, document_id, extract, main_text
from nanoforge.data.sources import CRAWL_JOURNAL
from nanoforge.errors import NanoforgeError

DATE = "2024-05-01T12:00:00Z"
NAV = "".join(f'<li><a href="/section/{i}">Menu entry number {i}</a></li>' for i in range(15))
FOOTER = "Copyright 2024 Example Corp. All rights reserved. Privacy policy. Terms of service. Contact us."
SENTENCES = [
    "The tokenizer splits the corpus into byte pairs that are merged by frequency until the vocabulary is full.",
    "Each training step reads a batch of token windows and updates the weights with the AdamW optimizer.",
    "Validation loss is measured on held out documents that the model never sees during training.",
    "Checkpoints store the weights, the optimizer state and the position of the data loader for resuming.",
]


def article_page(title: str, paragraphs: list[str], head: str = '<meta charset="utf-8">') -> str:
    """A page the way sites build them: header, navigation, the article, a sidebar and a footer."""
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (f"<!DOCTYPE html><html><head>{head}<title>{title}</title></head><body>"
            f"<header><div class='logo'>Example Corp</div><nav><ul>{NAV}</ul></nav></header>"
            f"<main><article><h1>{title}</h1>{body}</article></main>"
            f"<aside class='sidebar'><h3>Related</h3><ul>{NAV}</ul></aside>"
            f"<footer><p>{FOOTER}</p></footer></body></html>")


def response(w: WARCWriter, url: str, body: bytes, content_type: str = "text/html; charset=utf-8",
             status: str = "200 OK", date: str = DATE) -> None:
    headers = [("Content-Type", content_type)] if content_type else []
    http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
    w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http,
                                        warc_headers_dict={"WARC-Date": date}))


def request(w: WARCWriter, url: str) -> None:
    http = StatusAndHeaders(f"GET {url} HTTP/1.1", [("Host", "example.com")], is_http_request=True)
    w.write_record(w.create_warc_record(url, "request", payload=io.BytesIO(b""), http_headers=http))


def record_bytes(write: Callable[[WARCWriter], None], *, gzip_it: bool = False) -> bytes:
    buf = io.BytesIO()
    write(WARCWriter(buf, gzip=gzip_it))
    return buf.getvalue()


def read_docs(out: Path) -> list[Document]:
    return list(iter_documents(out))


# ---------------------------------------------------------------------------------------------- WARC input


@pytest.mark.parametrize("compressed", [True, False])
def test_warc_from_warcio(tmp_path, compressed):
    urls = [f"http://example.com/post/{i}" for i in range(3)]
    path = tmp_path / ("crawl-00000.warc.gz" if compressed else "crawl-00000.warc")
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=compressed)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test"}))
        for i, url in enumerate(urls):
            request(w, url)
            response(w, url, article_page(f"Post {i}", SENTENCES[i:] + [f"Post number {i} ends here."]).encode())
        request(w, "http://example.com/missing")
        response(w, "http://example.com/missing", article_page("Not found", SENTENCES).encode(), status="404 Not Found")
        response(w, "http://example.com/old", b"", status="301 Moved Permanently")
        response(w, "http://example.com/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(200), content_type="image/png")
        response(w, "http://example.com/data.json", b'{"a": 1}', content_type="application/json")
        w.write_record(w.create_warc_record(urls[0], "metadata", payload=io.BytesIO(b"fetchTimeMs: 12\r\n"),
                                            warc_content_type="application/warc-fields"))
        w.write_record(w.create_warc_record(urls[0], "revisit", payload=io.BytesIO(b"")))
        w.write_record(w.create_warc_record("dns:example.com", "response", payload=io.BytesIO(b"1.2.3.4\r\n"),
                                            warc_content_type="text/dns"))  # as Heritrix writes them

    manifest = extract(ExtractConfig(workers=1), [path], tmp_path / "docs")
    docs = read_docs(tmp_path / "docs")
    assert [d.url for d in docs] == urls
    for i, d in enumerate(docs):
        assert SENTENCES[i] in d.text and f"Post number {i} ends here." in d.text
        assert "Menu entry number" not in d.text and "All rights reserved" not in d.text
        assert d.id == document_id(d.url, DATE) and d.source == path.name
        assert d.meta == {"fetch_date": DATE, "content_hash": hashlib.sha256(d.text.encode()).hexdigest(),
                          "language": "en", "extractor": "resiliparse"}
    f = manifest["figures"]
    assert f["skipped"] == {"warcinfo_record": 1, "request_record": 4, "non_200": 2, "binary": 1, "non_html": 2,
                            "metadata_record": 1, "revisit_record": 1}
    assert f["documents"] == 3 and f["records"] == 3 + 12 and f["bytes_in"] == path.stat().st_size
    assert f["bytes_out"] == sum(len(d.text.encode()) for d in docs) and f["languages"] == {"en": 3}
    assert read_manifest(tmp_path / "docs")["stage"] == "extract"


def test_wet(tmp_path):
    texts = {f"http://example.com/{i}": f"{SENTENCES[i]}\nSecond line of page {i}." for i in range(3)}
    path = tmp_path / "CC-MAIN-test.warc.wet.gz"
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test"}))
        for url, text in texts.items():
            w.write_record(w.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode()),
                                                warc_content_type="text/plain", warc_headers_dict={"WARC-Date": DATE}))
    manifest = extract(ExtractConfig(workers=1), [tmp_path], tmp_path / "docs")
    docs = read_docs(tmp_path / "docs")
    assert {d.url: d.text for d in docs} == texts
    assert all(d.meta["fetch_date"] == DATE and d.meta["extractor"] == "" for d in docs)
    assert manifest["figures"]["skipped"] == {"warcinfo_record": 1}


def test_html_folder_jsonl_and_parquet(tmp_path):
    site = tmp_path / "site"
    (site / "a").mkdir(parents=True)
    (site / "a" / "one.html").write_text(article_page("One", [*SENTENCES[:2], "Laid&nbsp;out&nbsp;with&nbsp;nbsp."]))
    (site / "two.htm").write_bytes(article_page("Two", ["Caf\u00e9 cr\u00e8me " + SENTENCES[2]],
                                                '<meta charset="iso-8859-1">').encode("latin-1"))
    (site / "notes.txt").write_text("not an input extract reads")
    (site / ".hidden.html").write_text(article_page("Hidden", SENTENCES))
    lines = [json.dumps({"text": "First JSONL document.", "url": "http://j/1", "date": DATE}), "{broken",
             json.dumps({"title": "no text"}), "", json.dumps({"text": "Second\ud800 one.", "id": "keep-me"})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["Parquet row one.", "Parquet row two."],
                             "url": ["http://p/1", None]}), tmp_path / "rows.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not Parquet")
    manifest = extract(ExtractConfig(workers=1, task_bytes=1),
                       [site, tmp_path / "data.jsonl", tmp_path / "rows.parquet", tmp_path / "broken.parquet"],
                       tmp_path / "docs")
    docs = read_docs(tmp_path / "docs")
    assert [d.url for d in docs] == ["site/a/one.html", "site/two.htm", "http://j/1", "data.jsonl#5",
                                     "http://p/1", "rows.parquet#2"]
    assert SENTENCES[0] in docs[0].text and "Menu entry" not in docs[0].text
    assert "Laid out with nbsp." in docs[0].text  # non-breaking spaces are plain spaces in the text
    assert "Caf\u00e9 cr\u00e8me" in docs[1].text
    assert [d.text for d in docs[2:]] == ["First JSONL document.", "Second one.", "Parquet row one.",
                                          "Parquet row two."]
    assert [d.id for d in docs[3:]] == ["keep-me", "p1", "p2"]
    assert docs[2].id == document_id("http://j/1", DATE) and docs[2].meta["fetch_date"] == DATE
    assert manifest["figures"]["skipped"] == {"undecodable": 3}  # two JSONL lines, the broken Parquet file


# ---------------------------------------------------------------------------------------------- damage


def _with_length(record: bytes, delta: int) -> bytes:
    """An uncompressed WARC record whose Content-Length header is off by `delta`."""
    head, sep, rest = record.partition(b"\r\n\r\n")
    lines = [(b"Content-Length: %d" % (int(line.split(b":")[1]) + delta)) if line.startswith(b"Content-Length")
             else line for line in head.split(b"\r\n")]
    return b"\r\n".join(lines) + sep + rest


def test_damaged_warc_is_counted_and_the_rest_extracted(tmp_path, capsys):
    def page(url: str, *args, **kwargs) -> bytes:
        return record_bytes(lambda w: response(w, url, *args, **kwargs), gzip_it=True)

    good = [f"http://example.com/good/{i}" for i in range(2)]
    truncated = page("http://example.com/cut", article_page("Cut", SENTENCES).encode())
    short = record_bytes(lambda w: response(w, "http://example.com/short", article_page("S", SENTENCES).encode()))
    long = record_bytes(lambda w: response(w, "http://example.com/long", article_page("L", SENTENCES).encode()))
    garbage = random.Random(0).randbytes(3000)
    cp1252 = article_page("Lying charset", ["Un caf\u00e9 na\u00efve \u201cquoted\u201d \u2014 " + SENTENCES[0]], "")
    japanese = "\u3053\u308c\u306f\u65e5\u672c\u8a9e\u306e\u6587\u66f8\u3067\u3059\u3002" * 8
    members = [
        page(good[0], article_page("Good", SENTENCES).encode()),
        truncated[: len(truncated) // 2],  # a gzip member cut short
        gzip.compress(_with_length(short, -40)),  # Content-Length too short: the content runs past it
        gzip.compress(_with_length(long, +500)),  # too long: the member ends first
        page("http://example.com/garbage", article_page("Garbage", [SENTENCES[1]]).encode().replace(
            b"</article>", garbage + b"</article>")),
        page("http://example.com/image", b"\x89PNG\r\n\x1a\n" + garbage),  # text/html, but an image
        page("http://example.com/octet", article_page("Octet", [SENTENCES[2]]).encode(),
             content_type="application/octet-stream"),  # a page served as bytes is still a page
        page("http://example.com/cp1252", cp1252.encode("cp1252")),  # declares UTF-8, is Windows-1252
        page("http://example.com/sjis", article_page("Japanese", [japanese], '<meta charset="shift_jis">')
             .encode("shift_jis"), content_type="text/html"),
        page(good[1], article_page("Good", SENTENCES).encode()),
    ]
    path = tmp_path / "damaged.warc.gz"
    path.write_bytes(b"".join(members))
    manifest = extract(ExtractConfig(workers=1), [path], tmp_path / "docs")
    docs = {d.url.rsplit("/", 1)[1]: d.text for d in read_docs(tmp_path / "docs")}
    assert list(docs) == ["0", "garbage", "octet", "cp1252", "sjis", "1"]
    assert SENTENCES[1] in docs["garbage"] and "\x00" not in docs["garbage"] and "\ufffd" not in docs["garbage"]
    assert SENTENCES[2] in docs["octet"]
    assert "Un caf\u00e9 na\u00efve \u201cquoted\u201d \u2014" in docs["cp1252"]
    assert japanese in docs["sjis"]
    assert manifest["figures"]["skipped"] == {"truncated_gzip": 1, "bad_length": 2, "binary": 1}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "further ones are only counted" in line]
    assert len(warnings) == 2 and "truncated_gzip" in warnings[0] and "bad_length" in warnings[1]  # once per kind
    # read in byte ranges of 300 (each range owns the members that start in it): the same documents and counts
    split = extract(ExtractConfig(workers=1, task_bytes=300), [path], tmp_path / "split")
    assert read_docs(tmp_path / "split") == read_docs(tmp_path / "docs")
    assert split["figures"]["skipped"] == manifest["figures"]["skipped"]


def test_http_content_and_transfer_encodings_are_undone(tmp_path):
    html = article_page("Encoded", SENTENCES).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(html[i : i + 500]), html[i : i + 500]) for i in range(0, len(html), 500))

    def write(w: WARCWriter) -> None:
        for url, body, headers in [
            ("http://example.com/gzip", gzip.compress(html), [("Content-Encoding", "gzip")]),
            ("http://example.com/chunked", chunked + b"0\r\n\r\n", [("Transfer-Encoding", "chunked")]),
            ("http://example.com/decoded", html, [("Content-Encoding", "gzip")]),  # stored decoded, header kept
            ("http://example.com/broken", b"\x1f\x8b\x08" + bytes(50), [("Content-Encoding", "gzip")]),
        ]:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html"), *headers], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))

    path = tmp_path / "encoded.warc.gz"
    path.write_bytes(record_bytes(write, gzip_it=True))
    manifest = extract(ExtractConfig(workers=1), [path], tmp_path / "docs")
    docs = read_docs(tmp_path / "docs")
    assert [d.url.rsplit("/", 1)[1] for d in docs] == ["gzip", "chunked", "decoded"]
    assert len({d.text for d in docs}) == 1 and SENTENCES[3] in docs[0].text
    assert manifest["figures"]["skipped"] == {"undecodable": 1}


def test_uncompressed_warc_recovers_records_a_too_long_length_swallowed(tmp_path):
    def page(i: int, delta: int = 0) -> bytes:
        url = f"http://example.com/{i}"
        return _with_length(record_bytes(lambda w: response(w, url, article_page(f"P{i}", SENTENCES).encode())),
                            delta)

    path = tmp_path / "plain.warc"
    path.write_bytes(page(0) + page(1, +3000) + page(2) + page(3, -25) + page(4) + b"\x00" * 10)
    manifest = extract(ExtractConfig(workers=1), [path], tmp_path / "docs")
    assert [d.url[-1] for d in read_docs(tmp_path / "docs")] == ["0", "2", "4"]
    assert manifest["figures"]["skipped"] == {"bad_length": 2, "bad_warc_header": 1}


def test_huge_page_is_cut_not_fatal(tmp_path):
    paragraph = "<p>" + " ".join(SENTENCES) + "</p>\n"
    big = article_page("Big", []).replace("</article>", paragraph * 6000 + "</article>").encode()  # ~2.5 MB
    path = tmp_path / "big.warc.gz"
    path.write_bytes(record_bytes(lambda w: response(w, "http://example.com/big", big), gzip_it=True))
    manifest = extract(ExtractConfig(workers=1, max_page_bytes=1 << 20), [path], tmp_path / "docs")
    (doc,) = read_docs(tmp_path / "docs")
    assert manifest["figures"]["truncated"] == 1
    assert 0.5e6 < len(doc.text) < 1 << 20 and doc.text.startswith("Big\n")


def test_decode_html_charsets():
    text = "Gr\u00fc\u00dfe aus K\u00f6ln, \u201csmart quotes\u201d \u2026 " * 20
    assert decode_html(text.encode("cp1252"), "utf-8") == text  # the header lies
    assert decode_html(text.encode("utf-8"), "iso-8859-1") == text  # so does this one
    assert decode_html(b"\xef\xbb\xbf" + text.encode("utf-8")) == text
    assert decode_html(text.encode("utf-16")) == text
    japanese = "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3042\u308b\u3002" * 10
    assert decode_html(f"<p>{japanese}</p>".encode("shift_jis")) == f"<p>{japanese}</p>"  # detected, no label


def test_damaged_utf8_is_not_decoded_as_cp1252():
    text = "<p>" + "Gr\u00fc\u00dfe aus M\u00fcnchen, sch\u00f6ne Stra\u00dfe. " * 20 + "\u20ac</p>"
    data = text.encode("utf-8")
    cut = data[:data.index("\u20ac".encode()) + 2]  # cut inside the euro sign, as max_page_bytes does
    assert decode_html(cut, "utf-8") == text[:text.index("\u20ac")]
    assert decode_html(b"<p>It costs 5 " + "\u20ac".encode()[:2]) == "<p>It costs 5 "  # ASCII but for the cut
    one_bad = data.replace("M\u00fcnchen".encode(), b"M\xfcnchen", 1)  # a Latin-1 byte among UTF-8
    for hint in ("utf-8", "", "iso-8859-1"):
        assert decode_html(one_bad, hint) == text.replace("M\u00fcnchen", "M\ufffdnchen", 1)
    few = "<p>Caf\u00e9 menu: soup.</p>".encode() + b"\xa0"  # as much UTF-8 as bad bytes, and UTF-8 declared
    assert decode_html(few, "utf-8") == "<p>Caf\u00e9 menu: soup.</p>\ufffd"  # not 'CafĂ©' (detected cp1250)


def test_pages_cut_mid_character_keep_their_text(tmp_path):
    words = "Gr\u00fc\u00dfe aus M\u00fcnchen, sch\u00f6ne Stra\u00dfe. " * 40
    page = f"<html><head><meta charset=utf-8></head><body><p>{words}</p></body></html>".encode()
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(record_bytes(lambda w: (
        response(w, "http://example.com/page", page),
        w.write_record(w.create_warc_record("http://example.com/wet", "conversion", payload=io.BytesIO(words.encode()),
                                            warc_content_type="text/plain", warc_headers_dict={"WARC-Date": DATE}))),
        gzip_it=True))
    max_bytes = next(n for n in range(1000, 1100)  # inside a two-byte character of each
                     if all(b[:n].decode("utf-8", "replace").endswith("\ufffd") for b in (page, words.encode())))
    manifest = extract(ExtractConfig(workers=1, max_page_bytes=max_bytes), [path], tmp_path / "docs")
    assert manifest["figures"]["truncated"] == 2
    docs = read_docs(tmp_path / "docs")
    assert [d.url for d in docs] == ["http://example.com/page", "http://example.com/wet"]
    for d in docs:
        assert len(d.text) > 400 and words.startswith(d.text), d.text[:80]


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_both_extractors_keep_the_article_and_drop_boilerplate(extractor):
    text = main_text(article_page("A post about training", SENTENCES), extractor)
    assert all(s in text for s in SENTENCES)
    assert "Menu entry number" not in text and "All rights reserved" not in text and "Related" not in text


# ------------------------------------------------------------------------------------- determinism, errors


def test_output_is_identical_for_any_number_of_workers(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(2):
        with open(inputs / f"crawl-{n:05d}.warc.gz", "wb") as f:
            w = WARCWriter(f, gzip=True)
            for i in range(12):
                url = f"http://example.com/{n}/{i}"
                request(w, url)
                response(w, url, article_page(f"Page {n}.{i}", SENTENCES[i % 4 :] + [f"Page {n}.{i}."]).encode())
        (inputs / f"page-{n}.html").write_text(article_page(f"File {n}", SENTENCES))
    (inputs / CRAWL_JOURNAL).write_text('{"t": "start", "seeds": []}\n')  # the crawler's, not documents
    runs = {}
    for workers, task_bytes in ((1, 32 << 20), (2, 3000)):
        out = tmp_path / f"out{workers}"
        figures = extract(ExtractConfig(workers=workers, task_bytes=task_bytes, shard_bytes=4000), [inputs], out)[
            "figures"]
        shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}
        runs[workers] = (shards, {k: v for k, v in figures.items()
                                  if k not in ("workers", "seconds", "docs_per_s", "mb_per_s")})
    assert len(runs[1][0]) > 1 and runs[1] == runs[2]
    assert runs[1][1]["documents"] == 26 and runs[1][1]["files"] == 4


def test_crawl_journal_name_matches_the_crawler():
    from nanoforge.data.warcstore import JOURNAL

    assert CRAWL_JOURNAL == JOURNAL


def test_bad_inputs_are_refused_with_one_line(tmp_path):
    with pytest.raises(NanoforgeError, match="no such file"):
        extract(ExtractConfig(), [tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanoforgeError, match="no input files"):
        extract(ExtractConfig(), [tmp_path / "empty"], tmp_path / "out")
    path = tmp_path / "requests.warc.gz"
    path.write_bytes(record_bytes(lambda w: request(w, "http://example.com/"), gzip_it=True))
    with pytest.raises(NanoforgeError, match=r"no documents in 1 input file\(s\) \(request_record 1\)"):
        extract(ExtractConfig(workers=1), [path], tmp_path / "out")
    with pytest.raises(NanoforgeError, match="unknown extractor"):
        extract(ExtractConfig(extractor="magic"), [path], tmp_path / "out")
    assert not (tmp_path / "out").exists()
