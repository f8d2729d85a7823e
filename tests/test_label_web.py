"""The labelling page of `nanoforge label` in headless Chromium (Playwright): a round of clicks and keys, and
markup written by the model (or in a prompt, a reference, an annotator's name) staying inert text.

python -m pytest tests/test_label_web.py -q

Needs the Debian `chromium` package at /usr/bin/chromium (`make test` installs it when missing); the test
fails, not skips, without it. Playwright only drives that browser: no browser is ever downloaded.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from nanoforge.feedback.app import create_app
from nanoforge.feedback.store import FeedbackStore, Item
from nanoforge.infer.server import run_server

MARKUP = "<script>window.pwned = 1; alert(1)</script><img src=x onerror=\"alert(2)\"><b>bold</b> & done"
NAME, TOKEN = "<i onmouseover=alert(4)>eve</i>", "eve-token-1234"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "labels.sqlite"
    store = FeedbackStore(path, seed=0)
    store.add_items([Item([{"role": "user", "content": f"{MARKUP} prompt {i}"}],
                          (f"{MARKUP} zero {i}", f"{MARKUP} one {i}"), ({"row": i, "t": 0}, {"row": i, "t": 1}),
                          reference=f"{MARKUP} reference") for i in range(5)])
    store.add_annotator(NAME, TOKEN)
    store.close()
    return path


def shown(page: Page) -> tuple[str, str]:
    return page.locator("#response-a").text_content(), page.locator("#response-b").text_content()


def next_shown(page: Page, before: tuple[str, str]) -> tuple[str, str]:
    """Wait until the page shows another item; returns its (A, B) texts."""
    expect(page.locator("#response-a")).not_to_have_text(before[0], timeout=10_000)
    return shown(page)


def test_a_round_of_labelling_with_clicks_and_keys(db: Path, page: Page) -> None:
    with run_server(create_app(db, seed=0)) as url:
        page.goto(url)
        page.fill("#token", "not-the-token")
        page.press("#token", "Enter")
        expect(page.locator("#status")).to_have_text("unknown token")
        expect(page.locator("#login")).to_be_visible()
        page.fill("#token", TOKEN)
        page.press("#token", "Enter")
        expect(page.locator("#item")).to_be_visible()
        expect(page.locator("#who")).to_have_text(NAME)

        # everything the model, the prompt file and the roster wrote is text, never markup
        a, b = shown(page)
        assert {a.rsplit(" ", 2)[0], b.rsplit(" ", 2)[0]} == {MARKUP}
        assert page.locator("#prompt pre").text_content().startswith(MARKUP)
        assert page.locator("#reference").text_content() == f"{MARKUP} reference"
        assert page.locator("body script, #item img, #item b, header i").count() == 0
        assert "&lt;script&gt;" in page.locator("#response-a").inner_html()

        seen = [(a, b)]
        page.click("#choices button[data-choice=A]")
        seen.append(next_shown(page, seen[-1]))
        page.keyboard.press("b")
        seen.append(next_shown(page, seen[-1]))
        page.keyboard.press("r")  # into the reason box: keys there are text, not choices
        page.keyboard.type("about the same <b>length</b>")
        page.keyboard.press("Escape")
        page.keyboard.press("3")
        seen.append(next_shown(page, seen[-1]))
        page.click("#choices button[data-choice=skip]")
        seen.append(next_shown(page, seen[-1]))
        page.keyboard.press("a")
        expect(page.locator("#done")).to_be_visible()
        expect(page.locator("#progress")).to_have_text("5 judged in this session")

        page.goto(url + "stats")  # the token stays in this tab's sessionStorage
        summary = "4 of 5 items judged (80.0%), 5 judgements (0 simulated)"  # a skip is no verdict
        expect(page.locator("#summary")).to_have_text(summary)
        expect(page.locator("#annotators tbody td").first).to_have_text(NAME)
        assert page.locator("#annotators i").count() == 0
    assert page.evaluate("window.pwned") is None and page.dialogs == []

    con = sqlite3.connect(db)
    got = con.execute("SELECT j.choice, j.reason, j.preferred, j.left_response, i.response_0, i.response_1 "
                      "FROM judgements j JOIN items i ON i.id = j.item_id ORDER BY j.id").fetchall()
    con.close()
    assert [(c, r) for c, r, *_ in got] == [("A", None), ("B", None), ("tie", "about the same <b>length</b>"),
                                            ("skip", None), ("A", None)]
    for (choice, _, preferred, left, r0, r1), (a, b) in zip(got, seen, strict=True):
        assert (a, b) == ((r0, r1) if left == 0 else (r1, r0))  # the side order the page showed is recorded
        assert preferred == {"A": left, "B": 1 - left}.get(choice)
