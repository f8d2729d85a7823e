"""The crawler against local test sites (aiohttp on 127.0.0.1, a free port, in a background thread).

Each site counts its hits (host, path, time), so the tests check on the server side what was fetched, how
often and when; the WARC files are read back with warcio.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web
from warcio.archiveiterator import ArchiveIterator

from nanoforge.data.crawl import CrawlConfig, crawl, normalize_url
from nanoforge.data.warcstore import JOURNAL
from nanoforge.errors import NanoforgeError

ROOT = Path(__file__).resolve().parents[1]
RELEASE = web.AppKey("release", asyncio.Event)  # set when the site closes: frees handlers that never answer


class Site:
    """A test web site: `routes` maps a path to a handler (request → Response, sync or async); others are 404."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.hits: list[tuple[str, str, float]] = []  # (Host header, path?query, time.monotonic())
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app[RELEASE] = asyncio.Event()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        self.port = self.runner.addresses[0][1]
        started.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append((request.host, request.path_qs, time.monotonic()))
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="<html>not found</html>", content_type="text/html")
        result = handler(request)
        return await result if asyncio.iscoroutine(result) else result

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def count(self, host: str = "127.0.0.1") -> Counter:
        """Hits per path (robots.txt included) made with this Host."""
        return Counter(path for h, path, _ in self.hits if h.split(":")[0] == host)

    def close(self) -> None:
        async def stop():
            self.runner.app[RELEASE].set()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def make_site():
    sites = []

    def make(routes: dict) -> Site:
        sites.append(Site(routes))
        return sites[-1]

    yield make
    for s in sites:
        s.close()


def page(*links: str, extra: str = ""):
    body = "<html><body>" + "".join(f'<a href="{u}">link</a>' for u in links) + extra + "</body></html>"
    return lambda request: web.Response(text=body, content_type="text/html")


def text(body: str, content_type: str = "text/plain", status: int = 200):
    return lambda request: web.Response(text=body, content_type=content_type, status=status)


def redirect(location: str, status: int = 302):
    return lambda request: web.Response(status=status, headers={"Location": location})


def run(site: Site, out: Path, **overrides) -> dict:
    """Crawl `site` from / with delay 0 and no retries unless told otherwise; the manifest's figures."""
    values = dict(seeds=[site.url("/")], delay=0.0, retries=0, timeout=5.0, concurrency=4)
    values.update(overrides)
    return crawl(CrawlConfig(**values), out)["figures"]


def warc_records(out: Path) -> list:
    """Every record of every WARC file in order, as (file, type, WARC headers, HTTP headers, payload bytes);
    reading each file to its end with digest checks on."""
    records = []
    for path in sorted(out.glob("crawl-*.warc.gz")):
        with open(path, "rb") as f:
            for r in ArchiveIterator(f, check_digests="raise"):
                records.append((path.name, r.rec_type, r.rec_headers, r.http_headers, r.content_stream().read()))
    return records


def responses(out: Path) -> dict[str, list]:
    """Response records per target URI: [(status, WARC headers, payload), …]."""
    by_uri: dict[str, list] = {}
    for _, kind, h, http, payload in warc_records(out):
        if kind == "response":
            by_uri.setdefault(h.get_header("WARC-Target-URI"), []).append((int(http.get_statuscode()), h, payload))
    return by_uri


# ------------------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("raw, base, expected", [
    ("HTTP://Example.ORG:80/a/./b/../c?q=1#frag", None, "http://example.org/a/c?q=1"),
    ("https://example.org:443", None, "https://example.org/"),
    ("https://example.org:8443/x", None, "https://example.org:8443/x"),
    ("../up/page.html#top", "http://h.org/a/b/c.html", "http://h.org/a/up/page.html"),
    ("/p/../../x/.", "http://h.org/a/", "http://h.org/x/"),
    ("?page=2", "http://h.org/list?page=1", "http://h.org/list?page=2"),
    ("//other.org/a b", "https://h.org/", "https://other.org/a%20b"),
    ("http://user:pw@h.org/é", None, "http://h.org/%C3%A9"),
    ("http://bücher.de/", None, "http://xn--bcher-kva.de/"),
    ("\n  /spaced\t ", "http://h.org/", "http://h.org/spaced"),
    ("mailto:a@b.org", None, None),
    ("javascript:void(0)", "http://h.org/", None),
    ("http://h.org:notaport/", None, None),
    ("http://[::1]:8080/x", None, "http://[::1]:8080/x"),
    ("http://h.org/a%2fb?q=%3d%zz", None, "http://h.org/a%2Fb?q=%3D%25zz"),  # RFC 3986 §6.2.2.1: upper case
    ("/%2E%2E/x", "http://h.org/a/b", "http://h.org/x"),  # decoded, '%2E' is a dot segment
])
def test_normalize_url(raw, base, expected):
    assert normalize_url(raw, base) == expected


