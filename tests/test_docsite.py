import urllib.error
import urllib.request

import pytest

from nanoforge.data.docsite import build_site, serve_site
from nanoforge.data.pydoc_corpus import CorpusConfig
from nanoforge.errors import NanoforgeError


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, "", ""


def test_site_serves_linked_module_pages_robots_and_sitemap(tmp_path):
    m = build_site(CorpusConfig(modules=["json", "textwrap", "no_such_module_xyz"], workers=1), tmp_path / "site")
    assert m["figures"]["pages"] == 2 and m["figures"]["modules_skipped"] == ["no_such_module_xyz"]
    with serve_site(tmp_path / "site") as url:
        assert url.startswith("http://127.0.0.1:")
        status, ctype, index = _get(url)
        assert status == 200 and 'href="json.html"' in index and 'href="textwrap.html"' in index
        status, ctype, page = _get(url + "json.html")
        assert status == 200 and ctype.startswith("text/html") and "JSON" in page and "dumps" in page
        status, _, robots = _get(url + "robots.txt")
        assert "Disallow: /private/" in robots and f"Sitemap: {url}sitemap.xml" in robots
        _, _, sitemap = _get(url + "sitemap.xml")
        assert f"<loc>{url}json.html</loc>" in sitemap
        assert _get(url + "missing.html")[0] == 404
    with pytest.raises(NanoforgeError, match="not a site directory"):
        with serve_site(tmp_path):
            pass


def test_machine_paths_show_as_visible_placeholders_in_html(tmp_path):
    build_site(CorpusConfig(modules=["textwrap"], workers=1), tmp_path / "site")
    page = (tmp_path / "site" / "textwrap.html").read_text()
    assert "&lt;python&gt;/lib/" in page and "<python>" not in page


def test_pages_are_the_same_on_every_build(tmp_path):
    # configparser's page shows default values whose reprs carry memory addresses ("<object at 0x7f…>")
    pages = []
    for run in ("a", "b"):
        build_site(CorpusConfig(modules=["configparser"], workers=1), tmp_path / run)
        pages.append((tmp_path / run / "configparser.html").read_text())
    assert "0x7" not in pages[0] and "at&nbsp;0x" not in pages[0]
    assert pages[0] == pages[1]
