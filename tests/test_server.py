"""A real `vllm serve --model extemb-llama2` on loopback, driven by the openai client (slow)."""

import os
import re
import subprocess
import time

import openai
import pytest

from extemb_vllm.bench.servers import free_port, metric, wait_until

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.engine]  # engine: a real server process (make test-fast skips)
MODEL = "extemb-llama2"


KEY = "test-key"  # the server runs with --api-key: every test also checks the key path


@pytest.fixture(scope="module")
def server(smollm2_checkpoint, tmp_path_factory):
    """The README's serving command exactly as written (its port, 8000), in the activated
    .venv; the API key comes from the environment (VLLM_API_KEY), so the command is unchanged."""
    from extemb_vllm.bench.servers import Server, readme_serve_command

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = readme_serve_command()
    assert "vllm serve --model extemb-llama2 " in command
    with Server(["bash", "-c", f"source .venv/bin/activate && {command}"], 8000, log,
                env={"VLLM_API_KEY": KEY}) as srv:
        yield srv.base_url, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def document(heldout_texts, smollm2):
    _, tok = smollm2
    ids = tok((heldout_texts / "troilus_and_cressida.txt").read_text()).input_ids
    return tok.decode(ids[2000:6500])  # ~4.5K tokens: past the 4096-token window


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    from extemb_vllm.model.checkpoint import load_model

    return load_model(smollm2_checkpoint)


def test_models_advertise_the_extended_length(client, smollm2):
    model, _ = smollm2
    from extemb_vllm.model.config import max_context_tokens

    (card,) = client.models.list().data
    assert card.id == MODEL and card.max_model_len == max_context_tokens(model.ext) > model.ext.window


