"""The Ray app (router + embedder workers + precomputed-only LLM replica) on a local Ray
runtime gives the in-engine plug-in's outputs for the same inputs."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from extemb_vllm.serving.embedder_service import EmbedderWorker  # noqa: E402
from extemb_vllm.serving.llm_service import ExtEmbRouter, LLMWorker  # noqa: E402

from .test_vllm_spine import TOL, _ids  # noqa: E402
from .vllm_helpers import make_llm, shutdown, vllm_request  # noqa: E402

APP = "extemb-test"
CASES = [(_ids(200, 41), 10, {"k": 8, "reserve": 4}), (_ids(90, 42), 5, {"k": 4, "raw_tail": 8, "reserve": 4}),
         (_ids(120, 43), 8, {"reserve": 4}), (_ids(30, 44), 30, {})]


@pytest.fixture(scope="module")
def router(tiny_checkpoint):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    ck = str(tiny_checkpoint)
    embedder = EmbedderWorker.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(ck)
    llm = LLMWorker.bind(ck, max_model_len=64, max_num_batched_tokens=512)
    yield serve.run(ExtEmbRouter.bind(ck, embedder, llm), name=APP, route_prefix=None)
    serve.shutdown()
    ray.shutdown()


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


def test_example_serve_config_is_valid_and_builds_the_app():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from extemb_vllm.serving.llm_service import build_app

    cfg = ServeDeploySchema.model_validate(yaml.safe_load(
        (Path(__file__).parent.parent / "examples/ray/extemb.yaml").read_text()))
    app_cfg = cfg.applications[0]
    assert app_cfg.import_path == "extemb_vllm.serving.llm_service:build_app"
    assert {d.name for d in app_cfg.deployments} == {"EmbedderWorker", "LLMWorker", "ExtEmbRouter"}
    app = build_app(app_cfg.args)
    assert type(app).__name__ == "Application"
