"""The labelling web app: annotators compare two responses of the model and say which one is better.

    nanoforge label --model runs/demo/09-sft --prompts prompts.jsonl --db labels.sqlite --annotators team.txt
    # open http://127.0.0.1:8100/, paste your token; /stats shows progress and agreement

Endpoints (every /api/ call needs `Authorization: Bearer TOKEN`: none → 401, an unknown token → 403):

    GET  /api/me          {"name", "simulated"}: who this token is
    GET  /api/next        the next item for this annotator: {"item_id", "prompt" (chat messages),
                          "reference" (or null), "A", "B"} with the sides drawn at random per annotator, or
                          {"done": true} when they have judged everything
    POST /api/judgements  {"item_id", "choice": "A" | "B" | "tie" | "skip", "reason"?} → 201 {"id"};
                          409 if this annotator already judged the item, 404 if it was never shown to them
    GET  /api/stats       progress, per-annotator counts, agreement (percent and Cohen's κ)
    GET  /  and  /stats   the labelling page and the stats page (static/); GET /health needs no token

The pages set every text that came from the model, the prompt file or an annotator with `textContent`,
never as HTML, and the Content-Security-Policy allows only the app's own script and style, so a response
that says `<script>` is shown as text. All SQLite work runs on one worker thread with its own connection
(SQLite calls block; the event loop never waits on the disk), in the order requests arrive; the store's
transactions make concurrent annotators safe (see store.py). The server binds 127.0.0.1 unless told
otherwise; request bodies are limited to 64 KiB.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from nanoforge.errors import NanoforgeError
from nanoforge.feedback.store import Annotator, Conflict, FeedbackStore, NotAssigned
from nanoforge.infer.server import SECURITY_HEADERS

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 << 10
log = logging.getLogger(__name__)


class StoreWorker:
    """A `FeedbackStore` owned by one worker thread; `call` runs one of its methods there."""

    def __init__(self, path: Path | str, seed: int | None = None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoforge-label-db")
        self._path, self._seed = Path(path), seed
        self._store: FeedbackStore | None = None
        self._executor.submit(self._open).result()  # a bad database fails now, not at the first request

    def _open(self) -> None:
        self._store = FeedbackStore(self._path, seed=self._seed)

    def _run(self, method: str, args: tuple[Any, ...]) -> Any:
        assert self._store is not None
        return getattr(self._store, method)(*args)

    async def call(self, method: str, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, method, args)

    def close(self) -> None:
        if self._store is not None:
            self._executor.submit(self._store.close).result()
        self._executor.shutdown(wait=True)


STORE_KEY = web.AppKey("store", StoreWorker)
TOKENS_KEY = web.AppKey("tokens", dict)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _annotator(request: web.Request) -> Annotator:
    """The annotator of the request's bearer token (401 without one, 403 for one nobody holds)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing token: send the header 'Authorization: Bearer TOKEN'")
    cache: dict[str, Annotator] = request.app[TOKENS_KEY]
    who = cache.get(token)
    if who is None:
        who = await request.app[STORE_KEY].call("annotator", token)
        if who is None:
            raise ApiError(403, "unknown token")
        cache[token] = who
    return who


async def me(request: web.Request) -> web.Response:
    who = await _annotator(request)
    return web.json_response({"name": who.name, "simulated": who.simulated})


async def next_item(request: web.Request) -> web.Response:
    who = await _annotator(request)
    item = await request.app[STORE_KEY].call("next_item", who)
    return web.json_response({"done": True} if item is None else {"done": False, **item})


async def judgements(request: web.Request) -> web.Response:
    who = await _annotator(request)
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):  # not JSON or UTF-8, a number beyond int's 4300 digits, too deep
        raise ApiError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    item_id, choice, reason = body.get("item_id"), body.get("choice"), body.get("reason")
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise ApiError(400, "item_id must be an integer")
    if choice not in ("A", "B", "tie", "skip"):
        raise ApiError(400, "choice must be one of A, B, tie, skip")
    if reason is not None and not isinstance(reason, str):
        raise ApiError(400, "reason must be a text")
    try:
        judgement_id = await request.app[STORE_KEY].call("record", who, item_id, choice, reason)
    except Conflict as e:
        raise ApiError(409, str(e)) from None
    except NotAssigned as e:
        raise ApiError(404, str(e)) from None
    return web.json_response({"id": judgement_id}, status=201)


async def stats(request: web.Request) -> web.Response:
    await _annotator(request)
    return web.json_response(await request.app[STORE_KEY].call("stats"))


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _page(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name)

    return page


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as `{"error": message}` with its status, never a traceback (a bug is logged here and
    answered 500 in the same shape, which the page shows instead of failing to parse aiohttp's text)."""
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response({"error": e.message}, status=e.status)
    except NanoforgeError as e:
        return web.json_response({"error": str(e)}, status=400)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = f"the request body is larger than {MAX_BODY} bytes" if e.status == 413 else e.reason
        return web.json_response({"error": message}, status=e.status)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal server error (the server's log has the details)"}, status=500)


async def _security_headers(_: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-store"


def create_app(db: Path | str, *, seed: int | None = None) -> web.Application:
    """The aiohttp application over the labelling database `db` (see the module docstring)."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[STORE_KEY] = worker = StoreWorker(db, seed)
    app[TOKENS_KEY] = {}
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/next", next_item)
    app.router.add_post("/api/judgements", judgements)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/health", health)
    app.router.add_get("/", _page("label.html"))
    app.router.add_get("/stats", _page("stats.html"))
    app.router.add_static("/static", STATIC)
    app.on_response_prepare.append(_security_headers)

    async def close(_: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, worker.close)

    app.on_cleanup.append(close)
    return app