def test_over_long_completion_streaming_and_not(client, document, smollm2):
    model, tok = smollm2
    n_tokens = len(tok(document).input_ids)
    assert n_tokens > model.ext.window
    client.completions.create(model=MODEL, prompt=document, max_tokens=1, temperature=0)  # same cache state for both
    r = client.completions.create(model=MODEL, prompt=document, max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == n_tokens  # what the client sent; what the engine read, in usage.extemb
    assert r.usage.model_extra["extemb"]["prompt_positions"] == model.plan(n_tokens, reserve=model.ext.reserve).llm_length
    chunks = list(client.completions.create(model=MODEL, prompt=document, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_long_chat_streaming_and_not(client, document):
    messages = [{"role": "user", "content": document + "\n\nWho speaks first in this passage?"}]
    # the first request fills the prefix cache; the two compared both read it (with the worker on
    # two cores, a cold pre-fill and a cached one differ in the last bits, which can flip a
    # greedy near-tie: the comparison is of streaming, under the same cache state)
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_repeated_document_is_served_from_cache(client, server, document):
    base, _ = server
    doc = document + " And so it ends."  # new content: its chunks are not cached yet
    client.completions.create(model=MODEL, prompt=doc, max_tokens=1)
    hits = metric(base, "vllm:prefix_cache_hits_total")
    client.completions.create(model=MODEL, prompt=doc, max_tokens=1)
    # compact slots and raw tail of the repeat come from the prefix cache, keyed on chunk content
    assert metric(base, "vllm:prefix_cache_hits_total") - hits > 1000


def _scrape(base: str) -> dict[str, float]:
    from extemb_vllm.bench.servers import metrics_text

    samples = {}
    for line in metrics_text(base).splitlines():
        if line.startswith("extemb_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_and_usage_of_an_over_long_request(client, server, document, smollm2):
    """/metrics of the README's server carries the plug-in's series, and an over-long request moves
    them by what its layout implies; usage says the tokens sent and what the engine read. Then the
    same text at another k: its chunks come from the chunk cache, not the embedder."""
    from extemb_vllm.usage import prompt_layout
    from extemb_vllm.vllm_plugin.cpu_settings import native_bf16_flags, serving_dtype

    base, log = server
    model, tok = smollm2
    doc = "The metrics, read here.\n" + document  # shifted: chunks no other test has encoded
    sent = len(tok(doc).input_ids)
    plan = model.plan(sent, reserve=model.ext.reserve)
    before = _scrape(base)
    r = client.completions.create(model=MODEL, prompt=doc, max_tokens=4, temperature=0)
    moved = {name: value - before.get(name, 0) for name, value in _scrape(base).items()}

    assert plan.k is not None and (r.usage.prompt_tokens, r.usage.total_tokens) == (sent, sent + 4)
    assert r.usage.model_extra["extemb"] == {key: value for key, value in prompt_layout(sent, plan).items()
                                             if key != "sent_tokens"}
    assert moved["extemb_requests_compressed_total"] == 1 and moved["extemb_k_count"] == 1
    assert moved["extemb_k_sum"] == plan.k
    assert moved["extemb_compressed_tokens_total"] == plan.n_compressed
    assert moved["extemb_compact_slots_total"] == plan.n_slots
    assert moved["extemb_chunks_encoded_total"] == len(plan.chunks) and moved["extemb_chunks_cached_total"] == 0
    assert moved["extemb_embedder_seconds_count"] >= 1 and moved["extemb_embedder_seconds_sum"] > 0
    # full-resolution outputs kept: every compressed token's hidden state, in the served dtype
    dtype = serving_dtype()
    hidden = model.llm.config.hidden_size
    assert moved["extemb_chunk_cache_bytes"] == plan.n_compressed * hidden * dtype.itemsize
    settings = [line for line in log.read_text().splitlines() if "ExtEmb CPU settings: dtype" in line]
    assert settings and f"dtype {str(dtype).removeprefix('torch.')} (this CPU has {'native bf16' if native_bf16_flags() else 'no'}" \
        in settings[-1], settings

    k2 = model.ext.k_ladder[-1] if plan.k != model.ext.k_ladder[-1] else model.ext.k_ladder[0]
    plan2 = model.plan(sent, k=k2, reserve=model.ext.reserve)
    before = _scrape(base)
    r = client.completions.create(model=MODEL, prompt=doc, max_tokens=1, extra_body={"mm_processor_kwargs": {"k": k2}})
    moved = {name: value - before.get(name, 0) for name, value in _scrape(base).items()}
    seen = set(plan.chunks)
    assert r.usage.model_extra["extemb"]["k"] == k2 and moved["extemb_k_sum"] == k2
    assert moved["extemb_chunks_cached_total"] == sum(c in seen for c in plan2.chunks) > 0
    assert moved["extemb_chunks_encoded_total"] == sum(c not in seen for c in plan2.chunks)


def test_bad_input_catalogue_gets_4xx_and_the_server_keeps_serving(server, document, smollm2):
    """Every input of the catalogue gets its expected status and a message that says what is
    wrong, and a good request right after it completes."""
    from extemb_vllm.bench import catalogue
    from extemb_vllm.model.config import max_context_tokens

    model, _ = smollm2
    cases = catalogue.catalogue(document, max_context_tokens(model.ext))
    answers = catalogue.run(server[0], MODEL, cases, "vllm-serve", api_key=KEY)
    assert len(answers) == sum("vllm-serve" in c.servers for c in cases)
    wrong = [a for a in answers if not (a.ok and a.next_request_ok)]
    assert not wrong, "\n".join(f"{a.name}: expected {a.expected}, got {a.status} {a.message!r}" for a in wrong)


def test_seeded_over_long_requests_are_served_and_reproducible(server, client, document):
    """vLLM 0.32.0's CPU engine stops on a seeded prompt pre-filled in more than one step; an ExtEmb model
    on CPU pre-fills each prompt in one (chunked prefill off, the plug-in's config hook): a sampled,
    seeded over-long request is answered, the same again with the same seed, and the server serves on."""
    base, _ = server
    ask = dict(model=MODEL, prompt=document, max_tokens=8, temperature=1.0, seed=7)
    first, again = (client.completions.create(**ask) for _ in range(2))
    assert first.usage.model_extra["extemb"]["prompt_positions"] > 2048  # more than vLLM's CPU default step of 2048 tokens
    assert first.choices[0].text == again.choices[0].text
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens >= 1


def test_api_key_is_required(server):
    from extemb_vllm.bench import catalogue

    answers = catalogue.auth_answers(server[0], MODEL, KEY)
    assert all(a.ok for a in answers), answers


def test_a_client_that_hangs_up_has_its_request_aborted(server, client, document):
    """A stream dropped after two chunks: the server aborts it (no request left running, its KV
    blocks freed) long before its 2000 tokens could have been generated."""

    base, _ = server
    stream = client.completions.create(model=MODEL, prompt=document, max_tokens=2000, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 1:
            break
    assert metric(base, "vllm:num_requests_running") == 1
    stream.close()
    t0 = time.time()
    assert wait_until(lambda: metric(base, "vllm:num_requests_running") == 0, timeout_s=30)
    assert wait_until(lambda: metric(base, "vllm:kv_cache_usage_perc") == 0, timeout_s=10)
    assert time.time() - t0 < 30  # 2000 tokens would take minutes on CPU
    after = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)  # and the server serves on
    assert after.usage.completion_tokens >= 1 and after.choices[0].finish_reason in ("length", "stop")


def test_readme_first_command_serves_and_answers(smollm2_checkpoint, heldout_texts):
    """`make demo`'s last step: serve the default (and plain vLLM on the same base), send an
    over-long document to both, stop (DEMO_EXIT=1)."""
    env = dict(os.environ, DEMO_EXIT="1", PORT=str(free_port()), PLAIN_PORT=str(free_port()), HF_HUB_OFFLINE="1")
    r = subprocess.run(["bash", "scripts/serve_demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "accepts up to 91,136 tokens" in r.stdout and "plain vLLM, same base (8,192 positions): refused, 400" in r.stdout
    assert re.search(r"[0-9,]+ tokens sent; the engine read [0-9,]+ positions", r.stdout), r.stdout
    assert "--- chat, streamed" in r.stdout and "ExtEmb CPU settings: dtype" in r.stdout
