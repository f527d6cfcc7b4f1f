"""The Ray app (router + embedder workers + precomputed-only LLM replica) on a local Ray
runtime gives the in-engine plug-in's outputs for the same inputs."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.engine  # a real vLLM engine, Ray runtime or server process (make test-fast skips)

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from extemb_vllm.serving.embedder_service import EmbedderWorker  # noqa: E402
from extemb_vllm.serving.llm_service import ExtEmbRouter, LLMWorker  # noqa: E402
from extemb_vllm.serving.openai_ingress import OpenAIIngress  # noqa: E402

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import torch  # noqa: E402

from .test_vllm_spine import TOL, _ids  # noqa: E402
from .vllm_helpers import make_llm, shutdown, vllm_request  # noqa: E402

APP = "extemb-test"
CASES = [(_ids(200, 41), 10, {"k": 8, "reserve": 4}), (_ids(90, 42), 5, {"k": 4, "raw_tail": 8, "reserve": 4}),
         (_ids(120, 43), 8, {"reserve": 4}), (_ids(30, 44), 30, {})]


KEYS = ["key-a", "key-b"]


@pytest.fixture(scope="module")
def app_port(tiny_checkpoint, tmp_path_factory):
    """The whole Ray app on the tiny checkpoint: OpenAI ingress (HTTP on loopback, API keys on)
    -> router -> 2 embedder workers + 1 precomputed-only LLM replica."""
    from extemb_vllm.bench.servers import free_port

    port = free_port()
    # metrics reported every second (Ray's default: 10 s), so a test can read them soon after
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ck = str(tiny_checkpoint)
    embedder = EmbedderWorker.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(ck)
    # blocks of 32 (the CPU backend's smallest): the 64-position window holds two, so the replica's
    # prefix-cache reuse is measurable
    llm = LLMWorker.bind(ck, max_model_len=64, max_num_batched_tokens=512, block_size=32)
    router = ExtEmbRouter.bind(ck, embedder, llm)
    ingress = OpenAIIngress.bind(ck, router, store_dir=str(tmp_path_factory.mktemp("contexts")), api_keys=KEYS,
                                 served_model_name="tiny-extemb")
    serve.run(ingress, name=APP, route_prefix="/")
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def router(app_port):
    return serve.get_deployment_handle("ExtEmbRouter", app_name=APP)


@pytest.fixture(scope="module")
def in_engine(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, max_model_len=64, max_num_batched_tokens=512)
    yield llm
    shutdown(llm)


def _ray_generate(router, ids, n_prompt, opts):
    ctx, prompt = (ids[:-n_prompt], ids[-n_prompt:]) if n_prompt < len(ids) else ([], ids)
    return router.generate.remote(prompt, ctx, max_tokens=4, logprobs=True, **opts).result()


@pytest.mark.slow
def test_ray_app_equals_the_in_engine_plug_in(router, in_engine):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
    want = in_engine.generate([vllm_request(ids, n, **o) for ids, n, o in CASES], sp, use_tqdm=False)
    for (ids, n, opts), w in zip(CASES, want):
        got = _ray_generate(router, ids, n, opts)
        assert got.token_ids == list(w.outputs[0].token_ids)
        assert got.prompt_positions == len(w.prompt_token_ids)
        w_lp = [step[t].logprob for step, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)]
        assert max(abs(a - b) for a, b in zip(got.logprobs, w_lp)) < TOL


@pytest.mark.slow
def test_a_document_sent_again_is_not_re_encoded(router):
    embedder = serve.get_deployment_handle("EmbedderWorker", app_name=APP)

    def encoded():
        seen = {}
        for _ in range(60):
            s = embedder.stats.remote().result()
            seen[s["pid"]] = s["chunks_encoded"]
            if len(seen) == 2:
                return sum(seen.values())
        raise AssertionError("did not reach both embedder replicas")

    ids = _ids(250, 45)
    first = _ray_generate(router, ids, 10, {"k": 8, "reserve": 4})
    after_first = encoded()
    for _ in range(4):
        again = _ray_generate(router, ids, 10, {"k": 8, "reserve": 4})
        assert again.token_ids == first.token_ids
    # each replica keeps what it encoded; a chunk may be encoded once per replica at most
    assert encoded() - after_first <= 15  # 240 compressed tokens = 15 chunks of 16


@pytest.mark.slow
def test_a_growing_input_reuses_the_replicas_prefix_cache_with_the_append_stable_rule(router, tiny_checkpoint):
    """As with the in-engine plug-in (tests/test_vllm_spine.py): a request, then the same tokens
    with three appended. Under the append-stable rule the router sends the same compact rows
    (the embedder workers' store serves the chunks) and the replica's prefix cache serves every
    full block of the first request's positions; under window filling, nothing."""
    from extemb_vllm.model import plan_compression
    from extemb_vllm.model.checkpoint import read_extemb_config

    ext, block = read_extemb_config(tiny_checkpoint), 32
    ids = _ids(260, 47)

    def fill_moves_early(n):  # the window-filling layout changes inside the first block
        a, b = (plan_compression(m, ext, reserve=4, fill_window=True) for m in (n, n + 3))
        return a.n_compressed != b.n_compressed and min(a.n_slots, b.n_slots) < block

    n = next(n for n in range(120, 250) if (p := plan_compression(n, ext, reserve=4, append_stable=True)).k
             and plan_compression(n + 3, ext, reserve=4, append_stable=True).n_compressed == p.n_compressed
             and fill_moves_early(n))
    cached = {}
    for stable in (True, False):
        seq = [t + (0 if stable else 1) for t in ids]  # other tokens per rule: no cross-rule hits
        opts = {"append_stable": stable, "reserve": 4, "max_tokens": 1}
        first = router.generate.remote(seq[:n], None, **opts).result()
        second = router.generate.remote(seq[: n + 3], None, **opts).result()
        cached[stable] = (second.cached_positions, first.prompt_positions)
    hits, positions = cached[True]
    assert hits == (positions // block) * block >= block
    assert cached[False][0] == 0


@pytest.mark.slow
def test_bad_requests_get_clear_errors_and_the_app_keeps_serving(router):
    with pytest.raises(Exception, match="does not fit|exceeds"):
        router.generate.remote(list(range(3, 20)), list(range(3, 300)) * 4, k=2).result()
    assert len(_ray_generate(router, _ids(100, 46), 10, {"k": 8, "reserve": 4}).token_ids) == 4


def _client(port, key="key-a"):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)


@pytest.mark.slow
def test_openai_client_same_answers_as_the_in_engine_plug_in(app_port, in_engine):
    from vllm import SamplingParams

    client = _client(app_port)
    assert client.models.list().data[0].id == "tiny-extemb"
    ids = _ids(200, 47)
    # the raw tail fills the window up to `reserve`, so exactly `reserve` tokens can be generated
    want = in_engine.generate([{"prompt_token_ids": ids, "mm_processor_kwargs": {"k": 8, "reserve": 4}}],
                              SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0].outputs[0].text
    r = client.completions.create(model="tiny-extemb", prompt=ids, max_tokens=4, temperature=0,
                                  extra_body={"k": 8, "reserve": 4})
    assert r.choices[0].text == want and r.usage.completion_tokens == 4
    assert r.usage.prompt_tokens == 200 and r.usage.model_extra["extemb"]["prompt_positions"] == 60  # sent; read
    streamed = client.completions.create(model="tiny-extemb", prompt=ids, max_tokens=4, temperature=0, stream=True,
                                         extra_body={"k": 8, "reserve": 4})
    assert "".join(c.choices[0].text for c in streamed) == want


@pytest.mark.slow
def test_registered_context_with_chat_and_any_k(app_port):
    client = _client(app_port)
    doc = client.post("/contexts", body={"token_ids": _ids(150, 48)}, cast_to=object)
    assert doc["id"].startswith("doc-") and doc["tokens"] == 150
    msgs = [{"role": "user", "content": "it was the age of"}]
    for k in (4, 8):
        full = client.chat.completions.create(model="tiny-extemb", messages=msgs, max_tokens=5, temperature=0,
                                              extra_body={"context_id": doc["id"], "k": k, "reserve": 4})
        stream = client.chat.completions.create(model="tiny-extemb", messages=msgs, max_tokens=5, temperature=0,
                                                stream=True, extra_body={"context_id": doc["id"], "k": k, "reserve": 4})
        assert "".join(c.choices[0].delta.content or "" for c in stream) == full.choices[0].message.content
    # another key cannot read the document: it answers as if the id did not exist
    import openai

    with pytest.raises(openai.NotFoundError, match="unknown document id"):
        _client(app_port, "key-b").chat.completions.create(model="tiny-extemb", messages=msgs, max_tokens=2,
                                                           extra_body={"context_id": doc["id"]})


@pytest.mark.slow
@pytest.mark.parametrize("body, status, message", [
    ({"prompt": ""}, 400, "prompt must be a non-empty"),
    ({"prompt": [1, 2], "k": 3}, 400, "k=3 is not served"),
    ({"prompt": list(range(3, 300)), "k": 2}, 400, "does not fit|exceeds"),
    ({"prompt": [5, 6], "context_id": "doc-nope"}, 404, "unknown document id"),
    ({"prompt": [5, 6], "max_tokens": "many"}, 400, "max_tokens: Input should be a valid integer"),
    ({"prompt": [5, 6], "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ({"prompt": [5, 6], "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"prompt": [5, 6], "echo": True}, 400, r"\['echo'\] not served by the Ray app"),
    ({"prompt": [5, 99_999]}, 400, "out of vocabulary|outside the vocabulary"),
])
def test_bad_http_requests_get_clear_errors(app_port, body, status, message):
    import re

    import httpx

    r = httpx.post(f"http://127.0.0.1:{app_port}/v1/completions", json={"model": "tiny-extemb", **body},
                   headers={"Authorization": "Bearer key-a"}, timeout=60)
    assert r.status_code == status and re.search(message, r.json()["error"]["message"]), r.text
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert httpx.get(f"http://127.0.0.1:{app_port}/v1/models", headers=headers).status_code == 401
    bad_json = httpx.post(f"http://127.0.0.1:{app_port}/v1/completions", content=b"{not json",
                          headers={"Authorization": "Bearer key-a", "content-type": "application/json"})
    assert bad_json.status_code == 400
    assert len(_client(app_port).completions.create(model="tiny-extemb", prompt=[5, 6, 7], max_tokens=2)
               .choices[0].text) >= 0  # still serving


@pytest.mark.slow
@pytest.mark.parametrize("context, message", [
    (torch.full((6, 128), float("nan")), "NaN or infinite"),
    (torch.full((6, 128), float("inf")), "NaN or infinite"),
    (torch.zeros(6, 100), r"shape \(n >= 1, 128\)"),       # wrong hidden size
    (torch.zeros(200, 128), "window|does not fit|exceed"),
    ("int32", "dtype 'int32'"),                             # a dtype the wire does not carry
    (b"\x93\x01\x02", "expected|Expected|object"),      # msgspec bytes that are not a GenerateRequest
])
def test_malformed_compact_embeddings_between_processes_are_refused(app_port, context, message):
    """What the router sends an LLM replica: bad compact embeddings or bytes get an ErrorReply
    with the reason, and the replica keeps serving."""

    from extemb_vllm.serving import wire

    llm = serve.get_deployment_handle("LLMWorker", app_name=APP)
    if isinstance(context, bytes):
        payload = context
    elif isinstance(context, str):  # re-label a float32 tensor's dtype in the raw msgpack map
        import msgspec

        good = wire.GenerateRequest([5, 6], wire.Tensor.from_torch(torch.zeros(6, 128)), reserve=4, max_tokens=2)
        raw = msgspec.msgpack.decode(wire.encode(good))
        raw["context"]["dtype"] = context
        payload = msgspec.msgpack.encode(raw)
    else:
        payload = wire.encode(wire.GenerateRequest([5, 6], wire.Tensor.from_torch(context), reserve=4, max_tokens=2))
    with pytest.raises(ValueError, match=message) as e:  # the replica's ErrorReply, re-raised
        wire.decode_reply(llm.generate.remote(payload).result(), wire.GenerateResult)
    assert str(e.value).startswith("bad_request: ")
    ok = wire.decode(llm.generate.remote(wire.encode(wire.GenerateRequest([5, 6, 7], max_tokens=2))).result(),
                     wire.GenerateResult)
    assert len(ok.token_ids) == 2


@pytest.mark.slow
def test_bad_input_catalogue_gets_4xx_and_the_app_keeps_serving(app_port):
    """The same catalogue (and bodies) as against `vllm serve`; unknown document ids too."""
    from extemb_vllm.bench import catalogue

    base = f"http://127.0.0.1:{app_port}"
    limit = _client(app_port).models.list().data[0].max_model_len
    cases = catalogue.catalogue(_ids(limit // 2, 50), limit)  # a context past the window, within the limit
    answers = catalogue.run(base, "tiny-extemb", cases, "ray-app", api_key="key-a")
    assert len(answers) == len(cases)
    wrong = [a for a in answers if not (a.ok and a.next_request_ok)]
    assert not wrong, "\n".join(f"{a.name}: expected {a.expected}, got {a.status} {a.message!r}" for a in wrong)
    assert all(a.ok for a in catalogue.auth_answers(base, "tiny-extemb", "key-a"))
    assert httpx.get(base + "/health").json() == {"status": "ok"}


_scalar = (st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.text(max_size=20)
           | st.floats(allow_nan=False, allow_infinity=False))  # (NaN / inf are not JSON: see the catalogue)
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
_fields = ["prompt", "max_tokens", "k", "raw_tail", "reserve", "fill_window", "temperature", "top_p", "seed", "stream",
           "n", "context_id", "mm_processor_kwargs", "ignore_eos", "model", "bogus"]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(st.sampled_from(_fields), _json, max_size=6))
def test_fuzz_request_bodies_get_an_answer_never_a_500(app_port, body):
    """Random JSON in the request fields: the ingress answers 200, 400, 401 or 404 in OpenAI's
    error shape, never a 500 or a hang."""
    body.setdefault("max_tokens", 2)
    r = httpx.post(f"http://127.0.0.1:{app_port}/v1/completions", json=body,
                   headers={"Authorization": "Bearer key-a"}, timeout=60)
    assert r.status_code in (200, 400, 404), (body, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"]["message"], r.text


@pytest.mark.slow
def test_llm_replica_restart_in_flight_fail_clearly_new_ones_succeed(app_port):
    """Kill the LLM replica while requests run: each one either completes or fails with a 503 /
    an error event (no hang, no truncated answer served as complete); Serve starts a new
    replica and new requests succeed."""
    import concurrent.futures as cf

    import openai

    from extemb_vllm.bench.servers import wait_until
    from extemb_vllm.bench.load import unfinished_requests

    base = f"http://127.0.0.1:{app_port}"
    client = _client(app_port)
    client = client.with_options(timeout=120)

    def one(i):
        try:
            if i % 2:
                chunks = list(client.completions.create(model="tiny-extemb", prompt=_ids(20, 100 + i), max_tokens=40,
                                                        stream=True, extra_body={"ignore_eos": True}))
                # (random weights may well say nothing printable: the finish reason says it is complete)
                return "ok" if chunks[-1].choices[0].finish_reason == "length" else "unfinished stream"
            r = client.completions.create(model="tiny-extemb", prompt=_ids(20, 100 + i), max_tokens=40,
                                          extra_body={"ignore_eos": True})
            return "ok" if r.usage.completion_tokens == 40 else "truncated"
        except openai.APIStatusError as e:
            return f"HTTP {e.status_code}"
        except openai.APIError as e:  # an error event inside a stream
            return f"stream error: {e.message[:60]}"

    with cf.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        assert wait_until(lambda: unfinished_requests(base) > 0, timeout_s=60, every_s=0.02)
        (victim,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "LLMWorker" in a["name"]]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        # while no LLM replica is up, /metrics answers promptly (a 503 scrape), it is not held
        assert httpx.get(base + "/metrics", timeout=15).status_code in (200, 503)
        outcomes = [f.result(timeout=300) for f in futures]
    assert set(outcomes) <= {"ok", "HTTP 503"} | {o for o in outcomes if o.startswith("stream error")}, outcomes
    assert any(o != "ok" for o in outcomes), "the kill landed after every request had finished"
    # a new replica comes up and serves
    def served():
        try:
            r = client.completions.create(model="tiny-extemb", prompt=[5, 6, 7], max_tokens=2)
            return r.usage.completion_tokens >= 1
        except openai.APIError:
            return False
    assert wait_until(served, timeout_s=240, every_s=2)


def test_example_serve_config_is_valid_and_builds_the_app():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from extemb_vllm.serving.llm_service import build_app

    cfg = ServeDeploySchema.model_validate(yaml.safe_load(
        (Path(__file__).parent.parent / "examples/ray/extemb.yaml").read_text()))
    app_cfg = cfg.applications[0]
    assert app_cfg.import_path == "extemb_vllm.serving.llm_service:build_app"
    assert {d.name for d in app_cfg.deployments} == {"EmbedderWorker", "LLMWorker", "ExtEmbRouter", "OpenAIIngress"}
    app = build_app(app_cfg.args)
    # the graph the config promises: ingress -> router -> (embedder pool, LLM pool), one model dir
    # (Application keeps its bound deployment privately; Ray's own build_app reads it the same way)
    ingress = app._bound_deployment
    model_dir, router_app = ingress.init_args[:2]
    router = router_app._bound_deployment
    assert ingress.name == "OpenAIIngress" and router.name == "ExtEmbRouter"
    assert router.init_args[0] == model_dir == app_cfg.args.get("model_dir", "extemb-llama2")
    assert [a._bound_deployment.name for a in router.init_args[1:]] == ["EmbedderWorker", "LLMWorker"]


# The same OpenAI requests to the Ray app and to `vllm serve` of the same checkpoint: sampling
# options beyond the basic five reach the engine on both (greedy, so the answers can be compared).
PARITY = [
    ("/v1/completions", {"prompt": _ids(40, 60), "max_tokens": 6, "stop": ["zz"], "stop_token_ids": [7]}),
    ("/v1/completions", {"prompt": _ids(40, 61), "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 7}),
    ("/v1/completions", {"prompt": _ids(40, 61), "max_tokens": 4, "n": 2}),  # greedy n > 1: both refuse it
    ("/v1/completions", {"prompt": _ids(40, 62), "max_tokens": 4, "logprobs": 2}),
    ("/v1/completions", {"prompt": _ids(40, 63), "max_tokens": 5, "presence_penalty": 1.5, "frequency_penalty": 1.0,
                         "repetition_penalty": 1.3, "top_k": 1, "min_tokens": 3, "seed": 5}),
    ("/v1/completions", {"prompt": _ids(200, 64), "max_tokens": 4, "logprobs": 1,
                         "mm_processor_kwargs": {"k": 8, "reserve": 4}}),  # compressed: slots + raw tail
    ("/v1/completions", {"prompt": _ids(40, 65), "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 3,
                         "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4,
                              "logprobs": True, "top_logprobs": 2, "n": 2, "temperature": 1.0, "seed": 11}),
    ("/v1/completions", {"prompt": _ids(40, 66), "max_tokens": "many"}),
    ("/v1/completions", {"prompt": _ids(40, 67), "max_tokens": 4, "n": 0}),
    ("/v1/completions", {"prompt": _ids(40, 68), "max_tokens": 4, "temperature": -1}),
    ("/v1/completions", {"prompt": _ids(40, 69), "max_tokens": 4, "presence_penalty": 9}),
]


USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "extemb")


def _answer(http, path, body, model):
    """(status, [(text, finish_reason, chosen-token logprobs)] per choice, usage) of one request."""
    r = http.post(path, json={"model": model, "temperature": 0, **body})
    if r.status_code != 200:
        return r.status_code, r.json()["error"]["message"], None
    if body.get("stream"):
        texts = {}
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts.setdefault(c["index"], []).append(c["text"])
        return 200, sorted((i, "".join(t)) for i, t in texts.items()), None
    out = []
    for c in sorted(r.json()["choices"], key=lambda c: c["index"]):
        lp = c.get("logprobs")
        chosen = (lp.get("token_logprobs") or [e["logprob"] for e in lp.get("content", [])]) if lp else None
        out.append((c.get("text", (c.get("message") or {}).get("content")), c["finish_reason"], chosen))
    return 200, out, {key: r.json()["usage"].get(key) for key in USAGE_KEYS}


@pytest.mark.slow
def test_same_requests_same_answers_as_vllm_serve(app_port, tiny_checkpoint, tmp_path):
    from extemb_vllm.bench.servers import VllmServer

    # float32 and eager on both: the Ray app's replica runs so here, and logprobs are compared
    with VllmServer(tiny_checkpoint, tmp_path / "vllm-serve.log", dtype="float32", eager=True,
                    extra_args=("--max-model-len", "64", "--max-num-batched-tokens", "512", "--seed", "0")) as srv, \
            httpx.Client(base_url=srv.base_url, timeout=300) as served, \
            httpx.Client(base_url=f"http://127.0.0.1:{app_port}", timeout=300,
                         headers={"Authorization": "Bearer key-a"}) as ray_app:
        for path, body in PARITY:
            want = _answer(served, path, body, str(tiny_checkpoint))
            got = _answer(ray_app, path, body, "tiny-extemb")
            assert got[0] == want[0], (body, want, got)
            if want[0] != 200:
                continue
            assert len(got[1]) == len(want[1]), (body, want, got)
            assert got[2] == want[2], (body, want, got)  # usage: tokens sent, and what the engine read
            for g, w in zip(got[1], want[1]):
                assert g[:2] == w[:2], (body, want, got)  # text (and finish reason)
                if len(w) > 2 and w[2] is not None:
                    assert max(abs(a - b) for a, b in zip(g[2], w[2])) < TOL, (body, want, got)


def _ray_series() -> dict[str, float]:
    """The plug-in's series as Ray's metrics endpoint of this node exports them, summed over labels
    but `le` (ray_ prefix dropped: the names `vllm serve` exports)."""
    import re
    import urllib.request

    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^ray_(extemb_[a-z_]+)(?:{([^}]*)})? ([0-9.e+-]+)$", text, re.M):
        le = re.search(r'le="([^"]+)"', labels or "")
        key = f"{name}{{le={le.group(1)}}}" if le else name
        out[key] = out.get(key, 0.0) + float(value)
    return out


def _gauge_by_worker(name: str) -> dict[str, float]:
    import re
    import urllib.request

    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {worker: float(value) for worker, value in
            re.findall(rf'^ray_{name}{{[^}}]*WorkerId="([0-9a-f]+)"[^}}]*}} ([0-9.e+-]+)$', text, re.M)}


def _settled(read, every_s: float = 1.5, tries: int = 20) -> dict:
    """A reading that the next one repeats: everything recorded so far has been exported."""
    last = read()
    for _ in range(tries):
        time.sleep(every_s)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError("Ray's exported metrics did not settle")


@pytest.mark.slow
def test_metrics_and_usage_of_an_over_long_request(app_port, tiny_checkpoint):
    """The Ray app reports the plug-in's series under the names `vllm serve` uses (Ray prefixes
    ray_), moved by what an over-long request's layout implies; usage as over `vllm serve`."""
    from extemb_vllm import metrics as m
    from extemb_vllm.model import plan_request
    from extemb_vllm.model.checkpoint import read_extemb_config
    from extemb_vllm.usage import prompt_layout

    ext, ids = read_extemb_config(tiny_checkpoint), _ids(230, 71)  # content no other test sends
    plan = plan_request([], ids, {"k": 8}, ext, None).plan
    assert plan.k == 8 and plan.n_compressed > 0
    embedder = serve.get_deployment_handle("EmbedderWorker", app_name=APP)

    def store_bytes() -> dict:  # {Ray worker id: bytes its store holds}, of both replicas
        seen = {}
        for _ in range(60):
            s = embedder.stats.remote().result()
            seen[s["worker_id"]] = s["store_bytes"]
            if len(seen) == 2:
                return seen
        raise AssertionError("did not reach both embedder replicas")

    before, stored = _settled(_ray_series), store_bytes()
    with httpx.Client(base_url=f"http://127.0.0.1:{app_port}", timeout=300,
                      headers={"Authorization": "Bearer key-a"}) as http:
        r = http.post("/v1/completions", json={"model": "tiny-extemb", "prompt": ids, "max_tokens": 2,
                                               "mm_processor_kwargs": {"k": 8}})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (230, 230 + usage["completion_tokens"])
    assert usage["extemb"] == {k: v for k, v in prompt_layout(230, plan).items() if k != "sent_tokens"}
    after, now_stored = _settled(_ray_series), store_bytes()
    moved = {name: after[name] - before.get(name, 0.0) for name in after}
    exported = {name.split("{")[0] for name in after}
    assert {s.name for s in m.SERIES if s.name != m.CHUNKS_CACHED.name} <= {  # cached: once one is served
        n.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in exported}
    assert moved["extemb_requests_compressed_total"] == 1
    assert moved["extemb_compressed_tokens_total"] == plan.n_compressed
    assert moved["extemb_compact_slots_total"] == plan.n_slots
    # the k observed: in the bucket up to 8, not in the one up to 4 (Ray's _sum is made of bucket midpoints)
    assert (moved["extemb_k_bucket{le=8.0}"], moved["extemb_k_bucket{le=4.0}"], moved["extemb_k_count"]) == (1, 0, 1)
    assert moved["extemb_chunks_encoded_total"] == len(plan.chunks)
    assert moved.get("extemb_chunks_cached_total", 0) == 0
    assert moved["extemb_embedder_seconds_count"] >= 1
    # the worker that encoded them keeps every compressed token's full-resolution output (float32),
    # and the gauge (one series per worker, set again every second) says what each store holds
    hidden = json.loads((tiny_checkpoint / "config.json").read_text())["hidden_size"]
    assert sum(now_stored.values()) - sum(stored.values()) == plan.n_compressed * hidden * 4
    assert _gauge_by_worker("extemb_chunk_cache_bytes") == now_stored
