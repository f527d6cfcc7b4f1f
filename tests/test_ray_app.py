"""The Ray app (router + embedder workers + precomputed-only LLM replica) on a local Ray
runtime gives the in-engine plug-in's outputs for the same inputs."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from extemb_vllm.serving.embedder_service import EmbedderWorker  # noqa: E402
from extemb_vllm.serving.llm_service import ExtEmbRouter, LLMWorker  # noqa: E402
from extemb_vllm.serving.openai_ingress import OpenAIIngress  # noqa: E402

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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ck = str(tiny_checkpoint)
    embedder = EmbedderWorker.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(ck)
    llm = LLMWorker.bind(ck, max_model_len=64, max_num_batched_tokens=512)
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
    want = in_engine.generate([{"prompt_token_ids": ids, "mm_processor_kwargs": {"k": 8, "reserve": 4}}],
                              SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0].outputs[0].text
    r = client.completions.create(model="tiny-extemb", prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"k": 8, "reserve": 4})
    assert r.choices[0].text == want and r.usage.completion_tokens == 6
    streamed = client.completions.create(model="tiny-extemb", prompt=ids, max_tokens=6, temperature=0, stream=True,
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
    ({"prompt": [5, 6], "max_tokens": "many"}, 400, "max_tokens must be an integer"),
    ({"prompt": [5, 6], "temperature": "hot"}, 400, "temperature must be a number"),
    ({"prompt": [5, 6], "max_tokens": 0}, 400, "max_tokens must be >= 1"),
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
    assert type(app).__name__ == "Application"
