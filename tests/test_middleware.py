"""The `vllm serve --middleware` of the plug-in, over a small FastAPI app standing in for vLLM's
routes (fast: no engine). The real server runs it in tests/test_server.py."""

import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from extemb_vllm.model import ExtEmbConfig
from extemb_vllm.model.config import max_context_tokens
from extemb_vllm.vllm_plugin import ARCHITECTURE
from extemb_vllm.vllm_plugin.middleware import ExtEmbRequests

EXT = ExtEmbConfig()


def _app(architecture: str, api_key: str | None = None) -> TestClient:
    app = FastAPI()
    app.state.args = SimpleNamespace(api_key=[api_key] if api_key else None)
    hf = SimpleNamespace(architectures=[architecture], extemb=EXT.to_dict(),
                         advertised_max_model_len=max_context_tokens(EXT))
    app.state.vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf))

    async def echo(request: Request):  # the body reaches the app unchanged
        try:
            return {"echo": await request.json()}
        except ValueError:
            return JSONResponse({"error": {"message": "JSON decode error", "code": 400}}, status_code=400)

    app.post("/v1/completions")(echo)
    app.post("/v1/chat/completions")(echo)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": EXT.window}]}

    app.add_middleware(ExtEmbRequests)
    return TestClient(app)


@pytest.fixture(scope="module")
def client():
    return _app(ARCHITECTURE)


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "max_token": 5}, r"unknown field\(s\) in the request: \['max_token'\]"),
    ({"prompt": "x", "mm_processor_kwargs": [16]}, "mm_processor_kwargs must be a JSON object.*got an array"),
    ({"prompt": "x", "mm_processor_kwargs": "k=16"}, "mm_processor_kwargs must be a JSON object.*got a string"),
    ({"prompt": "x", "mm_processor_kwargs": {"kk": 16}}, r"unknown key\(s\) in mm_processor_kwargs: \['kk'\]"),
    ({"prompt": "x", "mm_processor_kwargs": {"k": "16"}}, "k must be an integer"),
    ({"prompt": "x", "mm_processor_kwargs": {"k": 12}}, "not served by this model"),
    ({"prompt": "x", "mm_processor_kwargs": {"raw_tail": 4096}}, "raw_tail=4096 does not fit the window"),
    ({"prompt": "x", "mm_processor_kwargs": {"reserve": 5000}}, "reserve=5000 must be smaller than the window"),
    ({"prompt": "x", "mm_processor_kwargs": {"fill_window": 1}}, "fill_window must be true or false"),
])
def test_bad_requests_are_400_naming_the_problem(client, body, message):
    import re

    r = client.post("/v1/completions", json={"model": "m", **body})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert re.search(message, err["message"]), err["message"]


def test_good_requests_pass_through_unchanged(client):
    body = {"model": "m", "prompt": "x", "max_tokens": 3, "stop": ["\n"], "logprobs": 2,
            "mm_processor_kwargs": {"k": 16, "raw_tail": 512, "reserve": 64, "fill_window": False}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json() == {"echo": body}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4,
            "mm_processor_kwargs": {"k": 8}}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.json() == {"echo": chat}
    assert client.post("/v1/chat/completions", json={**chat, "max_token": 1}).status_code == 400


def test_malformed_json_is_left_to_vllm(client):
    # the app behind answers it (vLLM: its own 400); the middleware passes it on, it does not crash
    r = client.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "JSON decode error"


def test_models_advertise_the_extended_length(client):
    (card,) = client.get("/v1/models").json()["data"]
    assert card["max_model_len"] == max_context_tokens(EXT) > EXT.window


def test_other_models_are_untouched():
    other = _app("LlamaForCausalLM")
    assert other.get("/v1/models").json()["data"][0]["max_model_len"] == EXT.window
    body = {"model": "m", "prompt": "x", "max_token": 5, "mm_processor_kwargs": [1]}
    r = other.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json() == {"echo": body}


