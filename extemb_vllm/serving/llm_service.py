"""LLM replicas and the router that feeds them, as Ray Serve deployments.

`LLMWorker` runs vLLM's AsyncLLM over an ExtEmb checkpoint in precomputed-only mode:
the process holds the frozen Llama and no embedder; compact embeddings arrive with
each request. `ExtEmbRouter` does what the in-engine plug-in does before pre-fill,
but across processes: plan the layout (the same `plan_request`), get the
full-resolution outputs of the compressed chunks from the embedder workers (which
keep them in their chunk store), keep every k-th row, and send the raw tail plus
the compact embeddings to an LLM replica. The two pools scale independently.

    embedder = EmbedderWorker.options(num_replicas=4).bind(model_dir)
    llm = LLMWorker.options(num_replicas=1).bind(model_dir)
    app = ExtEmbRouter.bind(model_dir, embedder, llm)
"""

from __future__ import annotations

import uuid

import msgspec
import torch
from ray import serve

from ..model import ExtEmbConfig, compact_rows, plan_request
from ..model.checkpoint import read_extemb_config
from ..usage import prompt_layout
from . import metrics, wire
from .embedder_service import EmbedderClient, EmbedderWorker


class LLMStreamError(RuntimeError):
    pass


def _request_fault(e: Exception) -> str | None:
    """The reason when `e` is the request's fault, else None (the server's: let it raise).
    vLLM's own split: VLLMClientError is the request's fault (its 4xx). The plug-in's input
    checks (shape, hidden size, NaN, window: ValueError) reach us wrapped by AsyncLLM in an
    EngineGenerateError, whose cause they are."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineGenerateError

    cause = e.__cause__ if isinstance(e, EngineGenerateError) else e
    return str(cause) if isinstance(cause, (ValueError, VLLMClientError)) else None


def _sampling_params(req: wire.GenerateRequest):
    """The request's vLLM SamplingParams: as the ingress made them from the OpenAI request, or
    from the wire's own fields. Outputs are always cumulative: the worker cuts its deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.serial_utils import MsgpackDecoder

    if req.sampling is None:
        sp = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                            ignore_eos=req.ignore_eos, logprobs=0 if req.logprobs else None)
    else:
        try:
            sp = MsgpackDecoder(SamplingParams).decode(req.sampling)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a malformed payload
            raise wire.WireError(f"malformed sampling parameters: {e}") from None
        if req.logprobs and sp.logprobs is None:
            sp.logprobs = 0
    sp.output_kind = RequestOutputKind.CUMULATIVE
    return sp


def _choice(o, token_ids, logprobs) -> wire.Choice:
    """A vLLM CompletionOutput (or the tokens and logprobs of its latest step) on the wire."""
    steps = None
    if logprobs is not None:
        steps = []
        for token, step in zip(token_ids, logprobs):
            chosen = step[token]
            top = sorted(((t, lp) for t, lp in step.items() if t != token), key=lambda x: -x[1].logprob)
            steps.append([wire.TokenLogprob(t, lp.logprob, lp.decoded_token or "")
                          for t, lp in [(token, chosen), *top]])
    return wire.Choice(o.index, list(token_ids), o.text, o.finish_reason, o.stop_reason, steps)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class LLMWorker:
    def __init__(self, model_dir: str, dtype: str = "float32", **engine_kwargs):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=model_dir, dtype=dtype, enforce_eager=True, seed=0,
                               hf_overrides={"extemb_precomputed_only": True},
                               limit_mm_per_prompt={"context": 1}, **engine_kwargs)
        self.engine = AsyncLLM.from_engine_args(args)

    async def _outputs(self, req: wire.GenerateRequest, sp):
        prompt = {"prompt_token_ids": req.prompt_token_ids}
        if req.context is not None:
            item = {"embeds": req.context.to_torch()}
            if req.reserve is not None:
                item["reserve"] = req.reserve
            prompt["multi_modal_data"] = {"context": item}
        async for out in self.engine.generate(prompt, sp, request_id=uuid.uuid4().hex):
            yield out

    async def generate(self, payload: bytes) -> bytes:
        try:
            req = wire.decode(payload, wire.GenerateRequest)
            latest, prompt_positions, cached = {}, 0, 0  # with n > 1 an output carries the choices that moved
            async for out in self._outputs(req, _sampling_params(req)):
                latest.update({o.index: o for o in out.outputs})
                prompt_positions, cached = len(out.prompt_token_ids), out.num_cached_tokens or 0
        except Exception as e:  # WireError, the processor's input checks (shape, window, NaN, ...)
            if (reason := _request_fault(e)) is None:
                raise
            return wire.encode(wire.ErrorReply("bad_request", reason))
        choices = [_choice(o, o.token_ids, o.logprobs) for _, o in sorted(latest.items())]
        first = choices[0]
        logprobs = [step[0].logprob for step in first.logprobs] if req.logprobs and first.logprobs else None
        return wire.encode(wire.GenerateResult(first.token_ids, first.text, first.finish_reason, prompt_positions,
                                               logprobs, choices, cached))

    async def generate_stream(self, payload: bytes):
        """Streams wire.GenerateDelta bytes, one per choice that moved; a bad request yields one
        ErrorReply. A caller that stops iterating cancels the generator, and vLLM aborts the
        request (its KV blocks free)."""
        try:
            req = wire.decode(payload, wire.GenerateRequest)
            sp = _sampling_params(req)
            sent: dict[int, tuple[int, int]] = {}  # choice -> (tokens, characters) already sent
            finished: set[int] = set()
            async for out in self._outputs(req, sp):
                for o in out.outputs:
                    n_tokens, n_chars = sent.get(o.index, (0, 0))
                    if o.index in finished or (len(o.token_ids) == n_tokens and o.finish_reason is None):
                        continue
                    if o.finish_reason is not None:
                        finished.add(o.index)
                    c = _choice(o, o.token_ids[n_tokens:], o.logprobs[n_tokens:] if o.logprobs else None)
                    yield wire.encode(wire.GenerateDelta(c.token_ids, o.text[n_chars:], c.finish_reason,
                                                         len(out.prompt_token_ids), c.index, sp.n,
                                                         c.stop_reason, c.logprobs))
                    sent[o.index] = (len(o.token_ids), len(o.text))
        except Exception as e:
            if (reason := _request_fault(e)) is None:
                raise
            yield wire.encode(wire.ErrorReply("bad_request", reason))

    async def stats(self) -> dict:
        """Requests this replica's engine still holds (a hung-up stream must reach 0 again)."""
        return {"unfinished_requests": self.engine.get_num_unfinished_requests()}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
