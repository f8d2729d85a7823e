"""The web chat page of `nanoforge serve` in headless Chromium (Playwright): streaming, turns, escaping.

python -m pytest tests/test_web_chat.py -q

Needs the Debian `chromium` package at /usr/bin/chromium (`make test` installs it when missing); the
tests fail, not skip, without it. Playwright only drives that browser: no browser is ever downloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Generator

import pytest
import torch
from conftest import StreamBatch
from playwright.sync_api import Page, expect

from nanoforge.infer.chat import ChatModel, Sampling
from nanoforge.infer.engine import generate
from nanoforge.infer.server import create_app, run_server
from nanoforge.model import GPT, ModelConfig
from nanoforge.tokenizer import Tokenizer

MARKUP = "<script>window.pwned = 1; alert(1)</script><img src=x onerror=\"alert(2)\"><b>bold</b> & done"


@pytest.fixture(scope="module")
def cm(tiny_tokenizer) -> ChatModel:
    torch.manual_seed(0)
    tok = Tokenizer.load(tiny_tokenizer)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=64, n_layer=2, n_embd=32, n_head=4))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharper, so greedy text has some variety
    return ChatModel(model, tok, name="tiny-chat")


class ScriptedModel(ChatModel):
    """Answers turn i with `replies[i]`, token by token; after `pause_at` tokens of the first reply (if
    given) it waits for `gate`, so the test can look at a half-streamed reply. Records the prompts it is given."""

    def __init__(self, base: ChatModel, replies: list[str], pause_at: int | None = None) -> None:
        super().__init__(base.model, base.tok, name=base.name)
        self.replies, self.pause_at = replies, pause_at
        self.gate = threading.Event()
        self.prompts: list[list[int]] = []

    def batch(self, max_batch: int) -> StreamBatch:  # the server decodes through `stream` below
        return StreamBatch(self.stream, max_batch)

    def stream(self, prompt: list[int], sampling: Sampling, stop_tokens) -> Generator[int, None, None]:
        self.prompts.append(prompt)
        for i, token in enumerate(self.tok.encode(self.replies[len(self.prompts) - 1])):
            if i == self.pause_at and len(self.prompts) == 1:
                assert self.gate.wait(20), "the test never opened the gate"
            yield token


def say(page: Page, text: str) -> None:
    """Type a message, press Enter, wait for the reply to finish streaming."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_idle(page)
    assert page.locator("#status").text_content() == ""


def wait_idle(page: Page) -> None:
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=20_000)


def test_reply_streams_into_the_page_and_the_conversation_is_kept(cm: ChatModel, page: Page) -> None:
    first, second = "Streaming works, piece by piece, é and 😀 included.", "Second answer."
    scripted = ScriptedModel(cm, [first, second], pause_at=6)
    head = cm.tok.decode(cm.tok.encode(first)[:6])
    with run_server(create_app(scripted)) as url:
        try:
            page.goto(url)
            expect(page.locator("#model")).to_contain_text("tiny-chat")
            page.fill("#input", "Hello <there>")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant .text").first
            # half the reply is on screen while the model is still generating the rest
            expect(reply).to_have_text(head, timeout=20_000)
            expect(page.locator("body")).to_have_attribute("data-state", "streaming")
        finally:
            scripted.gate.set()
        wait_idle(page)
        assert reply.text_content() == first
        say(page, "And then?")
    assert page.locator(".msg .text").all_text_contents() == ["Hello <there>", first, "And then?", second]
    turns = [{"role": "user", "content": "Hello <there>"}, {"role": "assistant", "content": first},
             {"role": "user", "content": "And then?"}]
    assert scripted.prompts[1] == cm.tok.render_prompt(turns)  # the page sent the whole conversation
    assert page.dialogs == []


def test_a_conversation_past_the_context_drops_its_oldest_turns(cm: ChatModel, page: Page) -> None:
    """The server refuses a prompt longer than the context (400 context_length_exceeded); the page then drops
    the oldest turns and asks again, as the terminal chat does, and greys the dropped ones."""
    first_reply = "The first reply is long enough to fill a good part of the small model's context window."
    question = "And now a second question, also long enough that both turns do not fit together?"
    scripted = ScriptedModel(cm, [first_reply, "Short."])
    turns = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first_reply},
             {"role": "user", "content": question}]
    assert len(cm.tok.render_prompt(turns)) >= cm.seq_len > len(cm.tok.render_prompt(turns[2:])) + 8
    with run_server(create_app(scripted)) as url:
        page.goto(url)
        say(page, "Hello")
        page.fill("#input", question)
        page.press("#input", "Enter")
        wait_idle(page)
    assert page.locator("#status").text_content() == "(dropped the oldest 2 messages: the model's context is full)"
    assert page.locator(".msg.dropped .text").all_text_contents() == ["Hello", first_reply]
    assert page.locator(".msg:not(.dropped) .text").all_text_contents() == [question, "Short."]
    assert scripted.prompts[1] == cm.tok.render_prompt(turns[2:])  # only the turn that fits was sent


def test_markup_written_by_the_model_shows_as_text(cm: ChatModel, page: Page) -> None:
    scripted = ScriptedModel(cm, [MARKUP])
    with run_server(create_app(scripted)) as url:
        page.goto(url)
        say(page, "<i onmouseover=alert(3)>hi</i>")  # the user's own text is shown the same way
    assert page.locator(".msg .text").all_text_contents() == ["<i onmouseover=alert(3)>hi</i>", MARKUP]
    assert page.locator("#log script, #log img, #log b, #log i").count() == 0
    assert page.evaluate("window.pwned") is None and page.dialogs == []
    assert "&lt;script&gt;" in page.locator(".msg.assistant .text").inner_html()


def test_real_model_reply_behind_an_api_key(cm: ChatModel, page: Page) -> None:
    prompt = cm.chat_prompt([{"role": "user", "content": "What does json do?"}])
    expected = generate(cm.model, [prompt], max_new_tokens=8, temperature=0.0, stop_tokens=cm.chat_stop)[0]
    assert len(expected) > 2  # a reply of several tokens, streamed into the page
    with run_server(create_app(cm, api_key="sekret")) as url:
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("API key")
        page.click("#settings summary")
        page.fill("#api-key", "sekret")
        page.press("#api-key", "Tab")  # commits the field: the page fetches the model list with the key
        expect(page.locator("#model")).to_contain_text("context 64")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        say(page, "What does json do?")
    assert page.locator(".msg.assistant .text").text_content() == cm.tok.decode(expected)
    assert page.locator("#status").text_content() == ""
