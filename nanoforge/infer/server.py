"""Serve a model artifact over HTTP: the OpenAI API (chat and text completions) and a web chat page.

    nanoforge serve --model runs/demo/08-pretrain --port 8000 [--host 127.0.0.1] [--api-key KEY]
    curl -N http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"model": "08-pretrain", "messages": [{"role": "user", "content": "hi"}], "stream": true}'

Endpoints, in OpenAI's request and response shapes (the `openai` client works against them):

    POST /v1/chat/completions   messages → a reply with the chat template; `stream: true` sends Server-Sent
                                Events (`data: {chunk}` … `data: [DONE]`), `stream_options.include_usage`
                                a last chunk with token counts
    POST /v1/completions        a text prompt → its continuation, streamed or not
    GET  /v1/models             the one model served, named after its directory (`max_model_len`: context)
    GET  /health                {"status": "ok", …}; no API key needed
    GET  /                      the web chat (static/chat.html + chat.js): streams replies, model text is
                                only ever set as textContent

Generation runs on one worker thread, off the event loop, with continuous batching: every running request
advances by one token per decode step, a new one joins at the next step (up to `--max-batch` at once, the
rest wait in arrival order), at most `max_pending` wait or run (then 503), and a client that disconnects
or whose stop string appears leaves the batch at the next step.
Every request is bounded: a 1 MiB body, `max_tokens` at most the context, a prompt that leaves no room in
the context is refused. Bad requests get a 4xx with OpenAI's error body `{"error": {"message", "type",
"param", "code"}}` (the checks are in openai_protocol.py); POSTs must be `application/json` (415). With
`--api-key`, `/v1/*` needs `Authorization: Bearer KEY`; without one, only requests whose Host header names
localhost, the bound host or the address connected to are answered (else 403), so that no web page can use
the model through the browser of someone running the server (DNS rebinding). The server binds 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from nanoforge.errors import NanoforgeError
from nanoforge.infer.chat import ChatModel, TextStream
from nanoforge.infer.openai_protocol import ApiError, Job, chat_job, check_body, completion_job

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20
SECURITY_HEADERS = {
    # the page loads only its own script and style and talks only to this server
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# the generation worker


_END = object()


class TokenFeed:
    """The tokens of one queued generation, read on the event loop as the worker thread produces them."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.stop = threading.Event()  # set: the worker skips or abandons this generation
        self._ended = False

    def cancel(self) -> None:
        self.stop.set()

    def __aiter__(self) -> TokenFeed:
        return self

    async def __anext__(self) -> int:
        if self._ended:
            raise StopAsyncIteration
        item = await self.items.get()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item