def test_equivalent_percent_encodings_are_one_url(make_site, tmp_path):
    # RFC 3986 §6.2.2.2: an escaped unreserved character is the character itself
    assert {normalize_url(f"http://h.org/a{t}b") for t in ("~", "%7E", "%7e")} == {"http://h.org/a~b"}
    assert normalize_url("http://h.org/%61bc?%7Ex") == normalize_url("http://h.org/abc?~x") == "http://h.org/abc?~x"
    site = make_site({"/robots.txt": text(""), "/": page("/a~b", "/a%7Eb", "/a%7eb", "/%61bc", "/abc"),
                      "/a~b": page(), "/abc": page()})
    figures = run(site, tmp_path / "out")
    assert site.count() == {"/robots.txt": 1, "/": 1, "/a~b": 1, "/abc": 1}
    assert figures["pages"] == 3


def test_bad_config_is_a_one_line_error(tmp_path):
    with pytest.raises(NanoforgeError, match="not an http"):
        crawl(CrawlConfig(seeds=["ftp://x.org/"]), tmp_path / "a")
    with pytest.raises(NanoforgeError, match="outside the allowed domains"):
        crawl(CrawlConfig(seeds=["http://x.org/"], allow_domains=["y.org"]), tmp_path / "b")
    with pytest.raises(NanoforgeError, match="max_pages"):
        crawl(CrawlConfig(seeds=["http://x.org/"], max_pages=0), tmp_path / "c")


# ----------------------------------------------------------------------------------------------- robots


def test_robots_disallow_and_crawl_delay_are_obeyed(make_site, tmp_path):
    robots = ("User-agent: *\nDisallow: /\n\n"  # our own group wins over '*' (RFC 9309 §2.2.1)
              "User-agent: nanoforge-crawler\nDisallow: /private\nCrawl-delay: 0.3\n")
    site = make_site({"/robots.txt": text(robots), "/": page("/a", "/b", "/private/secret"),
                      "/a": page("/b"), "/b": page("/a"), "/private/secret": page()})
    figures = run(site, tmp_path / "out", delay=0.0, concurrency=8)
    hits = site.count()
    assert hits == {"/robots.txt": 1, "/": 1, "/a": 1, "/b": 1}
    assert figures["robots_disallowed"] == 1 and figures["pages"] == 3
    times = sorted(t for _, _, t in site.hits)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Crawl-delay 0.3 beats delay 0 (robots.txt included); arrival times, with slack for jitter under load
    assert min(gaps) >= 0.25 and sum(gaps) >= 0.3 * len(gaps) - 0.05, gaps


def test_robots_404_allows_everything_at_the_configured_delay(make_site, tmp_path):
    site = make_site({"/": page("/a", "/b"), "/a": page(), "/b": page()})
    figures = run(site, tmp_path / "out", delay=0.2, concurrency=8)
    assert site.count() == {"/robots.txt": 1, "/": 1, "/a": 1, "/b": 1}
    assert figures["robots_txt_by_status"] == {"404": 1} and figures["pages"] == 3
    times = sorted(t for _, _, t in site.hits)
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.15


def test_robots_500_fetches_nothing(make_site, tmp_path):
    site = make_site({"/robots.txt": text("oops", status=500), "/": page("/a")})
    figures = run(site, tmp_path / "out", retries=1)
    assert site.count() == {"/robots.txt": 2}  # one retry, then "unreachable": complete disallow
    assert figures["robots_txt_by_status"] == {"500": 2}
    assert figures["pages"] == 0 and figures["robots_disallowed"] == 1
    assert [u.rsplit("/", 1)[1] for u in responses(tmp_path / "out")] == ["robots.txt"]