class ExtEmbRouter:
    def __init__(self, model_dir: str, embedder, llm):
        from transformers import AutoTokenizer

        self.ext: ExtEmbConfig = read_extemb_config(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.embedder = EmbedderClient(embedder)
        self.llm = llm

    async def _payload(self, prompt_token_ids, context_token_ids=None, k=None, raw_tail=None, reserve=None,
                       fill_window=None, append_stable=None, **sampling) -> tuple[bytes, dict]:
        """The same layout as the in-engine plug-in (`plan_request`), with the embedder running
        in its own pool; and the figures of that layout a response's usage reports."""
        options = {"k": k, "raw_tail": raw_tail, "reserve": reserve, "fill_window": fill_window,
                   "append_stable": append_stable}
        layout = plan_request(context_token_ids or [], prompt_token_ids, options, self.ext,
                              self.tokenizer.bos_token_id)
        context = None
        if layout.plan.k is not None:
            metrics.record_layout(layout.plan)
            hidden = await self.embedder.aencode(layout.chunks)
            context = wire.Tensor.from_torch(torch.cat(compact_rows(hidden, layout.plan.k)))
        payload = wire.encode(wire.GenerateRequest(layout.raw_ids, context, layout.reserve, **sampling))
        return payload, prompt_layout(len(layout.ids), layout.plan)

    async def generate(self, prompt_token_ids: list[int], context_token_ids: list[int] | None = None,
                       **options) -> wire.GenerateResult:
        """options: k, raw_tail, reserve, fill_window, append_stable, and wire.GenerateRequest's sampling fields
        (`sampling`: vLLM SamplingParams made by the ingress from an OpenAI request)."""
        payload, layout = await self._payload(prompt_token_ids, context_token_ids, **options)
        reply = await self.llm.generate.remote(payload)
        return msgspec.structs.replace(wire.decode_reply(reply, wire.GenerateResult), layout=layout)

    async def llm_stats(self) -> dict:
        return await self.llm.stats.remote()

    async def generate_stream(self, prompt_token_ids: list[int], context_token_ids: list[int] | None = None,
                              **options):
        payload, layout = await self._payload(prompt_token_ids, context_token_ids, **options)
        finished, n_choices = set(), 1
        async for reply in self.llm.options(stream=True).generate_stream.remote(payload):
            delta = wire.decode_reply(reply, wire.GenerateDelta)
            n_choices = delta.n_choices
            if delta.finish_reason is not None:
                finished.add(delta.index)
            yield msgspec.structs.replace(delta, layout=layout)
        if len(finished) < n_choices:  # a replica that died can end the stream quietly: never pass that off as done
            raise LLMStreamError("the LLM replica's stream ended before the answer was finished")


def build_app(args: dict) -> serve.Application:
    """Serve config entry point (`import_path: extemb_vllm.serving.llm_service:build_app`):
    the OpenAI-compatible ingress over the router, the embedder pool and the LLM pool.

    args: model_dir (default extemb-llama2), embedder_dtype and llm_dtype (default "auto": the CPU
    rule of `vllm serve`, vllm_plugin/cpu_settings.py), store_dir (disk tier
    of the embedder workers' store), contexts_dir (registered documents), api_keys, and
    engine_kwargs for vLLM (e.g. max_num_seqs). Replica counts and resources belong to the
    config's `deployments:` section, so each pool scales on its own.
    """
    from .openai_ingress import OpenAIIngress

    model_dir = str(args.get("model_dir", "extemb-llama2"))
    # "auto": as `vllm serve` of the plug-in picks (bfloat16 on CPUs with native bf16, else float32)
    embedder = EmbedderWorker.bind(model_dir, dtype=args.get("embedder_dtype", "auto"),
                                   store_dir=args.get("store_dir"))
    llm = LLMWorker.bind(model_dir, dtype=args.get("llm_dtype", "auto"), **args.get("engine_kwargs", {}))
    router = ExtEmbRouter.bind(model_dir, embedder, llm)
    return OpenAIIngress.bind(model_dir, router, store_dir=args.get("contexts_dir"), api_keys=args.get("api_keys"))