class GenerationQueue:
    """One worker thread decodes every running request together (continuous batching,
    `nanoforge.infer.batching`): a request joins the running batch at the next decode step, up to
    `max_batch` at once, later ones wait in arrival order; at most `max_pending` are waiting or running,
    beyond that `submit` refuses with 503. A request whose reader is gone (`feed.cancel()`) leaves the batch
    at the next step. A failing step fails the requests in its batch (running or about to join), not the
    worker: the next requests get a new batch."""

    def __init__(self, cm: ChatModel, max_pending: int = 64, max_batch: int = 16) -> None:
        self.max_pending = max_pending
        self.pending = 0
        self._new_batch = partial(cm.batch, max_batch)
        self._batch = self._new_batch()
        self._inbox: list[tuple[TokenFeed, Callable[[Any], None], Job]] = []
        self._feeds: dict[int, tuple[TokenFeed, Callable[[Any], None]]] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="nanoforge-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> TokenFeed:
        """Queue `job`'s generation; its tokens arrive through the returned feed, then its end."""
        if self.pending >= self.max_pending:
            raise ApiError(503, f"the server is busy ({self.pending} requests are waiting); retry later",
                           kind="server_error", code="server_busy")
        loop = asyncio.get_running_loop()
        feed = TokenFeed()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(feed.items.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                feed.stop.set()

        with self._wake:
            self.pending += 1
            self._inbox.append((feed, put, job))
            self._wake.notify()
        return feed

    def close(self) -> None:
        """Abandon every waiting and running generation (their readers see the end) and stop the worker."""
        with self._wake:
            self._closed = True
            feeds = [feed for feed, _, _ in self._inbox] + [feed for feed, _ in list(self._feeds.values())]
            self._wake.notify()
        for feed in feeds:
            feed.cancel()
            feed.items.put_nowait(_END)

    def _work(self) -> None:
        batch = self._batch
        while True:
            with self._wake:
                while not (self._inbox or batch.busy or self._closed):
                    self._wake.wait()
                if self._closed:
                    return
                inbox, self._inbox = self._inbox, []
            for feed, put, job in inbox:
                if feed.stop.is_set():  # the client left while the request waited
                    self._end(put)
                    continue
                s = job.sampling
                try:
                    handle = batch.add(job.prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                       top_k=s.top_k, top_p=s.top_p, stop_tokens=job.stop_tokens, seed=s.seed)
                except Exception as e:
                    self._end(put, e)
                    continue
                self._feeds[handle] = (feed, put)
            for handle, (feed, put) in list(self._feeds.items()):
                if feed.stop.is_set():
                    batch.cancel(handle)
                    self._end(put)
                    del self._feeds[handle]
            try:
                events = batch.step()
            except Exception as e:  # reported to the requests in the batch; the worker goes on with a new one
                log.exception("generation failed")
                for _, put in self._feeds.values():
                    self._end(put, e)
                self._feeds.clear()
                batch = self._batch = self._new_batch()
                continue
            for handle, token in events:
                if handle not in self._feeds:
                    continue
                feed, put = self._feeds[handle]
                if token is None:
                    self._end(put)
                    del self._feeds[handle]
                else:
                    put(token)

    def _end(self, put: Callable[[Any], None], error: Exception | None = None) -> None:
        if error is not None:
            put(error)
        put(_END)
        with self._wake:
            self.pending -= 1


# ---------------------------------------------------------------------------------------------------
# replies


class StopStrings:
    """Text in, text out, cut before the first stop string; a tail that could begin one is held back."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.hit = False

    def push(self, piece: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else piece
        text = self.held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self.held = True, ""
            return text[: min(cuts)]
        # the held tail is the longest end of `text` that begins a stop string: only prefixes no longer than
        # the text can be it, so a long stop string costs O(len(text)) tests per piece, not O(len(stop))
        keep = max((k for s in self.stops for k in range(1, min(len(s) - 1, len(text)) + 1)
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Reply:
    """One generation turned into text pieces, with its token count and finish reason."""

    def __init__(self, cm: ChatModel, job: Job, queue: GenerationQueue) -> None:
        self.job = job
        self.completion_tokens = 0
        self.finish_reason = "length"
        self._decoder = TextStream(cm.tok)
        self._stops = StopStrings(job.stop_strings)
        self.feed = queue.submit(job)

    async def pieces(self) -> AsyncIterator[str]:
        async for token in self.feed:
            self.completion_tokens += 1
            text = self._stops.push(self._decoder.push(token))
            if text:
                yield text
            if self._stops.hit:
                self.feed.cancel()
                break
        text = self._stops.push(self._decoder.flush()) + self._stops.flush()
        if text:
            yield text
        # the engine stops short of the budget only at a stop token
        if self._stops.hit or self.completion_tokens < self.job.sampling.max_new_tokens:
            self.finish_reason = "stop"

    @property
    def usage(self) -> dict[str, int]:
        n_prompt = len(self.job.prompt)
        return {"prompt_tokens": n_prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": n_prompt + self.completion_tokens}


def _chat_choice(text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_choice(text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


async def _stream(request: web.Request, reply: Reply, head: dict[str, Any],
                  choice: Callable[..., dict[str, Any]], opening: bool) -> web.StreamResponse:
    """Send `reply` as Server-Sent Events in OpenAI's chunk format, then `data: [DONE]`."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)
    except BaseException:  # the client left before the headers went out: its generation must not run on
        reply.feed.cancel()
        raise
    usage = {"usage": None} if reply.job.include_usage else {}

    async def send(event: dict[str, Any]) -> None:
        await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")

    try:
        if opening:
            await send({**head, "choices": [choice(None, None, first=True)], **usage})
        async for text in reply.pieces():
            await send({**head, "choices": [choice(text, None)], **usage})
        await send({**head, "choices": [choice(None, reply.finish_reason)], **usage})
        if reply.job.include_usage:
            await send({**head, "choices": [], "usage": reply.usage})
    except ConnectionResetError:  # the client left: the feed is cancelled, so its generation stops
        return resp
    except Exception as e:  # the headers are sent: the error travels as an event
        log.exception("streaming failed")
        await send(ApiError(500, f"generation failed: {e}", kind="server_error").body)
    finally:
        reply.feed.cancel()
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _respond(request: web.Request, job: Job, obj: str, chat: bool) -> web.StreamResponse:
    cm: ChatModel = request.app[MODEL_KEY]
    reply = Reply(cm, job, request.app[QUEUE_KEY])
    prefix = "chatcmpl" if chat else "cmpl"
    head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()),
            "model": cm.name, "system_fingerprint": None}
    choice = _chat_choice if chat else _text_choice
    if job.stream:
        head["object"] = f"{obj}.chunk" if chat else obj
        return await _stream(request, reply, head, choice, opening=chat)
    try:
        text = "".join([piece async for piece in reply.pieces()])
    except Exception as e:
        raise ApiError(500, f"generation failed: {e}", kind="server_error") from None
    finally:
        reply.feed.cancel()
    if chat:
        result = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": reply.finish_reason}
    else:
        result = _text_choice(text, reply.finish_reason)
    return web.json_response({**head, "choices": [result], "usage": reply.usage})


