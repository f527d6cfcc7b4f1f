"""ASGI middleware for `vllm serve` of an ExtEmb model: what the plug-in owns at the HTTP layer.

    vllm serve --model extemb-llama2 --middleware extemb_vllm.vllm_plugin.middleware.ExtEmbRequests

- A completion or chat request with a field vLLM does not know (`max_token`,
  `mm_processor_kwarg`) is a 400 naming it: vLLM would ignore it and serve the answer as if
  the option had been honoured.
- `mm_processor_kwargs` must be an object of this model's layout options with the right JSON
  types (`model.config.layout_options`, the same check as the Ray ingress): a 400 that names
  the problem before the request reaches the engine.
- `GET /v1/models` advertises the extended length (the config's `advertised_max_model_len`)
  as `max_model_len`: vLLM reports the KV window, not what a client may send.
- A completion or chat response's `usage` (the body, or a stream's usage events) reports in
  `prompt_tokens` the tokens the client sent, as OpenAI-compatible servers do, and what the
  engine read in `usage.extemb` (`extemb_vllm/usage.py`); vLLM counts the positions it read. The
  renderer says how each prompt was laid out (`accounting.py`).

It acts only when the served model is an ExtEmb model and passes everything else through
untouched, so the same flag on another model's server changes nothing. It runs outside
vLLM's own middleware (vLLM adds `--middleware` last), so where the server has API keys it
checks a body only for a request that carries one of them: any other gets vLLM's 401 first.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from functools import cached_property

from ..model.config import ExtEmbConfig
from ..openai_requests import check_request, request_fields
from ..usage import usage
from . import ARCHITECTURE, accounting

MAX_CHECKED_BODY = 64 << 20  # larger bodies go to vLLM unread (it refuses them by length anyway)


class ExtEmbRequests:
    def __init__(self, app):
        self.app = app
        self._ext: ExtEmbConfig | None = None  # the served model's, parsed once (a server serves one)

    @cached_property
    def fields(self) -> dict[str, frozenset]:
        return request_fields()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        hf = _served_hf_config(scope)
        if hf is None or ARCHITECTURE not in (getattr(hf, "architectures", None) or []):
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/v1/models":
            return await self.app(scope, receive, _advertising(send, getattr(hf, "advertised_max_model_len", None)))
        if method != "POST" or path not in self.fields or not _authorised(scope):
            return await self.app(scope, receive, send)

        body, messages = await _read_body(receive)
        if body is not None:
            try:
                decoded = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                decoded = None  # vLLM answers malformed JSON with its own 400
            if self._ext is None:
                self._ext = ExtEmbConfig.from_dict(hf.extemb)
            reason = check_request(path, decoded, self._ext, self.fields)
            if reason is not None:
                return await _bad_request(send, reason)
        layouts = accounting.open_request()  # filled by the renderer while vLLM handles the request
        return await self.app(scope, _replay(messages, receive), _reporting_usage(send, layouts))


def _served_hf_config(scope):
    """The served model's HF config, from the FastAPI app's state (set by vLLM at start-up)."""
    app = scope.get("app")
    vllm_config = getattr(getattr(app, "state", None), "vllm_config", None)
    return getattr(getattr(vllm_config, "model_config", None), "hf_config", None)


def _authorised(scope) -> bool:
    """True without API keys, or with a request bearing one (vLLM's --api-key / VLLM_API_KEY):
    an unauthorised request goes on to vLLM's 401 and learns nothing from our checks."""
    args = getattr(getattr(scope.get("app"), "state", None), "args", None)
    keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY", "")]) if k]
    if not keys:
        return True
    auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    given = hashlib.sha256(auth.removeprefix("Bearer ").encode()).digest()
    return any(hmac.compare_digest(given, hashlib.sha256(k.encode()).digest()) for k in keys)


async def _read_body(receive) -> tuple[bytes | None, list[dict]]:
    """The whole request body (None past MAX_CHECKED_BODY), and the messages read, to replay."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client went away: let the app see it
            return None, messages
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    if size > MAX_CHECKED_BODY:
        return None, messages
    return b"".join(m.get("body", b"") for m in messages), messages


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


async def _bad_request(send, message: str):
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                    "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _advertising(send, advertised: int | None):
    """`send` with /v1/models' body rewritten: every card's max_model_len = the extended length."""
    if not advertised:
        return send
    start = None
    chunks: list[bytes] = []

    async def rewriting(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message  # held back: the length changes
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(chunks)
        if start["status"] == 200:
            try:
                listing = json.loads(body)
                for card in listing.get("data", []):
                    card["max_model_len"] = int(advertised)
                body = json.dumps(listing).encode()
            except (ValueError, AttributeError, TypeError):
                pass  # not the listing we know: pass it on as it is
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return rewriting


def _reporting_usage(send, layouts: list[dict]):
    """`send` with every `usage` of a 200 response (a JSON body, or the events of a stream) told
    as OpenAI servers tell it, from the layouts the renderer recorded."""
    kind = None  # "json" | "stream" | None (passed on as it is)
    held, body, pending = None, [], b""

    async def reporting(message):
        nonlocal kind, held, pending
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers") or [])
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if message["status"] == 200 and layouts:
                kind = "stream" if content_type.startswith("text/event-stream") else (
                    "json" if content_type.startswith("application/json") else None)
            if kind == "json":
                held = message  # its content-length changes
                return
            return await send(message)
        if message["type"] != "http.response.body" or kind is None:
            return await send(message)
        more = message.get("more_body", False)
        if kind == "json":
            body.append(message.get("body", b""))
            if more:
                return
            raw = _rewritten_json(b"".join(body), layouts)
            headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
            await send({**held, "headers": [*headers, (b"content-length", str(len(raw)).encode())]})
            return await send({"type": "http.response.body", "body": raw})
        pending += message.get("body", b"")
        events, _, pending = pending.rpartition(b"\n\n")  # whole events out, a partial one kept
        out = b"".join(_rewritten_event(e, layouts) + b"\n\n" for e in events.split(b"\n\n")) if events else b""
        if not more:
            out, pending = out + pending, b""
        return await send({**message, "body": out})

    return reporting


def _told(vllm_usage: dict, layouts: list[dict]) -> dict:
    """vLLM's usage with the client's tokens in prompt_tokens. vLLM's prompt_tokens, the positions
    read, says which prompts it covers: all of them (a response's usage) or one (a batch's
    per-prompt usage in a stream); anything else is left as vLLM said it."""
    positions = vllm_usage.get("prompt_tokens")
    covered = layouts if sum(lay["prompt_positions"] for lay in layouts) == positions else \
        [lay for lay in layouts if lay["prompt_positions"] == positions][:1]
    if not covered:
        return vllm_usage
    return {**vllm_usage, **usage(covered, vllm_usage.get("completion_tokens"))}


def _rewritten_json(raw: bytes, layouts: list[dict]) -> bytes:
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return raw
    payload["usage"] = _told(payload["usage"], layouts)
    return json.dumps(payload).encode()


def _rewritten_event(event: bytes, layouts: list[dict]) -> bytes:
    if not event.startswith(b"data: {") or b'"usage"' not in event:
        return event
    return b"data: " + _rewritten_json(event[len(b"data: "):], layouts)
