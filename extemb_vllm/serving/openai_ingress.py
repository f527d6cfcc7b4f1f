"""OpenAI-compatible HTTP ingress of the Ray app: the same client code as for `vllm serve`.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both
with `stream`), and `POST /v1/contexts`, which registers a document once and returns
an id that later requests name in `context_id` (with any `k`): its chunks are encoded
on first use and served from the embedder workers' store afterwards. Per-request
`k`, `raw_tail`, `reserve`, `fill_window`, `append_stable` and `context_id` ride in the body (the OpenAI client's
`extra_body`); the layout options also in `mm_processor_kwargs`, as `vllm serve` takes
them, so one request body works against both. Requests are validated with vLLM's own
OpenAI request models and turned into vLLM `SamplingParams` exactly as `vllm serve` does
(stop, n, logprobs, penalties, top_k, response_format, ...), which travel to the LLM replica
in vLLM's own msgpack encoding; the few fields that change the answer's form and that this
app does not produce (`echo`, `suffix`, tools, ...) are refused by name. With `api_keys`
configured, a request needs `Authorization: Bearer <key>` and a document id is visible only
to the key that registered it.

Errors follow OpenAI's shape, `{"error": {"message", "type", "code"}}`: 400 for bad
input (with the reason, unknown fields included), 401 for a missing or wrong key, 404 for
an unknown document, 503 when a replica failed under the request (retry it); a stream that
fails after its first chunk ends with an error event. `GET /health`, and `GET /metrics`
(Prometheus text) with the requests an LLM replica still holds; the plug-in's series
(`extemb_vllm/metrics.py`) go through Ray's metrics (`serving/metrics.py`). `usage` is told as
over `vllm serve`: the tokens sent in `prompt_tokens`, what the LLM read in `usage.extemb`.
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
from ..openai_requests import check_request, request_fields
from ..usage import usage
from . import wire
from .documents import DocumentRegistry, RegistryFull, UnknownDocument

api = FastAPI(title="extemb-vllm (Ray)")
METRICS_TIMEOUT_S = 5.0
# The Ray app's own fields beside vLLM's request models: a registered document, and the layout
# options also at the top level (in `mm_processor_kwargs` too, as `vllm serve` takes them).
RAY_FIELDS = frozenset(("context_id", *LAYOUT_OPTIONS))
# Fields of vLLM's request models that change the form of the answer and that this app does not
# produce: refused by name (a 400), never silently ignored.
NOT_SERVED = ("echo", "suffix", "prompt_logprobs", "prompt_embeds", "tools", "tool_choice", "functions",
              "function_call", "return_tokens_as_token_ids", "logprob_token_ids", "continue_final_message")
# generation_config.json keys vLLM takes as the server's sampling defaults (`--generation-config auto`)
DEFAULT_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
CONTEXT_KEYS = frozenset(("text", "token_ids"))


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# (helpers above the class: @serve.ingress ships the class by value, with the globals it saw)
def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _usage(layout: dict, completion_tokens: int) -> dict:
    # as over `vllm serve` (its middleware): prompt_tokens = the tokens sent (a registered
    # document's included), what the LLM read in usage.extemb (extemb_vllm/usage.py)
    return usage([layout], completion_tokens)


def _failure(e: Exception) -> HTTPError:
    """The HTTP answer for an error from the router. Ray wraps what a replica raised; its
    `cause` is the original. What the layout checks or a worker refused as the client's fault
    (ContextError, a malformed payload, a bad_request reply) is a 400; anything else, an internal
    bug's ValueError included (a replica died, the embedder pool gave up), is a 503 the client
    may retry, so a server fault never passes for the client's."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, (ContextError, wire.WireError, wire.RequestRejected)):
        return HTTPError(400, str(cause))
    last = (str(cause).strip().splitlines() or [""])[-1]
    return HTTPError(503, f"the server failed to finish this request ({type(cause).__name__}: {last}); retry it",
                     "ServiceUnavailableError")


