"""Crawl speed: the `nanoforge crawl` stage vs a bare aiohttp fetch loop, same local site, same run.

    python benchmarks/bench_crawl.py               # 2000 pages
    python benchmarks/bench_crawl.py --pages 5000
    python benchmarks/bench_crawl.py --quick       # 200 pages, a few seconds (tests/CI)

A local aiohttp server (its own process, 127.0.0.1) serves N generated HTML pages of ~6 KB, each linking to
ten others (/p0 reaches them all), plus a robots.txt. Then, with 8 requests in flight and no delay:

- ours: the whole `crawl` stage (robots.txt, scheduling, link extraction, URL normalization, WARC records with
  digests, gzip, fsync and the journal), timed end to end until its manifest is written;
- peer: a bare aiohttp loop that GETs the same N URLs, known in advance, and reads the bodies: no parsing, no
  politeness, nothing written. It is the ceiling of this machine and this server, not a rival crawler.

Prints both rates and the ratio, and appends one JSON line to bench-results/bench_crawl.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from nanoforge.data.crawl import CrawlConfig, crawl

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the crawler reads pages and follows links while the server answers every request quickly".split()


def make_pages(n: int, seed: int = 0) -> dict[str, bytes]:
    """N pages /p0…/p{n-1}: ~6 KB of text and ten links each; /p{i} links to /p{i+1}, so /p0 reaches them all."""
    rng = random.Random(seed)
    pages = {}
    for i in range(n):
        links = [(i + 1) % n, *(rng.randrange(n) for _ in range(9))]
        text = " ".join(rng.choice(WORDS) for _ in range(900))
        body = (f"<!doctype html><html><head><title>page {i}</title></head><body><p>{text}</p><ul>"
                + "".join(f'<li><a href="/p{j}">page {j}</a></li>' for j in links) + "</ul></body></html>")
        pages[f"/p{i}"] = body.encode()
    return pages


def serve(n: int, port_pipe) -> None:
    """The site, in its own process so that it does not share a core's GIL with the crawler."""
    pages = make_pages(n)

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/robots.txt":
            return web.Response(text="User-agent: *\nAllow: /\n")
        body = pages.get(request.path)
        if body is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=body, content_type="text/html")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port_pipe.send(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def bare_fetch(urls: list[str], concurrency: int) -> int:
    """GET every URL with `concurrency` requests in flight and read the bodies; returns the bytes read."""
    queue = list(reversed(urls))
    total = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal total
        while queue:
            async with session.get(queue.pop()) as resp:
                total += len(await resp.read())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument("--quick", action="store_true", help="200 pages, one run")
    parser.add_argument("--results", type=Path, default=ROOT / "bench-results" / "bench_crawl.jsonl")
    args = parser.parse_args()
    if args.quick:
        args.pages, args.repeat = 200, 1

    parent, child = mp.Pipe()
    server = mp.Process(target=serve, args=(args.pages, child), daemon=True)
    server.start()
    try:
        port = parent.recv()
        base = f"http://127.0.0.1:{port}"
        urls = [f"{base}/p{i}" for i in range(args.pages)]
        ours_s, peer_s, figures = [], [], {}
        for _ in range(args.repeat):  # interleaved, best of each: the machine may be shared
            with tempfile.TemporaryDirectory() as tmp:
                cfg = CrawlConfig(seeds=[urls[0]], max_pages=args.pages, max_depth=args.pages, delay=0.0,
                                  concurrency=args.concurrency)
                t0 = time.perf_counter()
                figures = crawl(cfg, Path(tmp) / "crawl")["figures"]
                ours_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            asyncio.run(bare_fetch(urls, args.concurrency))
            peer_s.append(time.perf_counter() - t0)
    finally:
        server.terminate()
        server.join()

    if figures["pages"] != args.pages:
        raise SystemExit(f"error: the crawl fetched {figures['pages']} pages, not {args.pages}")
    ours, peer = args.pages / min(ours_s), args.pages / min(peer_s)
    mb = figures["bytes"] / 1e6
    print(f"site: {args.pages} pages, {mb:.1f} MB of HTML, concurrency {args.concurrency}, delay 0")
    print(f"ours  nanoforge crawl (end to end, {figures['warc_bytes'] / 1e6:.1f} MB of WARC): {ours:.0f} pages/s")
    print(f"peer  bare aiohttp {aiohttp.__version__} GET loop (URLs known, nothing parsed or written): "
          f"{peer:.0f} pages/s")
    print(f"ratio {ours / peer:.2f}x of the bare fetch loop")
    result = {
        "bench": "crawl", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pages": args.pages,
        "mb": round(mb, 2), "concurrency": args.concurrency, "quick": args.quick, "repeat": args.repeat,
        "ours_pages_s": round(ours, 1), "peer_pages_s": round(peer, 1), "ratio": round(ours / peer, 3),
        "warc_mb": round(figures["warc_bytes"] / 1e6, 2), "cpus": os.cpu_count(),
        "python": platform.python_version(), "aiohttp": aiohttp.__version__,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":  # the server process imports this file; only the parent runs it
    main()
