"""The web crawler: seed URLs → WARC 1.1 files holding every HTTP exchange; polite, bounded and resumable.

    nanoforge crawl https://docs.python.org/3/ --out runs/web/crawl --max-pages 500 --max-depth 3
    nanoforge crawl https://example.org/ --out crawl --allow-domain example.org --delay 1 --sitemaps

`crawl(cfg, out)` writes into `out/` the WARC files `crawl-00000.warc.gz`, … and the journal `crawl-state.jsonl`
(their format, and how a stopped crawl resumes, are in `nanoforge.data.warcstore`), then `manifest.json`, written
last (and removed while a crawl runs), with the figures. Started again with the same command, a stopped crawl
(Ctrl-C, SIGKILL, power loss) continues where its journal ends: no finished URL is fetched twice.

How it runs: `concurrency` asyncio workers share one aiohttp session. A worker takes the host whose next request
is due soonest: a host's requests start at least `delay` apart (its robots.txt Crawl-delay if larger), and its
first request is its robots.txt (RFC 9309, parsed by protego; 4xx allows all, 5xx or unreachable disallows all).
Redirects are not followed by aiohttp but by the crawler: each hop is recorded, and the target is admitted like a
link (domain, loop, hop limit; robots when it is dispatched). Bodies are streamed and cut at `max_page_bytes`;
only HTML is downloaded. Links are parsed and WARC records made on the event loop (in a thread for big bodies);
the store's writer thread appends them to the files, then journals them.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from protego import Protego
from tqdm import tqdm
from yarl import URL

from nanoforge.artifacts import MANIFEST, write_manifest
from nanoforge.console import info
from nanoforge.data.warc import looks_binary
from nanoforge.data.warcstore import CrawlStats, Exchange, WarcStore, recover, warc_records
from nanoforge.data.weblinks import (
    charset_of,
    extract_links,
    has_non_html_extension,
    in_domains,
    normalize_cached,
    normalize_url,
    origin_of,
    sitemap_locs,
)
from nanoforge.errors import NanoforgeError

MAX_REDIRECTS = 10  # hops followed from one URL; more is counted "too-many-redirects"
ROBOTS_MAX_REDIRECTS = 5  # RFC 9309 §2.3.1.2: follow at least five
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 §2.5: parse at least 500 KiB
MAX_SITEMAP_NESTING = 1  # a sitemap index may list sitemaps; theirs are not followed
BACKOFF_S = 0.5  # first retry waits this long, then doubles; a Retry-After (capped) wins if longer
MAX_RETRY_AFTER_S = 60.0
INLINE_BYTES = 256 << 10  # bodies up to this size are parsed and turned into WARC records on the event loop
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
T = TypeVar("T")


@dataclass
class CrawlConfig:
    """What `nanoforge crawl` fetches, how fast, and how much."""

    seeds: list[str]  # start URLs
    max_pages: int = 1000  # HTML pages fetched successfully (2xx), at most
    max_depth: int = 5  # link hops from a seed
    allow_domains: list[str] = field(default_factory=list)  # hosts (and subdomains) to stay in; [] = the seeds'
    delay: float = 0.5  # min seconds between request starts to one host; robots Crawl-delay wins if larger
    concurrency: int = 8  # requests in flight overall
    user_agent: str = "nanoforge-crawler/0.1"
    sitemaps: bool = False  # also seed from the seed hosts' robots.txt Sitemap: lines, else /sitemap.xml
    max_page_bytes: int = 5 << 20  # larger bodies are cut off and recorded as truncated (WARC-Truncated: length)
    timeout: float = 20.0  # per request (connect + headers + body), seconds
    retries: int = 3  # for transient errors (connection errors, timeouts, 429, 5xx), with exponential backoff
    warc_max_bytes: int = 100 << 20  # rotate WARC files at about this size


# ---------------------------------------------------------------------------------------------- fetching


def _retry_after(ex: Exchange) -> float | None:
    """Seconds to wait if this answer is transient (429, 5xx), else None."""
    if ex.status != 429 and ex.status < 500:
        return None
    value = next((v for k, v in ex.headers if k.lower() == "retry-after"), "")
    return min(float(value), MAX_RETRY_AFTER_S) if value.strip().isdigit() else 0.0


@dataclass
class _Entry:
    """A URL in the frontier: link hops from a seed, the redirect chain that led to it, page or sitemap."""

    url: str
    depth: int
    via: tuple[str, ...] = ()
    kind: str = "page"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"url": self.url, "depth": self.depth}
        if self.via:
            d["via"] = list(self.via)
        if self.kind != "page":
            d["kind"] = self.kind
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Entry:
        return cls(d["url"], d["depth"], tuple(d.get("via", ())), d.get("kind", "page"))


@dataclass
class _Host:
    """Politeness state of one origin (scheme://host:port)."""

    origin: str
    queue: deque[_Entry] = field(default_factory=deque)
    state: str = "new"  # new → robots (being fetched) → ready
    rules: Protego | None = None
    allow_all: bool = False  # without rules: robots.txt 4xx allows everything, 5xx/unreachable nothing
    delay: float = 0.0
    last_start: float = 0.0
    next_time: float = 0.0

    def allows(self, url: str, robot_name: str) -> bool:
        return self.rules.can_fetch(url, robot_name) if self.rules is not None else self.allow_all

    def reserve(self) -> float:
        """Book this host's next request slot; returns its start time (monotonic)."""
        start = max(time.monotonic(), self.next_time)
        self.last_start, self.next_time = start, start + self.delay
        return start

    async def turn(self) -> None:
        await asyncio.sleep(max(0.0, self.reserve() - time.monotonic()))

    def back_off(self, seconds: float) -> None:
        self.next_time = max(self.next_time, time.monotonic() + seconds)


# ----------------------------------------------------------------------------------------------- crawler


class _Crawler:
    def __init__(self, cfg: CrawlConfig, out: Path, seeds: list[str], domains: list[str]):
        self.cfg, self.out, self.domains = cfg, out, domains
        lines, next_index = recover(out)
        if lines and (lines[0].get("seeds"), lines[0].get("allow_domains")) != (seeds, domains):
            raise NanoforgeError(f"{out}: holds a crawl of other seeds or domains "
                                 f"({', '.join(lines[0].get('seeds', []))}); use another --out")
        self.stats = CrawlStats()
        self.hosts: dict[str, _Host] = {}
        self.seen: set[str] = set()
        self.queued = 0  # entries in all host queues
        self.inflight = 0  # tasks taken by workers and not finished
        self.wake = asyncio.Event()
        self.stopping = False  # Ctrl-C: take no new task, finish those in flight
        pending: dict[str, _Entry] = {}
        done: set[str] = set()
        for line in lines:  # replay: the frontier is every URL ever admitted that has no final fetch line
            self.stats.apply(line)
            pending.update((d["url"], _Entry.from_json(d)) for d in line.get("new", ()))
            if line["t"] == "fetch" and line["outcome"] != "retry":
                done.add(line["url"])
        self.seen.update(pending)
        self.seed_origins = {origin_of(s) for s in seeds}
        for seed in seeds:
            if seed not in self.seen:
                self.seen.add(seed)
                pending[seed] = _Entry(seed, 0)
        for url, entry in pending.items():
            if url not in done:
                self._enqueue(entry)
        self.pages_at_start = self.stats.pages
        self.store = WarcStore(out, next_index, max_bytes=cfg.warc_max_bytes, user_agent=cfg.user_agent)
        # robots.txt groups name a product token (RFC 9309 §2.2.1); matched against the whole header, a group
        # "User-agent: 0.1" would apply to "nanoforge-crawler/0.1"
        self.robot_name = cfg.user_agent.split("/", 1)[0].strip() or cfg.user_agent
        start = [] if lines else [{"t": "start", "seeds": seeds, "allow_domains": domains}]
        for line in [*start, {"t": "session", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]:
            self.stats.apply(line)
            self.store.write([(line, None)])
        self.bar: tqdm | None = None

    # --- frontier and scheduling

    def _enqueue(self, entry: _Entry) -> None:
        origin = origin_of(entry.url)
        host = self.hosts.get(origin)
        if host is None:
            host = self.hosts[origin] = _Host(origin, delay=self.cfg.delay)
        host.queue.append(entry)
        self.queued += 1
        self.wake.set()

    def _admit(self, raw: str, base: str | None, depth: int, skips: Counter, new: list[_Entry],
               via: tuple[str, ...] = (), kind: str = "page") -> None:
        """Add a link (or redirect target) to `new` if it is to be fetched, else count why not in `skips`."""
        url = normalize_cached(raw, base)
        if url is None:
            reason = "not-http"
        elif url in via:
            reason = "redirect-loop"
        elif len(via) > MAX_REDIRECTS:
            reason = "too-many-redirects"
        elif not in_domains(url, self.domains):
            reason = "off-domain"
        elif kind == "page" and has_non_html_extension(url):
            reason = "non-html-extension"
        elif url in self.seen:
            reason = "duplicate"
        elif depth > (self.cfg.max_depth if kind == "page" else MAX_SITEMAP_NESTING):
            reason = "too-deep"
        else:
            self.seen.add(url)
            new.append(_Entry(url, depth, via, kind))
            return
        skips[reason] += 1

    async def _take(self) -> tuple[str, _Host, _Entry | None] | None:
        """The next task, ("robots", host, None) or ("fetch"/"disallowed", host, entry); None when the crawl is over.

        Tasks in flight count against max_pages as if each became a page, so the crawl never fetches more."""
        while self.stats.pages < self.cfg.max_pages and not self.stopping:
            best, best_time = None, 0.0
            if self.stats.pages + self.inflight < self.cfg.max_pages:
                for host in self.hosts.values():
                    if host.queue and host.state != "robots":
                        t = 0.0 if host.state == "new" else host.next_time
                        if best is None or t < best_time:
                            best, best_time = host, t
            now = time.monotonic()
            if best is not None and best_time <= now:
                self.inflight += 1
                if best.state == "new":
                    best.state = "robots"
                    best.reserve()
                    return "robots", best, None
                entry = best.queue.popleft()
                self.queued -= 1
                if not best.allows(entry.url, self.robot_name):
                    return "disallowed", best, entry
                best.reserve()
                return "fetch", best, entry
            if best is None and self.inflight == 0:
                return None
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), None if best is None else best_time - now)
            except asyncio.TimeoutError:
                pass
        return None

    async def _worker(self) -> None:
        while (task := await self._take()) is not None:
            what, host, entry = task
            try:
                if what == "robots":
                    await self._robots(host)
                elif what == "disallowed":
                    await self._commit({"t": "fetch", "url": entry.url, "outcome": "robots"})
                else:
                    await self._fetch_entry(host, entry)
            finally:
                self.inflight -= 1
                self.wake.set()

    async def _commit(self, line: dict[str, Any], exchange: Exchange | None = None,
                      new: list[_Entry] | None = None) -> None:
        """Journal the line (after the exchange's records), update the figures, then queue the new URLs."""
        if new:
            line["new"] = [e.to_json() for e in new]
        records = None if exchange is None else await self._off_loop_if_big(len(exchange.body), warc_records, exchange)
        for written in await self.store.commit(line, records):
            self.stats.apply(written)
        for entry in new or ():
            self._enqueue(entry)
        if line.get("outcome") == "page" and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"queued {self.queued}", refresh=False)

    @staticmethod
    async def _off_loop_if_big(size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, in a thread when it works on a big body (so the loop keeps serving the other requests), else
        right here: on small ones a thread would cost more in GIL hand-offs with the event loop than it saves."""
        if size < INLINE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # --- HTTP

    async def _request(self, url: str, kind: str) -> Exchange | str:
        """One GET without following redirects: the exchange, or "timeout" / "error" if no response came."""
        cap = ROBOTS_MAX_BYTES if kind == "robots" else self.cfg.max_page_bytes
        date = datetime.now(timezone.utc)
        try:
            async with self.session.get(URL(url, encoded=True), allow_redirects=False) as resp:
                content_type = resp.headers.get("Content-Type")
                ex = Exchange(
                    url=url, date=date, request_headers=list(resp.request_info.headers.items()),
                    version=f"HTTP/{resp.version.major}.{resp.version.minor}", status=resp.status,
                    reason=resp.reason or "", content_type=content_type,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers])
                media = content_type.split(";")[0].strip().lower() if content_type else None
                if kind == "page" and media is not None and media not in HTML_TYPES:
                    ex.truncated = "unspecified"  # not HTML: the body is not downloaded
                    resp.close()
                    return ex
                body = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    if len(body) + len(chunk) > cap:
                        body += chunk[: cap - len(body)]
                        ex.truncated = "length"
                        resp.close()  # drop the connection rather than drain the rest
                        break
                    body += chunk
                ex.body = bytes(body)
                return ex
        except asyncio.TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, ValueError):  # ValueError: a URL that aiohttp cannot request
            return "error"

    async def _fetch_with_retries(self, host: _Host, url: str, kind: str, line_type: str) -> Exchange | str:
        """`_request`, again after a backoff while the answer is transient (no response, 429, 5xx) and retries are
        left; each failed try that got a response is recorded. The host waits out the backoff too."""
        attempt = 0
        while True:
            result = await self._request(url, kind)
            wait = _retry_after(result) if isinstance(result, Exchange) else 0.0
            if wait is None or attempt == self.cfg.retries:
                return result
            host.back_off(max(wait, BACKOFF_S * 2**attempt))
            exchange = result if isinstance(result, Exchange) else None
            await self._commit({"t": line_type, "url": url, "outcome": "retry",
                                **(exchange.fields() if exchange else {"error": result})}, exchange)
            attempt += 1
            await host.turn()

    async def _robots(self, host: _Host) -> None:
        """Fetch and apply the host's robots.txt (RFC 9309 §2.3.1); then queue its sitemaps if asked to."""
        url = f"{host.origin}/robots.txt"
        for hop in range(ROBOTS_MAX_REDIRECTS + 1):
            if hop:
                await host.turn()
            result = await self._fetch_with_retries(host, url, "robots", "robots")
            line: dict[str, Any] = {"t": "robots", "url": url}
            if isinstance(result, str):
                line["outcome"] = result
                break
            line.update(result.fields())
            target = normalize_url(result.location, url) if result.location else None
            if target and hop < ROBOTS_MAX_REDIRECTS:
                await self._commit({**line, "outcome": "redirect"}, result)
                url = target
                continue
            if 200 <= result.status < 300:
                # utf-8-sig: a leading BOM (RFC 9309 §2.3 allows one) would glue onto the first "User-agent" line
                host.rules = Protego.parse(result.body.decode("utf-8-sig", errors="replace"))
                line["outcome"] = "rules"
            else:  # 4xx (and redirects past the limit) mean "no robots.txt": all allowed; 429/5xx mean none
                host.allow_all = result.status < 500 and result.status != 429
                line["outcome"] = "allow-all" if host.allow_all else "disallow-all"
            break
        new: list[_Entry] = []
        if self.cfg.sitemaps and host.origin in self.seed_origins and (host.rules is not None or host.allow_all):
            listed = list(host.rules.sitemaps) if host.rules is not None else []
            skips: Counter = Counter()
            for sitemap in listed or [f"{host.origin}/sitemap.xml"]:
                self._admit(sitemap, None, 0, skips, new, kind="sitemap")
        crawl_delay = host.rules.crawl_delay(self.robot_name) if host.rules is not None else None
        host.delay = max(self.cfg.delay, float(crawl_delay or 0.0))
        host.next_time = max(host.next_time, host.last_start + host.delay)
        host.state = "ready"
        await self._commit(line, None if isinstance(result, str) else result, new)

    async def _fetch_entry(self, host: _Host, entry: _Entry) -> None:
        result = await self._fetch_with_retries(host, entry.url, entry.kind, "fetch")
        line: dict[str, Any] = {"t": "fetch", "url": entry.url}
        if isinstance(result, str):
            await self._commit({**line, "outcome": result})
            return
        line.update(result.fields())
        skips: Counter = Counter()
        new: list[_Entry] = []
        if result.location is not None:
            line["outcome"] = "redirect"  # the target is the same page: same depth, one more hop in its chain
            self._admit(result.location, entry.url, entry.depth, skips, new, via=(*entry.via, entry.url),
                        kind=entry.kind)
        elif not 200 <= result.status < 300:
            line["outcome"] = "http-error"
        elif entry.kind == "sitemap":
            line["outcome"] = "sitemap"
            locs, is_index = sitemap_locs(result.body, self.cfg.max_page_bytes)
            for loc in locs:
                if is_index:
                    self._admit(loc, entry.url, entry.depth + 1, skips, new, kind="sitemap")
                else:
                    self._admit(loc, entry.url, 0, skips, new)
        else:
            line["outcome"] = self._classify(result)
            if line["outcome"] == "page":
                links, base = await self._off_loop_if_big(len(result.body), extract_links, result.body,
                                                          charset_of(result.content_type), entry.url)
                # A '/path' link means the same on every page of a site: resolved against the origin, its
                # normalization is cached once for the whole site (menus, footers) rather than once per page.
                origin = origin_of(base)
                for link in links:
                    rooted = link.startswith("/") and not link.startswith("//")
                    self._admit(link, origin if rooted else base, entry.depth + 1, skips, new)
        if skips:
            line["skips"] = dict(skips)
        await self._commit(line, result, new)

    @staticmethod
    def _classify(ex: Exchange) -> str:
        """A 2xx answer to a page request: "page", or why it is not one."""
        if ex.truncated == "unspecified" or (ex.content_type is None and not ex.body.lstrip().startswith(b"<")):
            return "non-html-type"
        # the Content-Type said HTML; the bytes say otherwise (extract's rule: what is kept here is read there)
        if looks_binary(ex.body):
            return "binary-body"
        return "truncated" if ex.truncated else "page"

    # --- the whole run

    def _interrupt(self) -> None:
        if self.stopping:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once (in-flight URLs are queued again on resume)
        self.stopping = True
        self.wake.set()
        info(f"crawl: stopping after the {self.inflight} requests in flight (Ctrl-C again to stop at once)")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.store.start(loop)
        try:  # the first Ctrl-C lets the requests in flight finish, so none of them is fetched again
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
            own_sigint = True
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread: asyncio's way
            own_sigint = False
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            headers={"User-Agent": self.cfg.user_agent}, cookie_jar=aiohttp.DummyCookieJar(),
        ) as self.session:
            workers = [asyncio.create_task(self._worker()) for _ in range(self.cfg.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:  # Ctrl-C or an error: stop every worker; what is in flight is fetched again on resume
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if own_sigint:
                    loop.remove_signal_handler(signal.SIGINT)

    def figures(self, seconds: float) -> dict[str, Any]:
        s = self.stats
        this_run = s.pages - self.pages_at_start
        return {
            "pages": s.pages, "pages_this_run": this_run, "seconds": round(seconds, 3),
            "pages_per_s": round(this_run / max(seconds, 1e-9), 2), "bytes": s.bytes,
            "responses_by_status": dict(sorted(s.by_status.items())),
            "robots_txt_by_status": dict(sorted(s.robots_by_status.items())),
            "robots_disallowed": s.robots_disallowed, "skipped": dict(sorted(s.skipped.items())),
            "redirects": s.redirects, "retries": s.retries, "sitemaps": s.sitemaps, "queued_left": self.queued,
            "hosts": len(self.hosts), "warc_files": s.warc_files,
            "warc_bytes": sum((self.out / f).stat().st_size for f in s.warc_files), "sessions": s.sessions,
        }


def _check_config(cfg: CrawlConfig) -> tuple[list[str], list[str]]:
    """The normalized seeds and allowed domains, or a one-line error."""
    if not cfg.seeds:
        raise NanoforgeError("crawl: no seed URL given")
    seeds = []
    for raw in cfg.seeds:
        url = normalize_url(raw)
        if url is None:
            raise NanoforgeError(f"seed {raw!r}: not an http(s) URL")
        if url not in seeds:
            seeds.append(url)
    domains = [d.strip().lower().strip(".") for d in cfg.allow_domains]
    if any(not d or "/" in d or ":" in d for d in domains):
        raise NanoforgeError(f"--allow-domain {cfg.allow_domains}: give host names such as example.org")
    domains = domains or sorted({urlsplit(s).hostname or "" for s in seeds})
    outside = [s for s in seeds if not in_domains(s, domains)]
    if outside:
        raise NanoforgeError(f"seed {outside[0]} is outside the allowed domains ({', '.join(domains)})")
    for name in ("max_pages", "concurrency", "max_page_bytes", "warc_max_bytes"):
        if getattr(cfg, name) < 1:
            raise NanoforgeError(f"crawl: {name} must be at least 1, not {getattr(cfg, name)}")
    for name in ("max_depth", "delay", "retries"):
        if getattr(cfg, name) < 0:
            raise NanoforgeError(f"crawl: {name} must not be negative, not {getattr(cfg, name)}")
    if cfg.timeout <= 0:
        raise NanoforgeError(f"crawl: timeout must be positive, not {cfg.timeout}")
    return seeds, domains


def crawl(cfg: CrawlConfig, out: Path, *, inputs: dict[str, Path] | None = None) -> dict[str, Any]:
    """The `crawl` stage: fetch from `cfg.seeds` into `out` (continuing a crawl already there); the manifest.

    `inputs` are artifacts the crawl depends on (the pipeline passes the local site it serves), recorded
    with their hashes in the manifest.
    """
    seeds, domains = _check_config(cfg)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NanoforgeError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is changing; a manifest would claim it finished
    crawler = _Crawler(cfg, out, seeds, domains)
    if crawler.stats.sessions > 1:
        info(f"crawl: continuing in {out}: {crawler.stats.pages} pages done, {crawler.queued} URLs queued")
    t0 = time.perf_counter()
    try:
        with tqdm(total=cfg.max_pages, initial=crawler.stats.pages, unit="page", desc="crawl", dynamic_ncols=True,
                  file=sys.stderr) as crawler.bar:
            asyncio.run(crawler.run())
        if crawler.stopping:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        info(f"crawl: stopped after {crawler.stats.pages} pages; run the same command again to continue")
        raise
    finally:
        crawler.store.close()  # what was handed to the writer is written: every file ends on a whole record
    figures = crawler.figures(time.perf_counter() - t0)
    skipped = ", ".join(f"{k} {v}" for k, v in figures["skipped"].items()) or "none"
    info(f"crawl: {figures['pages']} pages ({figures['pages_per_s']:.1f}/s this run), {figures['bytes'] / 1e6:.1f} MB "
         f"in {len(figures['warc_files'])} WARC files; robots-disallowed {figures['robots_disallowed']}; "
         f"skipped: {skipped}")
    return write_manifest(out, stage="crawl", config=cfg, inputs=inputs, figures=figures)