# ---------------------------------------------------------------------------------------------------
# handlers


MODEL_KEY = web.AppKey("model", ChatModel)
QUEUE_KEY = web.AppKey("queue", GenerationQueue)


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, naming the model this server serves (aiohttp answers 413 beyond the limit)."""
    return check_body(await request.read(), request.app[MODEL_KEY].name)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    job = chat_job(await _body(request), request.app[MODEL_KEY])
    return await _respond(request, job, "chat.completion", chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    job = completion_job(await _body(request), request.app[MODEL_KEY])
    return await _respond(request, job, "text_completion", chat=False)


def _model_card(cm: ChatModel) -> dict[str, Any]:
    return {"id": cm.name, "object": "model", "created": 0, "owned_by": "nanoforge", "max_model_len": cm.seq_len}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[MODEL_KEY])]})


async def model(request: web.Request) -> web.Response:
    cm = request.app[MODEL_KEY]
    if request.match_info["model"] != cm.name:
        raise ApiError(404, f"the model {request.match_info['model']!r} does not exist; this server serves "
                            f"{cm.name!r}", code="model_not_found")
    return web.json_response(_model_card(cm))


async def health(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    return web.json_response({"status": "ok", "model": request.app[MODEL_KEY].name, "pending": queue.pending})


async def index(_: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "chat.html")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _host_name(host: str) -> str:
    """The name in a Host header (or a --host), without its port or brackets: "[::1]:8000" → "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _host_allowed(request: web.Request, bound: str) -> bool:
    """Whether the request names this server in its Host header: localhost, the host it was bound to, or the
    address the connection came in on. A browser always sends the name it resolved, so a page whose own
    name was rebound to 127.0.0.1 (DNS rebinding) sends that name and is refused; a request without a Host
    header does not come from a browser."""
    given = request.headers.get("Host")
    if given is None:
        return True
    name = _host_name(given)
    if _is_loopback(name) or name == _host_name(bound):
        return True
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not isinstance(sockname, tuple) or not sockname:
        return False
    try:
        host, local = ipaddress.ip_address(name), ipaddress.ip_address(str(sockname[0]).partition("%")[0])
    except ValueError:
        return False
    # an IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d
    return host == (getattr(local, "ipv4_mapped", None) or local)


def _same_key(given: str, key: str) -> bool:
    """Constant-time comparison of API keys. aiohttp decodes header bytes that are not UTF-8 as lone
    surrogates (surrogateescape), which a plain `.encode()` refuses: such a key is compared as those bytes."""
    try:
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a lone surrogate that no header byte produces: not the key
        return False


