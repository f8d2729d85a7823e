"""The CLI wiring of the corpus stages: flags reach the stage configs and results are printed."""

import pyarrow.parquet as pq

from nanoforge.artifacts import read_manifest
from nanoforge.cli import main
from nanoforge.data.docsite import serve_site


def test_site_crawl_extract_from_the_command_line(tmp_path, capsys):
    site, crawl, docs = tmp_path / "site", tmp_path / "crawl", tmp_path / "docs"
    assert main(["site", "--out", str(site), "--modules", "json,textwrap,string", "--workers", "1"]) == 0
    assert "3 pages" in capsys.readouterr().out
    with serve_site(site) as url:
        assert main(["crawl", url, "--out", str(crawl), "--max-pages", "3", "--delay", "0",
                     "--concurrency", "2", "--user-agent", "nanoforge-test"]) == 0
    m = read_manifest(crawl)
    assert m["config"]["max_pages"] == 3 and m["config"]["user_agent"] == "nanoforge-test"
    assert m["figures"]["pages"] == 3 and m["figures"]["robots_disallowed"] == 1  # the index links /private/
    assert main(["extract", str(crawl), "--out", str(docs), "--workers", "1", "--extractor", "trafilatura"]) == 0
    assert "documents written" in capsys.readouterr().out
    table = pq.read_table(next(docs.glob("*.parquet")))
    assert table.num_rows == 3 and set(table.column("extractor").to_pylist()) == {"trafilatura"}


def test_bad_crawl_input_is_one_line(tmp_path, capsys):
    assert main(["crawl", "ftp://example.org/", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