def test_with_api_keys_only_an_authorised_request_is_checked(monkeypatch):
    """vLLM answers a request without the key 401 (behind this middleware): ours must not answer
    it first. With the key, the checks apply."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    keyed = _app(ARCHITECTURE, api_key="secret")
    body = {"model": "m", "prompt": "x", "max_token": 5}
    assert keyed.post("/v1/completions", json=body).status_code == 200  # passed on (the stub has no auth)
    assert keyed.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 200
    r = keyed.post("/v1/completions", json=body, headers={"Authorization": "Bearer secret"})
    assert r.status_code == 400 and "max_token" in r.json()["error"]["message"]


# -- usage: the tokens sent in prompt_tokens, what the engine read in usage.extemb ----------------
def _usage_app() -> TestClient:
    """A stand-in for vLLM's completion route: it renders its prompts as the plug-in's renderer
    does (one layout per prompt into the request's accounting) and reports vLLM's usage, whose
    prompt_tokens are the positions read; streamed in pieces that split events."""
    from fastapi.responses import StreamingResponse

    from extemb_vllm.model.config import plan_compression
    from extemb_vllm.usage import prompt_layout
    from extemb_vllm.vllm_plugin import accounting

    app = FastAPI()
    app.state.args = SimpleNamespace(api_key=None)
    hf = SimpleNamespace(architectures=[ARCHITECTURE], extemb=EXT.to_dict(), advertised_max_model_len=91136)
    app.state.vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        lengths = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        plans = [plan_compression(n, EXT, reserve=EXT.reserve) for n in lengths]
        for n, plan in zip(lengths, plans):
            accounting.add(prompt_layout(n, plan))
        positions = sum(p.llm_length for p in plans)
        usage = {"prompt_tokens": positions, "total_tokens": positions + 5, "completion_tokens": 5,
                 "prompt_tokens_details": None}
        if not body.get("stream"):
            return {"id": "cmpl-1", "choices": [{"index": 0, "text": "abcde"}], "usage": usage}
        per_prompt = {"prompt_tokens": plans[0].llm_length, "completion_tokens": 1,
                      "total_tokens": plans[0].llm_length + 1}
        events = [json.dumps({"choices": [{"index": 0, "text": "a"}], "usage": per_prompt}),
                  json.dumps({"choices": [{"index": 0, "text": 'x "usage"'}], "usage": None}),
                  json.dumps({"choices": [], "usage": usage})]
        raw = "".join(f"data: {e}\n\n" for e in events) + "data: [DONE]\n\n"
        pieces = [raw[i:i + 37] for i in range(0, len(raw), 37)]  # events split across sends
        return StreamingResponse((p for p in pieces), media_type="text/event-stream")

    app.add_middleware(ExtEmbRequests)
    return TestClient(app)


def test_usage_reports_the_tokens_sent_and_what_the_engine_read():
    from extemb_vllm.model.config import plan_compression

    r = _usage_app().post("/v1/completions", json={"model": "m", "prompt": 12000})
    plan = plan_compression(12000, EXT, reserve=EXT.reserve)
    assert plan.k is not None and plan.llm_length < 12000
    assert r.json()["usage"] == {
        "prompt_tokens": 12000, "completion_tokens": 5, "total_tokens": 12005, "prompt_tokens_details": None,
        "extemb": {"prompt_positions": plan.llm_length, "compact_slots": plan.n_slots, "raw_positions": plan.n_raw,
                   "compressed_tokens": plan.n_compressed, "k": plan.k}}
    assert int(r.headers["content-length"]) == len(r.content)


def test_usage_of_a_batch_sums_its_prompts_and_a_short_prompt_reads_what_was_sent():
    from extemb_vllm.model.config import plan_compression

    long = plan_compression(30000, EXT, reserve=EXT.reserve)
    usage = _usage_app().post("/v1/completions", json={"model": "m", "prompt": [30000, 100]}).json()["usage"]
    assert usage["prompt_tokens"] == 30100 and usage["total_tokens"] == 30105
    assert usage["extemb"] == {"prompt_positions": long.llm_length + 100, "compact_slots": long.n_slots,
                               "raw_positions": long.n_raw + 100, "compressed_tokens": long.n_compressed,
                               "k": long.k}


def test_streamed_usage_events_are_rewritten_and_the_rest_passes_unchanged():
    from extemb_vllm.model.config import plan_compression

    plan = plan_compression(20000, EXT, reserve=EXT.reserve)
    r = _usage_app().post("/v1/completions", json={"model": "m", "prompt": 20000, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) == 4
    first, middle, last = (json.loads(e[len("data: "):]) for e in events[:3])
    assert first["usage"]["prompt_tokens"] == 20000 and first["usage"]["total_tokens"] == 20001  # per-chunk usage
    assert middle == {"choices": [{"index": 0, "text": 'x "usage"'}], "usage": None}
    assert last["usage"]["prompt_tokens"] == 20000 and last["usage"]["extemb"]["prompt_positions"] == plan.llm_length