def test_robots_with_a_byte_order_mark_keeps_its_first_group(make_site, tmp_path):
    bom_robots = lambda request: web.Response(body=b"\xef\xbb\xbfUser-agent: *\nDisallow: /private\n",  # noqa: E731
                                              content_type="text/plain")
    site = make_site({"/robots.txt": bom_robots, "/": page("/private"), "/private": page()})
    figures = run(site, tmp_path / "out")
    assert site.count() == {"/robots.txt": 1, "/": 1}
    assert figures["robots_disallowed"] == 1


def test_robots_groups_are_matched_against_the_product_token(make_site, tmp_path):
    # "0.1" is no product token of ours; matched against "nanoforge-crawler/0.1" it would be taken for one
    robots = "User-agent: 0.1\nDisallow: /\n\nUser-agent: *\nDisallow: /private\n"
    site = make_site({"/robots.txt": text(robots), "/": page("/a", "/private"), "/a": page(), "/private": page()})
    figures = run(site, tmp_path / "out")
    assert site.count() == {"/robots.txt": 1, "/": 1, "/a": 1}
    assert figures["robots_disallowed"] == 1


# ------------------------------------------------------------------------------------------ scope, limits


def test_max_depth_and_max_pages(make_site, tmp_path):
    chain = {f"/p{i}": page(f"/p{i + 1}") for i in range(10)}
    site = make_site({"/": page("/p0"), **chain})
    figures = run(site, tmp_path / "deep", max_depth=2)
    assert set(site.count()) == {"/robots.txt", "/", "/p0", "/p1"}  # / is depth 0, /p1 depth 2
    assert figures["skipped"]["too-deep"] == 1 and figures["queued_left"] == 0

    wide = make_site({"/": page(*[f"/w{i}" for i in range(30)]), **{f"/w{i}": page("/") for i in range(30)}})
    figures = run(wide, tmp_path / "wide", max_pages=5, concurrency=8)
    hits = wide.count()
    assert figures["pages"] == 5 and sum(hits.values()) - hits["/robots.txt"] == 5  # not one request more
    assert figures["queued_left"] == 26


def test_off_domain_links_are_not_followed_unless_allowed(make_site, tmp_path):
    site = make_site({"/a": page(), "/b": page()})  # also answers as http://localhost:port
    site.routes["/"] = page("/a", site.url("/b", host="localhost"), "http://elsewhere.invalid/c")
    figures = run(site, tmp_path / "one")
    assert site.count("localhost") == {} and figures["skipped"]["off-domain"] == 2
    figures = run(site, tmp_path / "two", allow_domains=["127.0.0.1", "localhost"])
    assert site.count("localhost") == {"/robots.txt": 1, "/b": 1}  # its own robots.txt first
    assert figures["skipped"]["off-domain"] == 1 and figures["hosts"] == 2


