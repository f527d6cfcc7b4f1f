"""OpenAI-compatible HTTP ingress of the Ray app: the same client code as for `vllm serve`.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both
with `stream`), and `POST /v1/contexts`, which registers a document once and returns
an id that later requests name in `context_id` (with any `k`): its chunks are encoded
on first use and served from the embedder workers' store afterwards. Per-request
`k`, `raw_tail`, `reserve`, `fill_window` and `context_id` ride in the body (the OpenAI client's
`extra_body`); the layout options also in `mm_processor_kwargs`, as `vllm serve` takes
them, so one request body works against both. With `api_keys` configured, a request
needs `Authorization: Bearer <key>` and a document id is visible only to the key that
registered it.

Errors follow OpenAI's shape, `{"error": {"message", "type", "code"}}`: 400 for bad
input (with the reason, unknown fields included), 401 for a missing or wrong key, 404 for
an unknown document, 503 when a replica failed under the request (retry it); a stream that
fails after its first chunk ends with an error event. `GET /health`, and `GET /metrics`
(Prometheus text) with the requests an LLM replica still holds.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ..model.checkpoint import read_extemb_config
from ..model.config import LAYOUT_OPTIONS, ContextError, layout_options
from .store import DocumentStore, UnknownDocument

api = FastAPI(title="extemb-vllm (Ray)")
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "ignore_eos")
METRICS_TIMEOUT_S = 5.0
# the other fields a request may carry (`stream_options` and `user` are accepted and ignored;
# `n` other than 1 is refused); any field outside these sets is a 400
ACCEPTED_KEYS = ("model", "stream", "stream_options", "user", "n", "context_id", "mm_processor_kwargs")
COMPLETION_KEYS = frozenset((*SAMPLING_KEYS, *LAYOUT_OPTIONS, *ACCEPTED_KEYS, "prompt"))
CHAT_KEYS = frozenset((*SAMPLING_KEYS, *LAYOUT_OPTIONS, *ACCEPTED_KEYS, "messages", "max_completion_tokens"))
CONTEXT_KEYS = frozenset(("text", "token_ids"))


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# (helpers above the class: @serve.ingress ships the class by value, with the globals it saw)
def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _usage(prompt_positions: int, completion_tokens: int) -> dict:
    # prompt_tokens counts the positions the LLM read (compact slots + raw), as `vllm serve` does
    return {"prompt_tokens": prompt_positions, "completion_tokens": completion_tokens,
            "total_tokens": prompt_positions + completion_tokens}


def _failure(e: Exception) -> HTTPError:
    """The HTTP answer for an error from the router. Ray wraps what a replica raised; its
    `cause` is the original. Bad input (ValueError, ContextError) is the client's 400; anything
    else (a replica died, the embedder pool gave up) is a 503 the client may retry."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, (ValueError, ContextError)):
        return HTTPError(400, str(cause))
    last = (str(cause).strip().splitlines() or [""])[-1]
    return HTTPError(503, f"the server failed to finish this request ({type(cause).__name__}: {last}); retry it",
                     "ServiceUnavailableError")


