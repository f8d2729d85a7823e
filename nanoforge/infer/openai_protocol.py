"""OpenAI's request shapes, validated: what `nanoforge serve` (server.py) accepts, and its error body.

    job = chat_job(check_body(raw, "tiny-chat"), chat_model)   # or raises ApiError(status, message)

Every field is checked for its type and range, with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` naming the field. Accepted, as OpenAI defines them:
`model`, `messages` (roles system/developer/user/assistant; content a string or a list of text parts) or
`prompt` (one string), `max_tokens`/`max_completion_tokens` (1 to the context), `temperature` (0 to 2),
`top_p` (0 to 1], `n` (1), `seed`, `stop` (up to 4 strings of at most 256 characters), `stream`,
`stream_options.include_usage`; and `top_k`, which OpenAI lacks but vLLM and others accept. Other fields
are ignored. A prompt that leaves no room in the context is refused; the reply gets the rest of the context
unless `max_tokens` says less.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nanoforge.infer.chat import ChatModel, Message, Sampling

MAX_STOP_STRINGS = 4
# a stop string is matched against the reply's tail as each piece arrives, on the event loop: long ones would
# stall every other request (OpenAI documents no length; stop strings are words and markers, not documents)
MAX_STOP_LENGTH = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Job:
    """A validated request: what to generate and how to answer."""

    prompt: list[int]
    sampling: Sampling
    stop_tokens: tuple[int, ...]
    stop_strings: list[str]
    stream: bool
    include_usage: bool


def _show(v: Any) -> str:
    """A refused value as the error message quotes it: its JSON, cut short. A value nested almost as deep as
    `json.loads` allows can be too deep for `json.dumps`, called further down the stack: it is only named."""
    try:
        return json.dumps(v)[:40]
    except RecursionError:
        return f"a deeply nested {'array' if isinstance(v, list) else 'object'}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float | None, lo: float, hi: float, *,
            lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be a number, got {_show(v)}", param=name, code="invalid_type")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(400, f"'{name}' must be in {interval}, got {v}", param=name, code="invalid_value")
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise ApiError(400, f"'{name}' must be an integer, got {_show(v)}", param=name,
                       code="invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {v}", param=name, code="invalid_value")
    return v


def _boolean(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {_show(v)}", param=name,
                       code="invalid_type")
    return bool(v)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them",
                       param="stop", code="invalid_value")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise ApiError(400, f"'stop' strings may be at most {MAX_STOP_LENGTH} characters long, got "
                            f"{max(len(s) for s in stops)}", param="stop", code="invalid_value")
    return stops


def _messages(body: dict) -> list[Message]:
    """The conversation in OpenAI's shape: roles system/developer/user/assistant, content a string or a
    list of text parts."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", param="messages",
                       code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                       param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", param=where,
                           code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {_show(role)}",
                           param=f"{where}.role", code="invalid_value")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string (or a list of text parts)",
                           param=f"{where}.content", code="invalid_type")
        out.append({"role": ROLES[role], "content": content})
    return out


def _text_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required: the text to continue", param="prompt",
                       code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt",
                       code="invalid_value")
    return prompt


def _job(body: dict, cm: ChatModel, prompt: list[int], stop_tokens: tuple[int, ...], what: str) -> Job:
    """Validate the sampling fields of a request whose `what` ("messages" or "prompt") gave `prompt`; the
    reply gets what is left of the context."""
    limits = {name: _integer(body, name, 1, cm.seq_len) for name in ("max_tokens", "max_completion_tokens")}
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {_show(n)}", param="n",
                       code="invalid_value")
    temperature = _number(body, "temperature", 1.0, 0, 2) or 0.0
    top_p = _number(body, "top_p", None, 0, 1, lo_open=True)
    top_k = _integer(body, "top_k", 1, cm.model.cfg.vocab_size)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = _boolean(options or {}, "include_usage")
    room = cm.seq_len - len(prompt)
    if room <= 0:
        raise ApiError(400, f"'{what}' takes {len(prompt)} tokens; this model's context is {cm.seq_len} tokens "
                            f"(prompt and reply must fit): shorten it", param=what,
                       code="context_length_exceeded")
    wanted = limits["max_completion_tokens"] or limits["max_tokens"] or room
    sampling = Sampling(max_new_tokens=min(wanted, room), temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed)
    return Job(prompt, sampling, stop_tokens, _stop_strings(body), stream, include_usage)


def check_body(raw: bytes, served: str) -> dict[str, Any]:
    """The request body as a JSON object whose `model` is `served` (404 for another model)."""
    try:
        body = json.loads(raw)
    except RecursionError:  # arrays or objects nested deeper than the interpreter's recursion limit
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # not JSON, not UTF-8, or an integer of more digits than Python converts (4300)
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise ApiError(400, "'model' is required (see GET /v1/models)", param="model",
                       code="missing_required_parameter")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    if model != served:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found")
    return body


def chat_job(body: dict[str, Any], cm: ChatModel) -> Job:
    """A `/v1/chat/completions` request: the conversation with the chat template, up to the end of the turn."""
    return _job(body, cm, cm.chat_prompt(_messages(body)), cm.chat_stop, "messages")


def completion_job(body: dict[str, Any], cm: ChatModel) -> Job:
    """A `/v1/completions` request: a text to continue, up to the end of the document."""
    return _job(body, cm, cm.text_prompt(_text_prompt(body)), cm.text_stop, "prompt")
