"""URLs and links for the crawler (`nanoforge.data.crawl`): its URL key, scope tests, and what it reads in
a fetched page (links, <base href>, sitemap <loc>s, the charset)."""

from __future__ import annotations

import codecs
import functools
import html
import re
import zlib
from html.parser import HTMLParser
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

# Links ending so are not HTML: skipped before any request is made.
NON_HTML_EXTENSIONS = frozenset(
    "7z aac apk avi bin bmp bz2 css csv deb dmg doc docx eot epub exe flac gif gz ico iso jar jpeg jpg js json m4a "
    "mkv mov mp3 mp4 mpeg mpg msi odt ogg otf pdf png ppt pptx ps rar rpm rss svg swf tar tgz tif tiff ttf txt wav "
    "webm webp wmv woff woff2 xls xlsx xml xz zip".split()
)
_HAS_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")
_SITEMAP_LOC = re.compile(rb"<loc>\s*(.*?)\s*</loc>", re.S | re.I)
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})?")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


# ------------------------------------------------------------------------------------------------ URLs


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4: '/a/./b/../c' → '/a/c' (a trailing '.' or '..' leaves the trailing slash)."""
    segments = path.split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg in (".", ".."):
            if seg == ".." and len(out) > 1:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/".join(out)


def _normalize_percent(text: str) -> str:
    """RFC 3986 §6.2.2.1-2: '%7e' → '~' (an unreserved character is the same URL either way), '%2f' → '%2F',
    and a '%' that starts no escape → '%25', so that each resource has one spelling."""

    def fix(m: re.Match) -> str:
        if m.group(1) is None:
            return "%25"
        char = chr(int(m.group(1), 16))
        return char if char in _UNRESERVED else "%" + m.group(1).upper()

    return _PERCENT.sub(fix, text)


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The crawler's key for a URL (resolved against `base`), or None if it is not an http(s) URL.

    Drops the fragment and any user info, lowercases scheme and host (IDNA-encoded), removes the default port,
    percent-encodes what must be and normalises the escapes there are (`_normalize_percent`), resolves '.' and
    '..' (after that, so that '%2E' counts as '.'), keeps the query: 'HTTP://Ex.org:80/a/../b?q#f' →
    'http://ex.org/b?q'.
    """
    url = url.strip().replace("\t", "").replace("\n", "").replace("\r", "")  # as browsers do (WHATWG URL)
    try:
        parts = urlsplit(urljoin(base, url) if base and not _HAS_SCHEME.match(url) else url)
        port = parts.port
        host = parts.hostname
        if host and not host.isascii():
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None or port == {"http": 80, "https": 443}[scheme] else f"{host}:{port}"
    path = _remove_dot_segments(_normalize_percent(quote(parts.path, safe="/%!$&'()*+,;=:@~"))) or "/"
    query = _normalize_percent(quote(parts.query, safe="/?%!$&'()*+,;=:@~"))
    return urlunsplit((scheme, netloc, path, query, ""))


normalize_cached = functools.lru_cache(maxsize=1 << 16)(normalize_url)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def in_domains(url: str, domains: list[str]) -> bool:
    host = urlsplit(url).hostname or ""
    return any(host == d or host.endswith("." + d) for d in domains)


def has_non_html_extension(url: str) -> bool:
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    return "." in name and name.rsplit(".", 1)[1].lower() in NON_HTML_EXTENSIONS


# --------------------------------------------------------------------------------------------- content


class _LinkParser(HTMLParser):
    """Collects link targets (a/area href, frame/iframe src) and the first <base href>."""

    _ATTRS = {"a": "href", "area": "href", "frame": "src", "iframe": "src", "base": "href"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.base: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        name = self._ATTRS.get(tag)
        value = dict(attrs).get(name) if name else None
        if value is None:
            return
        if tag != "base":
            self.links.append(value)
        elif self.base is None:
            self.base = value


def extract_links(body: bytes, charset: str, url: str) -> tuple[list[str], str]:
    """The links of an HTML page as written, and the URL to resolve them against (its <base href> or `url`)."""
    parser = _LinkParser()
    parser.feed(body.decode(charset, errors="replace"))
    parser.close()
    return parser.links, urljoin(url, parser.base) if parser.base else url


def sitemap_locs(body: bytes, max_bytes: int) -> tuple[list[str], bool]:
    """(the <loc> URLs of a sitemap, whether it is a sitemap index); gzipped sitemaps are inflated (capped)."""
    if body[:2] == b"\x1f\x8b":
        try:
            body = zlib.decompressobj(wbits=31).decompress(body, max_bytes)
        except zlib.error:
            return [], False
    locs = [html.unescape(m.decode("utf-8", errors="replace")) for m in _SITEMAP_LOC.findall(body)]
    return locs, b"<sitemapindex" in body


def charset_of(content_type: str | None) -> str:
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            try:
                return codecs.lookup(value.strip().strip("\"'")).name
            except LookupError:
                break
    return "utf-8"