def _unknown_fields(body: dict, known: frozenset) -> None:
    # a misspelt option must not be ignored and the answer served as if it had been honoured
    extra = sorted(set(body) - known)
    if extra:
        raise HTTPError(400, f"unknown field(s) in the request: {extra}")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, model_dir: str, router, store_dir: str | None = None, api_keys: list[str] | None = None,
                 served_model_name: str | None = None):
        from transformers import AutoTokenizer

        self.router = router
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model_name = served_model_name or Path(model_dir).name
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.max_model_len = int(config.get("advertised_max_model_len", config["max_position_embeddings"]))
        self.ext = read_extemb_config(model_dir)
        self.documents = DocumentStore(disk_dir=store_dir)
        self.api_keys = set(api_keys or [])

    # -- helpers ----------------------------------------------------------------------------------
    def _key(self, request: Request) -> str | None:
        if not self.api_keys:
            return None
        auth = request.headers.get("authorization", "")
        key = auth.removeprefix("Bearer ").strip()
        if key not in self.api_keys:
            raise HTTPError(401, "missing or invalid API key", "AuthenticationError")
        return key

    async def _body(self, request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return body

    def _options(self, body: dict, key: str | None) -> tuple[list[int], dict]:
        """(context token ids, router options) from a request body. Layout options may also ride
        in `mm_processor_kwargs`, as `vllm serve` takes them: the same body works on both."""
        try:  # the same check, and the same words, as `vllm serve` (its middleware)
            mm = layout_options(body.get("mm_processor_kwargs"), self.ext)
        except ContextError as e:
            raise HTTPError(400, str(e)) from None
        body = {**body, **{k: v for k, v in mm.items() if body.get(k) is None}}
        opts = {k: body[k] for k in (*SAMPLING_KEYS, *LAYOUT_OPTIONS) if body.get(k) is not None}
        opts.setdefault("max_tokens", 16)
        for name in ("max_tokens", "k", "raw_tail", "reserve", "seed"):
            if name in opts and (isinstance(opts[name], bool) or not isinstance(opts[name], int)):
                raise HTTPError(400, f"{name} must be an integer, got {opts[name]!r}")
        for name in ("ignore_eos", "fill_window"):
            if not isinstance(opts.get(name, False), bool):
                raise HTTPError(400, f"{name} must be true or false, got {opts[name]!r}")
        for name in ("temperature", "top_p"):
            if name in opts:
                if isinstance(opts[name], bool) or not isinstance(opts[name], (int, float)):
                    raise HTTPError(400, f"{name} must be a number, got {opts[name]!r}")
                opts[name] = float(opts[name])
        context = []
        if body.get("context_id") is not None:
            try:
                context = self.documents.document(str(body["context_id"]), api_key=key).token_ids
            except UnknownDocument as e:
                raise HTTPError(404, str(e), "NotFoundError") from None
        return context, opts

    async def _run(self, prompt_ids: list[int], context: list[int], opts: dict, stream: bool, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if not stream:
            try:
                out = await self.router.generate.remote(prompt_ids, context, **opts)
            except Exception as e:  # the router's errors arrive wrapped by Ray
                raise _failure(e) from None
            choice = ({"index": 0, "message": {"role": "assistant", "content": out.text},
                       "finish_reason": out.finish_reason} if chat else
                      {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None})
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": self.model_name, "choices": [choice],
                                 "usage": _usage(out.prompt_positions, len(out.token_ids))})

        gen = self.router.options(stream=True).generate_stream.remote(prompt_ids, context, **opts)
        # pull the first delta before answering, so a bad request still gets its 400
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:  # every answer has at least its final delta
            raise HTTPError(503, "the server's stream ended before the answer began; retry it",
                            "ServiceUnavailableError") from None
        except Exception as e:
            raise _failure(e) from None

        async def events():
            delta = first
            sent_role = False
            while True:
                if chat:
                    d = {"content": delta.text} | ({} if sent_role else {"role": "assistant"})
                    sent_role = True
                    choice = {"index": 0, "delta": d, "finish_reason": delta.finish_reason}
                else:
                    choice = {"index": 0, "text": delta.text, "finish_reason": delta.finish_reason, "logprobs": None}
                chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": created, "model": self.model_name, "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
                if delta.finish_reason is not None:
                    break
                try:
                    delta = await gen.__anext__()
                    continue
                except StopAsyncIteration:  # ended without its final delta: a replica failed
                    err = HTTPError(503, "the server's stream ended before the answer was finished; retry it",
                                    "ServiceUnavailableError")
                except Exception as e:
                    err = _failure(e)
                # the headers are sent: say so in the stream, as vLLM does
                error = {"message": err.message, "type": err.kind, "code": err.status}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _handle(self, request: Request, chat: bool):
        try:
            key = self._key(request)
            body = await self._body(request)
            _unknown_fields(body, CHAT_KEYS if chat else COMPLETION_KEYS)
            if body.get("model") not in (None, self.model_name):
                raise HTTPError(404, f"The model `{body['model']}` does not exist (this server has "
                                     f"`{self.model_name}`)", "NotFoundError")
            if body.get("n", 1) != 1:
                raise HTTPError(400, "n must be 1 (one choice per request)")
            if chat and body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
                body["max_tokens"] = body["max_completion_tokens"]
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise HTTPError(400, "messages must be a non-empty list")
                try:
                    prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False)
                except Exception as e:
                    raise HTTPError(400, f"cannot apply the chat template: {e}") from None
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, str) and prompt.strip():
                    prompt_ids = self.tokenizer(prompt).input_ids
                elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                                 for t in prompt):
                    prompt_ids = prompt
                else:
                    raise HTTPError(400, "prompt must be a non-empty string or a list of token ids")
            context, opts = self._options(body, key)
            if len(context) + len(prompt_ids) > self.max_model_len:
                raise HTTPError(400, f"{len(context) + len(prompt_ids)} tokens exceed this model's extended "
                                     f"length of {self.max_model_len} tokens")
            return await self._run(list(prompt_ids), context, opts, bool(body.get("stream")), chat)
        except HTTPError as e:
            return _error(e.status, e.message, e.kind)

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._key(request)
        except HTTPError as e:
            return _error(e.status, e.message, e.kind)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "extemb-vllm",
                                            "max_model_len": self.max_model_len}]}

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self):
        """Prometheus text: requests an LLM replica still holds (one replica's view). While the
        LLM pool has no live replica (one is restarting) Serve would hold the call until it is
        back: answer a prompt 503 instead, as a failed scrape."""
        from fastapi.responses import PlainTextResponse

        try:
            stats = await asyncio.wait_for(self.router.llm_stats.remote(), METRICS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - timeout or a dead replica: the scrape fails, nothing else
            return _error(503, f"the LLM replica did not answer ({type(e).__name__}; limit "
                               f"{METRICS_TIMEOUT_S:g} s); retry", "ServiceUnavailableError")
        return PlainTextResponse("# TYPE extemb:llm_unfinished_requests gauge\n"
                                 f"extemb:llm_unfinished_requests {stats['unfinished_requests']}\n")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    @api.post("/v1/contexts")
    async def register_context(self, request: Request):
        """{"text": ...} or {"token_ids": [...]} -> {"id", "object": "context", "tokens"}."""
        try:
            key = self._key(request)
            body = await self._body(request)
            _unknown_fields(body, CONTEXT_KEYS)
            if isinstance(body.get("text"), str) and body["text"].strip():
                ids = self.tokenizer(body["text"], add_special_tokens=False).input_ids
            elif isinstance(body.get("token_ids"), list) and body["token_ids"]:
                ids = body["token_ids"]
                vocab = len(self.tokenizer)
                if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                    raise HTTPError(400, f"token_ids must be integers in [0, {vocab})")
            else:
                raise HTTPError(400, 'a context needs a non-empty "text" or "token_ids"')
            if len(ids) > self.max_model_len:
                raise HTTPError(400, f"{len(ids)} tokens exceed this model's extended length of "
                                     f"{self.max_model_len} tokens")
            doc_id = self.documents.register(list(ids), api_key=key)
            return {"id": doc_id, "object": "context", "tokens": len(ids)}
        except HTTPError as e:
            return _error(e.status, e.message, e.kind)

