"""Concurrent OpenAI clients for the serving benchmarks: the same client code against `vllm
serve` and the Ray app. Each request is a `RequestSpec`; each answer an `Outcome` that says
whether it completed, was cancelled by the client on purpose, or failed and why; and the long
prompts the Ray and load benchmarks send."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class RequestSpec:
    kind: str  # "long" (past the window: compressed) or "short"
    prompt: str
    max_tokens: int
    stream: bool = False
    chat: bool = False
    cancel_after: int | None = None  # stream chunks read before the client hangs up


@dataclass
class Outcome:
    kind: str
    stream: bool
    chat: bool
    status: str  # "ok", "cancelled" (the client hung up on purpose) or "failed"
    cause: str | None  # for failures: the HTTP status and error type, or the exception
    start_s: float
    latency_s: float
    ttft_s: float | None
    completion_tokens: int


async def _one(client, model: str, spec: RequestSpec, t0: float) -> Outcome:
    import openai

    start = time.perf_counter()
    ttft, tokens, status, cause = None, 0, "ok", None
    kw = dict(model=model, max_tokens=spec.max_tokens, temperature=0, extra_body={"ignore_eos": True})
    try:
        if spec.chat:
            call = client.chat.completions.create(messages=[{"role": "user", "content": spec.prompt}],
                                                  stream=spec.stream, **kw)
        else:
            call = client.completions.create(prompt=spec.prompt, stream=spec.stream, **kw)
        resp = await call
        if spec.stream:
            chunks = 0
            async for chunk in resp:
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - start
                tokens += 1 if chunk.choices and _text(chunk, spec.chat) else 0
                if spec.cancel_after is not None and chunks >= spec.cancel_after:
                    await resp.close()  # hang up mid-stream: the server must cancel the request
                    status = "cancelled"
                    break
        else:
            tokens = resp.usage.completion_tokens if resp.usage else 0
            ttft = time.perf_counter() - start
    except openai.APIStatusError as e:
        status, cause = "failed", f"HTTP {e.status_code} {type(e).__name__}"
    except openai.APIConnectionError as e:  # refused, reset, timed out
        status, cause = "failed", type(e).__name__
    except openai.APIError:  # the server reported an error inside a stream it had begun
        status, cause = "failed", "error event in the stream"
    except Exception as e:  # anything else is a failure too, by its type
        status, cause = "failed", type(e).__name__
    return Outcome(spec.kind, spec.stream, spec.chat, status, cause, start - t0, time.perf_counter() - start, ttft,
                   tokens)


def _text(chunk, chat: bool) -> str:
    c = chunk.choices[0]
    return (c.delta.content or "") if chat else (c.text or "")


async def drive(base_url: str, model: str, specs, concurrency: int, duration_s: float | None = None,
                api_key: str | None = None, timeout_s: float = 600) -> list[Outcome]:
    """`concurrency` clients take specs from the iterable until it ends or `duration_s` passes
    (a request already sent is waited for); returns every outcome in completion order."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key or "none", timeout=timeout_s,
                                max_retries=0)
    specs = iter(specs)
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()

    async def worker():
        for spec in specs:
            if duration_s is not None and time.perf_counter() - t0 > duration_s:
                return
            outcomes.append(await _one(client, model, spec, t0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return outcomes


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    ok = [o for o in outcomes if o.status == "ok"]
    lat = np.array([o.latency_s for o in ok]) if ok else np.array([np.nan])
    ttft = np.array([o.ttft_s for o in ok if o.ttft_s is not None] or [np.nan])
    return {
        "sent": len(outcomes),
        "completed": len(ok),
        "cancelled_by_client": sum(o.status == "cancelled" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
        "failed_by_cause": dict(Counter(o.cause for o in outcomes if o.status == "failed")),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "by_kind": dict(sorted(Counter(o.kind for o in ok).items())),  # completed requests by kind
    }


def outcomes_json(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


QUESTION = "\n\nQuestion: who speaks in the passage above? Answer:"


def long_prompts(model_dir: Path, n: int, doc_tokens: int) -> list[str]:
    """n different held-out passages of about doc_tokens tokens, each followed by a question."""
    from transformers import AutoTokenizer

    from ..corpus import prepare

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = sorted((prepare(Path("data")) / "shakespeare" / "heldout").glob("*.txt"))
    ids = [t for f in texts for t in tok(f.read_text(), add_special_tokens=False).input_ids]
    if len(ids) < n * doc_tokens:
        raise ValueError(f"held-out text has {len(ids)} tokens, {n} x {doc_tokens} wanted")
    return [tok.decode(ids[i * doc_tokens : (i + 1) * doc_tokens]) + QUESTION for i in range(n)]