def test_non_html_is_skipped(make_site, tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b'<a href="/hidden">' * 10
    site = make_site({
        "/": page("/photo.JPG", "/style.css?v=2", "/report", "/lying", "/fine", "/stray"),
        "/report": lambda r: web.Response(body=b"%PDF-1.4" + b"\0" * 5000, content_type="application/pdf"),
        "/lying": lambda r: web.Response(body=png, content_type="text/html"),
        "/fine": page(), "/hidden": page(),
        # one stray control byte in an old page: still a page, by the rule extract reads WARC records with
        "/stray": lambda r: web.Response(body=b"<html><body>A legacy\x0b page, kept.</body></html>",
                                         content_type="text/html"),
    })
    figures = run(site, tmp_path / "out")
    assert site.count() == {"/robots.txt": 1, "/": 1, "/report": 1, "/lying": 1, "/fine": 1, "/stray": 1}
    assert figures["skipped"]["non-html-extension"] == 2
    assert figures["skipped"]["non-html-type"] == 1 and figures["skipped"]["binary-body"] == 1
    assert figures["pages"] == 3
    (status, headers, payload), = responses(tmp_path / "out")[site.url("/report")]
    assert status == 200 and payload == b"" and headers.get_header("WARC-Truncated") == "unspecified"


# ------------------------------------------------------------------------------- redirects, errors, limits


def test_redirects_are_followed_recorded_and_loops_counted(make_site, tmp_path):
    site = make_site({
        "/robots.txt": text("User-agent: *\nDisallow: /private\n"),
        "/": page("/old", "/loop-a", "/away", "/to-private", "/r0"),
        "/old": redirect("/mid", 301), "/mid": redirect("/new?x=1#frag"), "/new": page(),
        "/loop-a": redirect("/loop-b"), "/loop-b": redirect("/loop-a"),
        "/to-private": redirect("/private/x"), "/private/x": page(),
        **{f"/r{i}": redirect(f"/r{i + 1}") for i in range(15)},
    })
    site.routes["/away"] = redirect(site.url("/x", host="localhost"))
    figures = run(site, tmp_path / "out")
    hits = site.count()
    assert hits["/new?x=1"] == 1 and hits["/loop-a"] == 1 and hits["/loop-b"] == 1
    assert "/private/x" not in hits and site.count("localhost") == {}
    assert max(int(p[2:]) for p in hits if p[2:].isdigit()) == 10  # /r0 and the ten hops followed from it
    skipped = figures["skipped"]
    assert skipped["redirect-loop"] == 1 and skipped["too-many-redirects"] == 1 and skipped["off-domain"] == 1
    assert figures["robots_disallowed"] == 1 and figures["pages"] == 2
    by_uri = responses(tmp_path / "out")
    assert [s for s, _, _ in by_uri[site.url("/old")]] == [301] and by_uri[site.url("/mid")][0][0] == 302
    assert by_uri[site.url("/new?x=1")][0][0] == 200


def test_http_errors_are_recorded_and_retried(make_site, tmp_path):
    site = make_site({"/": page("/missing", "/broken", "/flaky"), "/broken": text("no", status=500)})
    flaky = iter([503, 200])
    site.routes["/flaky"] = lambda r: web.Response(status=next(flaky), text="<p>ok</p>", content_type="text/html")
    figures = run(site, tmp_path / "out", retries=1)
    assert site.count() == {"/robots.txt": 1, "/": 1, "/missing": 1, "/broken": 2, "/flaky": 2}
    assert figures["responses_by_status"] == {"200": 2, "404": 1, "500": 2, "503": 1}
    assert figures["retries"] == 2 and figures["skipped"]["http-error"] == 2 and figures["pages"] == 2
    by_uri = responses(tmp_path / "out")
    assert [s for s, _, _ in by_uri[site.url("/broken")]] == [500, 500]
    assert [s for s, _, _ in by_uri[site.url("/flaky")]] == [503, 200]
    assert by_uri[site.url("/missing")][0][2] == b"<html>not found</html>"


def test_a_server_that_never_answers_times_out(make_site, tmp_path):
    async def hang(request):
        await request.app[RELEASE].wait()
        return web.Response()

    async def stall(request):  # headers and the start of the body, then nothing
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        await resp.prepare(request)
        await resp.write(b"<html><body>")
        await request.app[RELEASE].wait()
        return resp

    site = make_site({"/": page("/hang", "/stall", "/a"), "/hang": hang, "/stall": stall, "/a": page()})
    t0 = time.perf_counter()
    figures = run(site, tmp_path / "page", timeout=0.5, retries=1)
    assert time.perf_counter() - t0 < 5
    assert site.count()["/hang"] == 2 and site.count()["/stall"] == 2
    assert figures["skipped"]["timeout"] == 2 and figures["retries"] == 2 and figures["pages"] == 2

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (backlog), never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        figures = crawl(CrawlConfig(seeds=[url], timeout=0.5, retries=0), tmp_path / "host")["figures"]
    assert figures["robots_txt_by_status"] == {"timeout": 1} and figures["robots_disallowed"] == 1


def test_a_50mb_page_is_cut_off(make_site, tmp_path):
    sent = []

    async def big(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.content_length = 50 << 20
        await resp.prepare(request)
        chunk = b"<p>" + b"x" * ((1 << 16) - 3)
        try:
            for _ in range(800):
                await resp.write(chunk)
                sent.append(len(chunk))
        except ConnectionError:
            pass
        return resp

    site = make_site({"/": page("/big"), "/big": big})
    figures = run(site, tmp_path / "out", max_page_bytes=1 << 20)
    assert figures["skipped"] == {"truncated": 1} and figures["pages"] == 1
    (status, headers, payload), = responses(tmp_path / "out")[site.url("/big")]
    assert len(payload) == 1 << 20 and headers.get_header("WARC-Truncated") == "length"
    assert sum(sent) < 40 << 20  # the crawler hung up rather than draining the body


def test_sitemaps_seed_the_crawl(make_site, tmp_path):
    sitemap = "<?xml version='1.0'?><urlset><url><loc>{}</loc></url><url><loc>{}</loc></url></urlset>"
    site = make_site({"/": page(), "/orphan": page(), "/elsewhere": page()})
    site.routes["/robots.txt"] = text(f"Sitemap: {site.url('/maps/index.xml')}\n")
    site.routes["/maps/index.xml"] = text(f"<sitemapindex><sitemap><loc>{site.url('/maps/1.xml')}</loc></sitemap>"
                                          "</sitemapindex>", "application/xml")
    site.routes["/maps/1.xml"] = text(sitemap.format(site.url("/orphan"), "http://other.invalid/"), "text/xml")
    figures = run(site, tmp_path / "on", sitemaps=True)
    assert figures["sitemaps"] == 2 and figures["pages"] == 2 and site.count()["/orphan"] == 1
    run(site, tmp_path / "off")
    assert site.count()["/orphan"] == 1 and site.count()["/maps/index.xml"] == 1


# ------------------------------------------------------------------------------------------------- WARC


def _sha1(data: bytes) -> str:
    return "sha1:" + base64.b32encode(hashlib.sha1(data).digest()).decode()


def test_warc_records_types_headers_and_digests(make_site, tmp_path):
    site = make_site({"/": page("/a", "/gone"), "/a": page("/b", extra="é" * 3000), "/b": page()})
    site.routes["/b"] = lambda r: web.Response(body=zlib.compress(b"<html>b</html>", wbits=31),
                                               headers={"Content-Type": "text/html", "Content-Encoding": "gzip"})
    out = tmp_path / "out"
    figures = run(site, out, warc_max_bytes=500)  # tiny: every exchange rotates the file
    records = warc_records(out)
    files = sorted({f for f, *_ in records})
    assert files == figures["warc_files"] and len(files) > 2
    by_id = {h.get_header("WARC-Record-ID"): (kind, h) for _, kind, h, _, _ in records}
    pairs = 0
    for name in files:
        kinds = [kind for f, kind, *_ in records if f == name]
        assert kinds[0] == "warcinfo" and kinds.count("warcinfo") == 1
        raw = (out / name).read_bytes()
        members = 0
        while raw:  # one gzip member per record
            d = zlib.decompressobj(wbits=31)
            d.decompress(raw)
            raw, members = d.unused_data, members + 1
        assert members == len(kinds)
    for _, kind, h, http, payload in records:
        assert h.protocol == "WARC/1.1" and h.get_header("WARC-Date").endswith("Z")
        if kind == "warcinfo":
            continue
        other_kind, other = by_id[h.get_header("WARC-Concurrent-To")]
        assert {kind, other_kind} == {"request", "response"}
        assert other.get_header("WARC-Concurrent-To") == h.get_header("WARC-Record-ID")
        assert other.get_header("WARC-Target-URI") == h.get_header("WARC-Target-URI")
        assert h.get_header("WARC-Payload-Digest") == _sha1(payload)
        assert h.get_header("WARC-Block-Digest") == _sha1(http.to_ascii_bytes() + payload)
        assert h.get_header("Content-Type") == f"application/http; msgtype={kind}"
        if kind == "request":
            assert http.protocol == "GET" and http.get_header("User-Agent") == "nanoforge-crawler/0.1"
            pairs += 1
    assert pairs == 5  # robots.txt, /, /a, /gone (404), /b
    by_uri = responses(out)
    _, headers, payload = by_uri[site.url("/b")][0]
    assert payload == b"<html>b</html>"  # stored decoded; the header that said otherwise is kept renamed
    http = next(hh for _, k, h, hh, _ in records if k == "response" and h.get_header("WARC-Target-URI").endswith("/b"))
    assert http.get_header("Content-Encoding") is None and http.get_header("X-Crawler-Content-Encoding") == "gzip"
    assert http.get_header("Content-Length") == str(len(payload))
    assert by_uri[site.url("/gone")][0][0] == 404 and figures["responses_by_status"] == {"200": 3, "404": 1}


# ------------------------------------------------------------------------------------------------ resume


def _journal_done(out: Path) -> set[str]:
    done = set()
    for raw in (out / JOURNAL).read_bytes().splitlines(keepends=True):
        if raw.endswith(b"\n"):
            line = json.loads(raw)
            if line["t"] == "fetch" and line["outcome"] != "retry":
                done.add(line["url"])
    return done


def _start_and_stop(site: Site, out: Path, sig: int, after_pages: int) -> subprocess.CompletedProcess:
    """Run the crawl in a child process and send it `sig` once the journal holds `after_pages` pages."""
    code = ("import sys; from pathlib import Path; from nanoforge.data.crawl import CrawlConfig, crawl; "
            "crawl(CrawlConfig(seeds=[sys.argv[1]], delay=0, concurrency=4, max_depth=100), Path(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, site.url("/"), str(out)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        journal = out / JOURNAL
        if journal.exists() and journal.read_text().count('"outcome":"page"') >= after_pages:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode != 0, f"the crawl finished before it was stopped: {err}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_ctrl_c_and_kill_then_resume_fetch_nothing_twice(make_site, tmp_path):
    n = 60

    async def slow_page(request):
        await asyncio.sleep(0.03)
        i = int(request.path[2:])
        links = "".join(f'<a href="/p{j % n}">x</a>' for j in (i + 1, i + 2, i * 7))
        return web.Response(text=f"<html>{links}</html>", content_type="text/html")

    site = make_site({"/": page("/p0"), **{f"/p{i}": slow_page for i in range(n)}})
    out = tmp_path / "out"
    stopped = _start_and_stop(site, out, signal.SIGINT, after_pages=5)
    assert "run the same command again" in stopped.stderr and not (out / "manifest.json").exists()
    done_at_int, hits_at_int = _journal_done(out), len(site.hits)
    assert {site.url(p) for _, p, _ in site.hits if p != "/robots.txt"} == done_at_int  # in flight: finished
    _start_and_stop(site, out, signal.SIGKILL, after_pages=len(done_at_int) + 15)
    done_at_kill, hits_at_kill = _journal_done(out), len(site.hits)
    figures = run(site, out, seeds=[site.url("/")], concurrency=4, max_depth=100, retries=3)

    after_int = {site.url(p) for _, p, _ in site.hits[hits_at_int:]}
    after_kill = {site.url(p) for _, p, _ in site.hits[hits_at_kill:]}
    assert not after_int & done_at_int and not after_kill & done_at_kill  # nothing done is fetched again
    hits = site.count()
    del hits["/robots.txt"]  # fetched again by each run, as RFC 9309 caches allow
    assert set(hits) == {"/", *(f"/p{i}" for i in range(n))} and figures["pages"] == n + 1
    assert sum(hits.values()) - len(hits) <= 4  # only what was in flight at the kill was fetched twice
    by_uri = responses(out)  # every file reads to its end; each page has exactly one response kept
    assert all(len(by_uri[site.url(p)]) == 1 for p in hits)
    assert figures["sessions"] == 3 and len(figures["warc_files"]) >= 3


def test_torn_tail_is_cut_back_on_resume(make_site, tmp_path):
    site = make_site({"/": page("/a"), "/a": page("/b"), "/b": page()})
    out = tmp_path / "out"
    run(site, out, max_pages=2)
    warc = out / "crawl-00000.warc.gz"
    good_size, journal_size = warc.stat().st_size, (out / JOURNAL).stat().st_size
    with open(warc, "ab") as f:  # a record half written when the process died …
        f.write(zlib.compress(b"WARC/1.1\r\nWARC-Type: response\r\n" + os.urandom(500), wbits=31)[:300])
    with open(out / JOURNAL, "a") as f:  # … and its journal line torn
        f.write('{"t":"fetch","url":"http://')
    figures = run(site, out, max_pages=3)
    assert warc.stat().st_size == good_size and figures["warc_files"] == ["crawl-00000.warc.gz",
                                                                           "crawl-00001.warc.gz"]
    assert (out / JOURNAL).read_bytes()[journal_size - 1:journal_size + 1] == b'\n{'
    assert figures["pages"] == 3 and site.count() == {"/robots.txt": 2, "/": 1, "/a": 1, "/b": 1}
    assert len(warc_records(out)) == 1 + 2 * 3 + 1 + 2 * 2  # warcinfo, 3 exchanges; warcinfo, 2 exchanges

    with pytest.raises(NanoforgeError, match="other seeds"):
        crawl(CrawlConfig(seeds=[site.url("/a")]), out)
    journal = (out / JOURNAL).read_text().splitlines(keepends=True)
    (out / JOURNAL).write_text("".join([*journal[:3], "{damaged\n", *journal[3:]]))
    with pytest.raises(NanoforgeError, match="line 4 is not JSON"):
        run(site, out, max_pages=3)