def _guard(api_key: str | None, max_body: int,
           host: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The middleware: who may call (the Host check without an API key, the key with one), JSON request
    bodies, and every failure as OpenAI's error body (never a traceback).

    Without an API key anything that can reach the port may use the model, so a browser must not be made to:
    a page of another site may send simple cross-site requests (a `text/plain` POST, no preflight) to
    127.0.0.1, and a DNS-rebound page may even read the answers. Requiring `application/json` on POSTs stops
    the first (the browser asks first, and no CORS header ever answers), the Host check the second."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if not api_key and not _host_allowed(request, host):
                raise ApiError(403, f"this server answers requests for localhost or {host} only (the Host "
                                    f"header names {request.headers.get('Host')!r}); serve with --api-key to "
                                    f"allow others", code="forbidden_host")
            if api_key and request.path.startswith("/v1/"):
                scheme, _, given = request.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not given.strip():
                    raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                                   code="invalid_api_key")
                if not _same_key(given.strip(), api_key):
                    raise ApiError(401, "incorrect API key", code="invalid_api_key")
            if (request.method == "POST" and request.path.startswith("/v1/")
                    and request.content_type != "application/json"):
                raise ApiError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                                    f"(got {request.content_type!r})", code="unsupported_media_type")
            return await handler(request)
        except ApiError as e:
            return web.json_response(e.body, status=e.status)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = f"the request body is larger than {max_body} bytes" if e.status == 413 else e.reason
            return web.json_response(ApiError(e.status, message).body, status=e.status)
        except Exception:  # a bug: logged here, answered in OpenAI's shape rather than aiohttp's text/plain 500
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response(ApiError(500, "internal server error (the server's log has the details)",
                                              kind="server_error").body, status=500)

    return guard


async def _security_headers(_: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def create_app(cm: ChatModel, *, api_key: str | None = None, max_pending: int = 64, max_batch: int = 16,
               max_body: int = MAX_BODY, host: str = "127.0.0.1") -> web.Application:
    """The aiohttp application serving `cm` (see the module docstring for the endpoints); `host` is the
    address it will be bound to, which (besides localhost) requests may name without an API key."""
    app = web.Application(middlewares=[_guard(api_key, max_body, host)], client_max_size=max_body)
    app[MODEL_KEY] = cm
    app[QUEUE_KEY] = queue = GenerationQueue(cm, max_pending, max_batch)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/", index)
    app.router.add_static("/static", STATIC)
    app.on_response_prepare.append(_security_headers)

    async def close_queue(_: web.Application) -> None:
        queue.close()

    app.on_shutdown.append(close_queue)
    return app


@contextmanager
def run_server(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` on its own event loop in a background thread; yields its base URL (port 0: a free one).

    Nothing runs on the caller's thread, so the caller may have an event loop of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nanoforge-serve", daemon=True)
    thread.start()
    # a handler is cancelled when its client disconnects (aiohttp's default until 3.8.1, an option since 3.9):
    # a non-streamed reply's generation then stops instead of running on to max_tokens for nobody
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)

    def call(coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    try:
        call(runner.setup())
        try:
            call(web.TCPSite(runner, host, port).start())
        except OSError as e:
            raise NanoforgeError(f"serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
        bound = runner.addresses[0][1]
        yield f"http://{f'[{host}]' if ':' in host else host}:{bound}/"
    finally:
        call(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(model_dir: Path | str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", max_pending: int = 64, max_batch: int = 16) -> None:
    """`nanoforge serve`: load the model in `model_dir` and serve it until Ctrl-C.

    The API key comes from `api_key`, else from $NANOFORGE_API_KEY (which keeps it out of `ps`)."""
    cm = ChatModel.load(model_dir, device)
    api_key = api_key or os.environ.get("NANOFORGE_API_KEY") or None
    if not api_key and not _is_loopback(host):
        print(f"warning: serving on {host} without --api-key: anyone who reaches this port can use the model",
              file=sys.stderr)
    app = create_app(cm, api_key=api_key, max_pending=max_pending, max_batch=max_batch, host=host)
    with run_server(app, host, port) as url:
        print(f"serving {cm.name} at {url} (web chat there, OpenAI API at {url}v1; Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
