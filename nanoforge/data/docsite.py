"""The embedded default web site: the Python standard library documentation as linked HTML pages.

`nanoforge demo` builds it once (pydoc renders every module as HTML, in sanitized child processes), then
serves it on 127.0.0.1 at a free port while the crawler collects it, exactly as it would collect any
site. So the corpus comes from a real crawl on any machine with Python and no internet:

    nanoforge site --out runs/demo/01-site          # the static pages
    nanoforge site --serve runs/demo/01-site        # browse it / crawl it: prints the URL

The site has an `index.html` linking every module page, pydoc's own cross-links between modules (links to
modules that are not part of the site answer 404, as on the real web), a `/robots.txt` that disallows
`/private/` (a linked page the crawler must leave alone) and names `/sitemap.xml`.
"""

from __future__ import annotations

import html
import http.server
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from nanoforge.artifacts import atomic_dir, atomic_write_text, write_manifest
from nanoforge.data.pydoc_corpus import CorpusConfig, render_modules, selected_modules
from nanoforge.errors import NanoforgeError

ROBOTS = "User-agent: *\nDisallow: /private/\n"


def _index_page(names: list[str]) -> str:
    items = "\n".join(f'<li><a href="{html.escape(n)}.html">{html.escape(n)}</a></li>' for n in names)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Python {platform.python_version()} standard library</title></head>\n<body>\n"
            f"<h1>Python {platform.python_version()} standard library documentation</h1>\n"
            f"<p>Rendered by pydoc; one page per module. <a href=\"private/\">Maintainers</a></p>\n"
            f"<ul>\n{items}\n</ul>\n</body></html>\n")


def build_site(cfg: CorpusConfig, out: Path) -> dict:
    """The `site` stage: one HTML page per module plus an index, written atomically to `out`."""
    t0 = time.time()
    names = selected_modules(cfg)
    rendered = render_modules(names, cfg.workers, fmt="html")
    pages = [n for n in names if rendered.get(n)]
    if not pages:
        raise NanoforgeError("site: none of the selected modules could be imported and rendered")
    with atomic_dir(out) as tmp:
        for n in pages:
            atomic_write_text(tmp / f"{n}.html", rendered[n] or "")
        atomic_write_text(tmp / "index.html", _index_page(pages))
        (tmp / "private").mkdir()
        atomic_write_text(tmp / "private" / "index.html",
                          "<!DOCTYPE html><html><body><p>Not for crawlers.</p></body></html>\n")
        size = sum(len((rendered[n] or "").encode()) for n in pages)
        figures = {"pages": len(pages), "bytes": size, "python": platform.python_version(),
                   "modules_skipped": sorted(set(names) - set(pages)), "seconds": round(time.time() - t0, 2)}
        return write_manifest(tmp, stage="site", config=cfg, figures=figures)


class _SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus robots.txt and sitemap.xml generated with this server's own address."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path in ("/robots.txt", "/sitemap.xml"):
            base = f"http://{self.headers.get('Host') or '127.0.0.1'}"
            if self.path == "/robots.txt":
                body, ctype = f"{ROBOTS}Sitemap: {base}/sitemap.xml\n", "text/plain; charset=utf-8"
            else:
                urls = "".join(f"<url><loc>{base}/{html.escape(p.name)}</loc></url>"
                               for p in sorted(Path(self.directory).glob("*.html")))
                body = ('<?xml version="1.0" encoding="UTF-8"?>\n<urlset xmlns="http://www.sitemaps.org/'
                        f'schemas/sitemap/0.9">{urls}</urlset>\n')
                ctype = "application/xml"
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # a crawl makes hundreds of requests; the crawler reports them


@contextmanager
def serve_site(site: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the static site in a background thread; yields its base URL (port 0 = a free port)."""
    site = Path(site)
    if not (site / "index.html").exists():
        raise NanoforgeError(f"{site}: not a site directory (no index.html; run `nanoforge site` first)")
    server = http.server.ThreadingHTTPServer((host, port), partial(_SiteHandler, directory=str(site)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="docsite", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
