"""`nanoforge serve` (nanoforge/infer/server.py): the OpenAI client against it, request validation, the queue.

python -m pytest tests/test_serve.py -q

A tiny random GPT with the tiny tokenizer stands in for a trained model: at temperature 0 its replies are
fixed, so every answer is checked against `generate` called directly. A scripted model (fixed reply,
optionally one token at a time behind a gate) drives the queue, disconnect and stop-string tests.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from aiohttp import web
from conftest import StreamBatch

from nanoforge.infer.batching import ContinuousBatch
from nanoforge.infer.chat import ChatModel, Sampling
from nanoforge.infer.engine import generate
from nanoforge.infer.server import StopStrings, create_app, run_server
from nanoforge.model import GPT

NAME = "tiny-chat"
KEY = "sekret-key"


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model: Path) -> Path:
    return tiny_chat_model


@pytest.fixture(scope="module")
def cm(model_dir: Path) -> ChatModel:
    return ChatModel.load(model_dir, "cpu")


@pytest.fixture(scope="module")
def url(cm: ChatModel) -> Iterator[str]:
    with run_server(create_app(cm)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)


class ScriptedModel(ChatModel):
    """Replies `reply` whatever the prompt, one token at a time; each token waits for `gate` (if any) and
    then `delay` seconds. Records the prompts it was given and how many tokens it produced."""

    def __init__(self, base: ChatModel, reply: str, gate: threading.Event | None = None, delay: float = 0.0):
        super().__init__(base.model, base.tok, name=base.name)
        self.reply_ids = base.tok.encode(reply)
        self.gate, self.delay = gate, delay
        self.prompts: list[list[int]] = []
        self.produced = 0

    def batch(self, max_batch: int) -> StreamBatch:  # the server decodes through `stream` below
        return StreamBatch(self.stream, max_batch)

    def stream(self, prompt: list[int], sampling: Sampling, stop_tokens) -> Generator[int, None, None]:
        self.prompts.append(prompt)
        for token in self.reply_ids[: sampling.max_new_tokens]:
            if self.gate is not None:
                assert self.gate.wait(20), "the test never opened the gate"
            time.sleep(self.delay)
            self.produced += 1
            yield token


def post(url: str, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST `body` (JSON, or bytes as they are); the status and the JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path.lstrip("/"), data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url + path.lstrip("/"), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def greedy(cm: ChatModel, prompt: list[int], n: int, stop: tuple[int, ...]) -> list[int]:
    return generate(cm.model, [prompt], max_new_tokens=n, temperature=0.0, stop_tokens=stop)[0]


MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does json do?"}]


def test_openai_chat_completion_streamed_and_not_equals_the_engine(cm: ChatModel, client: openai.OpenAI) -> None:
    prompt = cm.chat_prompt(MESSAGES)
    expected = greedy(cm, prompt, 12, cm.chat_stop)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == cm.tok.decode(expected)
    assert r.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(expected))
    assert r.usage.total_tokens == len(prompt) + len(expected)

    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # streamed in pieces, not in one block
    assert "".join(deltas) == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert len({c.id for c in chunks}) == 1


def test_openai_text_completion_streamed_and_not_equals_the_engine(cm: ChatModel, client: openai.OpenAI) -> None:
    prompt_text = "Return the"
    prompt = [cm.tok.bos_id, *cm.tok.encode(prompt_text)]
    expected = greedy(cm, prompt, 10, cm.text_stop)
    r = client.completions.create(model=NAME, prompt=prompt_text, temperature=0, max_tokens=10)
    assert r.object == "text_completion"
    assert r.choices[0].text == cm.tok.decode(expected)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(expected)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt_text, temperature=0, max_tokens=10, stream=True) if c.choices]
    assert "".join(pieces) == r.choices[0].text


def test_reply_is_cut_at_the_context_with_finish_reason_length(cm: ChatModel, client: openai.OpenAI) -> None:
    words = 1
    while len(cm.chat_prompt([{"role": "user", "content": "hello " * (words + 1)}])) < cm.seq_len - 6:
        words += 1
    messages = [{"role": "user", "content": "hello " * words}]
    room = cm.seq_len - len(cm.chat_prompt(messages))
    assert 0 < room < 16
    expected = greedy(cm, cm.chat_prompt(messages), 64, cm.chat_stop)
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0)  # no max_tokens: all room
    assert r.usage.completion_tokens == len(expected) <= room
    assert r.usage.total_tokens <= cm.seq_len
    assert r.choices[0].finish_reason == ("length" if len(expected) == room else "stop")


def test_models_health_page_and_headers(url: str, client: openai.OpenAI, cm: ChatModel) -> None:
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, _, body = get(url, "/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "model": NAME, "pending": 0}
    status, headers, body = get(url, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"chat.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = get(url, "/static/chat.js")
    assert status == 200 and b"textContent" in body and b"innerHTML" not in body
    status, _, body = get(url, "/static/../server.py")
    assert status == 404
    status, _, body = get(url, "/nowhere")
    assert status == 404 and json.loads(body)["error"]["message"]


OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, status, param", [
    ("chat/completions", {"messages": OK_MESSAGES}, 400, "model"),
    ("chat/completions", {"model": 7, "messages": OK_MESSAGES}, 400, "model"),
    ("chat/completions", {"model": "gpt-4", "messages": OK_MESSAGES}, 404, "model"),
    ("chat/completions", {"model": NAME}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": ["hi"]}, 400, "messages[0]"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "max_tokens": -3}, 400, "max_tokens"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "max_tokens": 10**9}, 400, "max_tokens"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "max_tokens": "12"}, 400, "max_tokens"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "max_tokens": True}, 400, "max_tokens"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "max_completion_tokens": 2.5}, 400,
     "max_completion_tokens"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "temperature": 5}, 400, "temperature"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "top_p": 0}, 400, "top_p"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "top_k": 0}, 400, "top_k"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "n": 2}, 400, "n"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "seed": "x"}, 400, "seed"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "stream": "yes"}, 400, "stream"),
    ("chat/completions", {"model": NAME, "messages": OK_MESSAGES, "stop": [""]}, 400, "stop"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "word " * 200}]}, 400,
     "messages"),
    ("completions", {"model": NAME}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", b"{not json", 400, None),
    ("chat/completions", b"[1, 2]", 400, None),
    ("chat/completions", b"[" * 100_000, 400, None),  # deeper than json.loads recurses
    ("completions", b'{"model": "tiny-chat", "prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),
    ("completions", {"model": NAME, "prompt": "a", "stop": ["x", "y" * 257]}, 400, "stop"),
    ("chat/completions", b"x" * (2 << 20), 413, None),
])
def test_bad_requests_get_a_4xx_with_a_message(url: str, path: str, body: object, status: int,
                                                param: str | None) -> None:
    got, answer = post(url, "v1/" + path, body)
    assert got == status
    error = answer["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert error["message"] and (param is None or param.split("[")[0] in error["message"])


def test_prompt_longer_than_the_context_names_the_limit(url: str, cm: ChatModel) -> None:
    _, answer = post(url, "v1/chat/completions",
                     {"model": NAME, "messages": [{"role": "user", "content": "word " * 200}]})
    assert answer["error"]["code"] == "context_length_exceeded" and f"context is {cm.seq_len}" in \
        answer["error"]["message"]


def test_values_nested_almost_too_deep_to_read_are_refused_with_a_400(url: str) -> None:
    # json.loads reads a little deeper than json.dumps can write from inside the handler: the error message
    # that quotes the refused value must not fail on it
    for depth in range(900, 1001, 10):
        nested = "[" * depth + "]" * depth
        for field in ("max_tokens", "temperature", "stream"):
            status, answer = post(url, "v1/completions", f'{{"model": "{NAME}", "prompt": "a", "{field}": {nested}}}'
                                  .encode())
            assert status == 400 and answer["error"]["type"] == "invalid_request_error", (depth, field, answer)


def test_long_stop_strings_are_refused_and_matching_costs_the_text_not_the_stop() -> None:
    # the server's limit (MAX_STOP_LENGTH) is in the bad-request cases; the matcher must not lean on it
    stops = StopStrings(["x" * 400_000])
    start = time.perf_counter()
    assert stops.push("ab") == "ab" and stops.push("cx") == "c" and stops.push("xd") == "xxd"
    assert time.perf_counter() - start < 0.5  # was quadratic in the stop string's length: seconds
    stops = StopStrings(["ld. G", "zzz"])
    assert [stops.push(p) for p in ("Hello wor", "ld. ", "Goodbye")] == ["Hello wor", "", ""] and stops.hit


def test_openai_client_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=OK_MESSAGES, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=OK_MESSAGES)


def test_api_key_is_required_on_the_api_only(cm: ChatModel) -> None:
    with run_server(create_app(cm, api_key=KEY)) as url:
        body = {"model": NAME, "messages": OK_MESSAGES, "max_tokens": 2}
        assert post(url, "v1/chat/completions", body)[0] == 401
        status, answer = post(url, "v1/chat/completions", body, {"Authorization": "Bearer wrong"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert post(url, "v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})[0] == 200
        assert get(url, "v1/models")[0] == 401
        assert get(url, "health")[0] == 200 and get(url, "")[0] == 200  # the page asks for the key itself
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model=NAME, messages=OK_MESSAGES, max_tokens=3).usage.completion_tokens
        # a key that is not UTF-8 (http.client sends str headers as Latin-1 bytes) is a wrong key, not a crash
        status, answer = post(url, "v1/chat/completions", body, {"Authorization": "Bearer \xff\xfe-key"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"


class GatedBatch(ContinuousBatch):
    """The real batch, holding the worker in each step until `gate` opens; records the batch size per step."""

    def __init__(self, model: GPT, max_batch: int, gate: threading.Event, sizes: list[int]) -> None:
        super().__init__(model, max_batch)
        self.gate, self.sizes = gate, sizes

    def step(self) -> list[tuple[int, int | None]]:
        assert self.gate.wait(20), "the test never opened the gate"
        events = super().step()
        self.sizes.append(len(self.running))
        return events


class GatedModel(ChatModel):
    def __init__(self, base: ChatModel) -> None:
        super().__init__(base.model, base.tok, name=base.name)
        self.gate, self.sizes = threading.Event(), []

    def batch(self, max_batch: int) -> GatedBatch:
        return GatedBatch(self.model, max_batch, self.gate, self.sizes)


@pytest.mark.parametrize("max_batch", [16, 2])
def test_concurrent_requests_are_decoded_together_and_all_answered(cm: ChatModel, max_batch: int) -> None:
    questions = [[{"role": "user", "content": f"question {i} about heapq"}] for i in range(6)]
    ids = [greedy(cm, cm.chat_prompt(m), 8, cm.chat_stop) for m in questions]
    assert all(len(i) == 8 for i in ids)  # no early stop: the replies overlap in time
    expected = [cm.tok.decode(i) for i in ids]
    gated = GatedModel(cm)
    with run_server(create_app(gated, max_batch=max_batch)) as url, _opened_at_exit(gated.gate):
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)

        def ask(i: int) -> str:
            kw = dict(model=NAME, messages=questions[i], temperature=0, max_tokens=8)
            if i % 2:
                chunks = client.chat.completions.create(**kw, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks)
            return client.chat.completions.create(**kw).choices[0].message.content

        with ThreadPoolExecutor(6) as pool:
            replies = pool.map(ask, range(6))
            deadline = time.monotonic() + 20  # all six arrive while the worker is held in its first step
            while json.loads(get(url, "health")[2])["pending"] < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            gated.gate.set()
            assert list(replies) == expected
    assert max(gated.sizes) == min(max_batch, 6)  # they ran together, never more than max_batch


@contextmanager
def _opened_at_exit(gate: threading.Event) -> Iterator[None]:
    try:
        yield
    finally:
        gate.set()  # a failed test must not leave the worker waiting


def test_full_queue_refuses_and_a_client_that_leaves_stops_its_generation(cm: ChatModel) -> None:
    gate = threading.Event()
    scripted = ScriptedModel(cm, "one two three four five six seven eight nine ten " * 3, gate, delay=0.01)
    with run_server(create_app(scripted, max_pending=2)) as url, _opened_at_exit(gate):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        leaving = http.client.HTTPConnection(host, int(port), timeout=20)
        leaving.request("POST", "/v1/chat/completions", json.dumps(
            {"model": NAME, "messages": OK_MESSAGES, "stream": True}), {"Content-Type": "application/json"})
        first = leaving.getresponse()
        assert first.status == 200 and b"assistant" in first.readline()  # the opening chunk
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(post, url, "v1/chat/completions", {"model": NAME, "messages": OK_MESSAGES,
                                                                     "max_tokens": 3})
            deadline = time.monotonic() + 20
            while json.loads(get(url, "health")[2])["pending"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, answer = post(url, "v1/chat/completions", {"model": NAME, "messages": OK_MESSAGES})
            assert status == 503 and "busy" in answer["error"]["message"]
            leaving.sock.close()  # the first client disconnects mid-reply
            leaving.close()
            gate.set()
            status, answer = queued.result(timeout=30)
        assert status == 200 and answer["choices"][0]["message"]["content"] == cm.tok.decode(scripted.reply_ids[:3])
        full = min(len(scripted.reply_ids), cm.seq_len - len(cm.chat_prompt(OK_MESSAGES)))
        assert scripted.produced < full + 3  # the first reply was abandoned when its client left
        deadline = time.monotonic() + 20
        while json.loads(get(url, "health")[2])["pending"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert json.loads(get(url, "health")[2])["pending"] == 0


def test_a_client_that_leaves_a_non_streamed_request_stops_its_generation(cm: ChatModel) -> None:
    scripted = ScriptedModel(cm, "one two three four five six seven eight nine ten " * 3, delay=0.05)
    full = min(len(scripted.reply_ids), cm.seq_len - len(cm.chat_prompt(OK_MESSAGES)))
    assert full >= 40  # two seconds and more of generation if nobody stops it
    with run_server(create_app(scripted)) as url:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        leaving = http.client.HTTPConnection(host, int(port), timeout=20)
        leaving.request("POST", "/v1/chat/completions", json.dumps({"model": NAME, "messages": OK_MESSAGES}),
                        {"Content-Type": "application/json"})
        deadline = time.monotonic() + 20
        while scripted.produced < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        leaving.sock.close()  # the client gives up before the whole reply is generated
        leaving.close()
        while json.loads(get(url, "health")[2])["pending"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert json.loads(get(url, "health")[2])["pending"] == 0
        assert scripted.produced < full // 2  # it left the batch, not after max_tokens


def test_a_stream_whose_headers_cannot_be_sent_stops_its_generation(cm: ChatModel,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    prepare = web.StreamResponse.prepare

    async def failing(self: web.StreamResponse, request: web.BaseRequest):  # the client is gone already
        if self.content_type == "text/event-stream":
            raise ConnectionResetError("Cannot write to closing transport")
        return await prepare(self, request)

    monkeypatch.setattr(web.StreamResponse, "prepare", failing)
    scripted = ScriptedModel(cm, "one two three four five six seven eight nine ten " * 3, delay=0.05)
    full = min(len(scripted.reply_ids), cm.seq_len - len(cm.chat_prompt(OK_MESSAGES)))
    with run_server(create_app(scripted)) as url:
        assert post(url, "v1/chat/completions", {"model": NAME, "messages": OK_MESSAGES, "stream": True})[0] == 500
        deadline = time.monotonic() + 20
        while json.loads(get(url, "health")[2])["pending"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scripted.produced < full // 2


def test_stop_strings_cut_the_reply_streamed_or_not(cm: ChatModel) -> None:
    scripted = ScriptedModel(cm, "Hello world. Goodbye world.")
    with run_server(create_app(scripted)) as url:
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
        r = client.completions.create(model=NAME, prompt="x", stop=["ld. G", "zzz"])
        assert (r.choices[0].text, r.choices[0].finish_reason) == ("Hello wor", "stop")
        chunks = list(client.chat.completions.create(model=NAME, messages=OK_MESSAGES, stop="Goodbye",
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world. "
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_cli_serve_starts_answers_and_stops_on_ctrl_c(model_dir: Path) -> None:
    env = {**os.environ, "NANOFORGE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge", "serve", "--model", str(model_dir), "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {NAME} at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert get(url, "v1/models")[0] == 401  # the key came from $NANOFORGE_API_KEY
        status, _, body = get(url, "v1/models", {"Authorization": f"Bearer {KEY}"})
        assert status == 200 and json.loads(body)["data"][0]["max_model_len"] == 64
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


class FailingModel(ChatModel):
    """Writes one token, then its generation breaks (a stand-in for an out-of-memory or a bug)."""

    def batch(self, max_batch: int) -> StreamBatch:
        return StreamBatch(self.stream, max_batch)

    def stream(self, prompt: list[int], sampling: Sampling, stop_tokens) -> Generator[int, None, None]:
        yield self.tok.encode("a")[0]
        raise RuntimeError("the accelerator caught fire")


def test_a_failing_generation_answers_500_and_the_server_goes_on(cm: ChatModel) -> None:
    failing = FailingModel(cm.model, cm.tok, name=NAME)
    with run_server(create_app(failing)) as url:
        status, answer = post(url, "v1/chat/completions", {"model": NAME, "messages": OK_MESSAGES})
        assert status == 500 and "caught fire" in answer["error"]["message"]
        req = urllib.request.Request(url + "v1/completions", method="POST", data=json.dumps(
            {"model": NAME, "prompt": "x", "stream": True}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            events = [line for line in resp.read().decode().split("\n\n") if line]
        assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == "a"
        assert "caught fire" in json.loads(events[1].removeprefix("data: "))["error"]["message"]
        assert events[-1] == "data: [DONE]"
        assert get(url, "health")[0] == 200


class BrokenTemplateModel(ChatModel):
    """Its chat template breaks: a bug outside generation, met while the request is read."""

    def chat_prompt(self, messages) -> list[int]:
        raise RuntimeError("the template went missing")


def test_an_unexpected_error_answers_a_json_500(cm: ChatModel) -> None:
    with run_server(create_app(BrokenTemplateModel(cm.model, cm.tok, name=NAME))) as url:
        status, answer = post(url, "v1/chat/completions", {"model": NAME, "messages": OK_MESSAGES})
        assert status == 500 and answer["error"]["type"] == "server_error" and answer["error"]["message"]
        assert get(url, "health")[0] == 200


def raw_request(url: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """A request with exactly the given headers (urllib adds a Host and a Content-Type of its own)."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body or b"")), **(headers or {})}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_without_an_api_key_only_local_hosts_and_json_posts_are_served(url: str, cm: ChatModel) -> None:
    port = url.rstrip("/").rsplit(":", 1)[1]
    body = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 1}).encode()
    json_type = {"Content-Type": "application/json"}
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert raw_request(url, "POST", "/v1/completions", body, {"Host": host, **json_type})[0] == 200, host
    # a page whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own name
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        status, answer = raw_request(url, "POST", "/v1/completions", body, {"Host": host, **json_type})
        assert status == 403 and answer["error"]["code"] == "forbidden_host", host
        assert raw_request(url, "GET", "/v1/models", None, {"Host": host})[0] == 403
    # a cross-site form or fetch without a preflight can only send text/plain and the like
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Host": f"127.0.0.1:{port}"} | ({"Content-Type": content_type} if content_type else {})
        status, answer = raw_request(url, "POST", "/v1/completions", body, headers)
        assert status == 415 and "application/json" in answer["error"]["message"], content_type
    assert raw_request(url, "POST", "/v1/completions", body,
                       {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json; charset=utf-8"})[0] == 200
    # with an API key, the key decides, whatever the Host
    with run_server(create_app(cm, api_key=KEY)) as keyed:
        port = keyed.rstrip("/").rsplit(":", 1)[1]
        auth = {"Host": f"model.example:{port}", "Authorization": f"Bearer {KEY}", **json_type}
        assert raw_request(keyed, "POST", "/v1/completions", body, auth)[0] == 200
        assert raw_request(keyed, "GET", "/v1/models", None, {"Host": "model.example"})[0] == 401
    # a server bound to a name answers requests for that name
    with run_server(create_app(cm, host="model.example")) as named:
        port = named.rstrip("/").rsplit(":", 1)[1]
        assert raw_request(named, "GET", "/v1/models", None, {"Host": f"model.example:{port}"})[0] == 200