def _unknown_fields(body: dict, known: frozenset) -> None:
    # a misspelt option must not be ignored and the answer served as if it had been honoured
    extra = sorted(set(body) - known)
    if extra:
        raise HTTPError(400, f"unknown field(s) in the request: {extra}")


def _validated(body: dict, chat: bool):
    """The body as vLLM's own OpenAI request model (the one `vllm serve` validates with): the same
    fields, types and limits; what it refuses is a 400 with pydantic's reasons."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMClientError

    try:
        req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(
            {k: v for k, v in body.items() if k not in RAY_FIELDS})
    except ValidationError as e:
        reasons = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise HTTPError(400, reasons) from None
    except (ValueError, VLLMClientError) as e:  # vLLM's own model validators
        raise HTTPError(400, str(e)) from None
    unserved = [f for f in NOT_SERVED if body.get(f) not in (None, False, [], {})]
    if unserved:
        raise HTTPError(400, f"{unserved} not served by the Ray app (use `vllm serve` for them)")
    return req


def _sampling_bytes(req, chat: bool, unset_max_tokens: int, defaults: dict) -> bytes:
    """vLLM SamplingParams from the request exactly as `vllm serve` makes them, in vLLM's msgpack.
    `unset_max_tokens`: the limit where the request sets none."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.serial_utils import MsgpackEncoder

    max_tokens = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    try:
        sp = req.to_sampling_params(unset_max_tokens if max_tokens is None else max_tokens, defaults)
    except (ValueError, VLLMClientError) as e:  # SamplingParams' checks (max_tokens >= 1, penalties, ...)
        raise HTTPError(400, str(e)) from None
    bufs = MsgpackEncoder().encode(sp)
    if len(bufs) != 1:  # only tensors travel out of band; sampling parameters have none
        raise HTTPError(400, "these sampling parameters cannot be sent to the LLM replica")
    return bytes(bufs[0])


def _logprobs_json(steps, chat: bool, top: int | None):
    """A choice's logprobs in OpenAI's shape (completions or chat), from wire.TokenLogprob steps
    (the chosen token first, then the most likely)."""
    if steps is None:
        return None
    if chat:
        def entry(t):
            return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}

        def most_likely(step):
            return sorted(step, key=lambda t: -t.logprob)[:top]

        return {"content": [{**entry(step[0]), "top_logprobs": [entry(t) for t in most_likely(step)]} for step in steps]}
    tokens = [step[0].text for step in steps]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [step[0].logprob for step in steps],
            "top_logprobs": [{t.text: t.logprob for t in step} for step in steps] if top else None,
            "text_offset": offsets}


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
        self.fields = {path: known | RAY_FIELDS for path, known in request_fields().items()}
        generation = Path(model_dir) / "generation_config.json"
        generation = json.loads(generation.read_text()) if generation.exists() else {}
        self.default_sampling = {k: generation[k] for k in DEFAULT_SAMPLING_KEYS if k in generation}
        self.documents = DocumentRegistry(disk_dir=store_dir)
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
        """(context token ids, layout options) from a request body. Layout options may also ride
        in `mm_processor_kwargs`, as `vllm serve` takes them: the same body works on both."""
        try:  # the same check, and the same words, as `vllm serve` (its middleware)
            mm = layout_options(body.get("mm_processor_kwargs"), self.ext)
        except ContextError as e:
            raise HTTPError(400, str(e)) from None
        opts = {**mm, **{k: body[k] for k in LAYOUT_OPTIONS if body.get(k) is not None}}
        context = []
        if body.get("context_id") is not None:
            try:
                context = self.documents.document(str(body["context_id"]), api_key=key).token_ids
            except UnknownDocument as e:
                raise HTTPError(404, str(e), "NotFoundError") from None
        return context, opts

    async def _run(self, prompt_ids: list[int], context: list[int], opts: dict, req, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        top = (req.top_logprobs if req.logprobs else None) if chat else req.logprobs
        if not req.stream:
            try:
                out = await self.router.generate.remote(prompt_ids, context, **opts)
            except Exception as e:  # the router's errors arrive wrapped by Ray
                raise _failure(e) from None
            choices = [self._choice_json(c, c.text, c.logprobs, chat, top) for c in out.choices]
            generated = sum(len(c.token_ids) for c in out.choices)
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": self.model_name, "choices": choices,
                                 "usage": _usage(out.layout, generated)})

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
            delta, started, finished, generated = first, set(), set(), 0
            while True:
                choice = self._choice_json(delta, delta.text, delta.logprobs, chat, top, stream=True)
                if chat and delta.index not in started:
                    choice["delta"]["role"] = "assistant"
                started.add(delta.index)
                generated += len(delta.token_ids)
                chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": created, "model": self.model_name, "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
                if delta.finish_reason is not None:
                    finished.add(delta.index)
                if len(finished) == delta.n_choices:
                    break
                try:
                    delta = await gen.__anext__()
                    continue
                except StopAsyncIteration:  # ended before every choice finished: a replica failed
                    err = HTTPError(503, "the server's stream ended before the answer was finished; retry it",
                                    "ServiceUnavailableError")
                except Exception as e:
                    err = _failure(e)
                # the headers are sent: say so in the stream, as vLLM does
                error = {"message": err.message, "type": err.kind, "code": err.status}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            if req.stream_options and req.stream_options.include_usage:
                final = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": created, "model": self.model_name, "choices": [],
                         "usage": _usage(delta.layout, generated)}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @staticmethod
    def _choice_json(c, text: str, logprobs, chat: bool, top, stream: bool = False) -> dict:
        """One choice (a wire.Choice or a wire.GenerateDelta) in OpenAI's shape."""
        out = {"index": c.index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
               "logprobs": _logprobs_json(logprobs, chat, top)}
        if not chat:
            return {**out, "text": text}
        if stream:  # the role rides in a choice's first delta only (the caller adds it)
            return {**out, "delta": {"content": text}}
        return {**out, "message": {"role": "assistant", "content": text}}

    async def _handle(self, request: Request, chat: bool):
        try:
            key = self._key(request)
            body = await self._body(request)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            # the same refusals, with the same words, as the middleware of `vllm serve`
            if (reason := check_request(path, body, self.ext, self.fields)) is not None:
                raise HTTPError(400, reason)
            if body.get("model") not in (None, self.model_name):
                raise HTTPError(404, f"The model `{body['model']}` does not exist (this server has "
                                     f"`{self.model_name}`)", "NotFoundError")
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise HTTPError(400, "messages must be a non-empty list")
            else:
                prompt = body.get("prompt")
                ok_ids = isinstance(prompt, list) and prompt and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in prompt)
                if not ((isinstance(prompt, str) and prompt.strip()) or ok_ids):
                    raise HTTPError(400, "prompt must be a non-empty string or a list of token ids")
            req = _validated(body, chat)
            if chat:
                try:
                    prompt_ids = self.tokenizer.apply_chat_template(
                        messages, add_generation_prompt=req.add_generation_prompt, tokenize=True, return_dict=False,
                        **(req.chat_template_kwargs or {}))
                except Exception as e:
                    raise HTTPError(400, f"cannot apply the chat template: {e}") from None
            else:
                prompt_ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else prompt
            context, opts = self._options(body, key)
            if len(context) + len(prompt_ids) > self.max_model_len:
                raise HTTPError(400, f"{len(context) + len(prompt_ids)} tokens exceed this model's extended "
                                     f"length of {self.max_model_len} tokens")
            # unset, generation may use the window positions kept for it (as over `vllm serve`)
            sampling = _sampling_bytes(req, chat, self.ext.reserve, self.default_sampling)
            return await self._run(list(prompt_ids), context, {**opts, "sampling": sampling}, req, chat)
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
            try:
                doc_id = self.documents.register(list(ids), api_key=key)
            except RegistryFull as e:
                raise HTTPError(507, str(e), "InsufficientStorageError") from None
            return {"id": doc_id, "object": "context", "tokens": len(ids)}
        except HTTPError as e:
            return _error(e.status, e.message, e.kind)

