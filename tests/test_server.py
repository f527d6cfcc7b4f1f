"""A real `vllm serve --model extemb-llama2` on loopback, driven by the openai client (slow)."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow
MODEL = "extemb-llama2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_checkpoint, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", "--model", MODEL, "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--dtype", "float32", "--trust-request-mm-kwargs"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(2)
    yield base, log
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def document(heldout_texts, smollm2):
    _, tok = smollm2
    ids = tok((heldout_texts / "troilus_and_cressida.txt").read_text()).input_ids
    return tok.decode(ids[2000:6500])  # ~4.5K tokens: past the 4096-token window


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    from extemb_vllm.model.checkpoint import load_model

    return load_model(smollm2_checkpoint)


def _metric(base, name) -> float:
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def test_models_advertise_the_extended_length(client, smollm2):
    model, _ = smollm2
    from extemb_vllm.model.config import max_context_tokens

    (card,) = client.models.list().data
    assert card.id == MODEL and card.max_model_len == max_context_tokens(model.ext) > model.ext.window


def test_over_long_completion_streaming_and_not(client, document, smollm2):
    model, tok = smollm2
    n_tokens = len(tok(document).input_ids)
    assert n_tokens > model.ext.window
    r = client.completions.create(model=MODEL, prompt=document, max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == model.plan(n_tokens, reserve=model.ext.reserve).llm_length  # what the engine read
    chunks = list(client.completions.create(model=MODEL, prompt=document, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_long_chat_streaming_and_not(client, document):
    messages = [{"role": "user", "content": document + "\n\nWho speaks first in this passage?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_repeated_document_is_served_from_cache(client, server, document):
    base, _ = server
    doc = document + " And so it ends."  # new content: its chunks are not cached yet
    client.completions.create(model=MODEL, prompt=doc, max_tokens=1)
    hits = _metric(base, "vllm:prefix_cache_hits_total")
    client.completions.create(model=MODEL, prompt=doc, max_tokens=1)
    # compact slots and raw tail of the repeat come from the prefix cache, keyed on chunk content
    assert _metric(base, "vllm:prefix_cache_hits_total") - hits > 1000


@pytest.mark.parametrize("body,message", [
    ({"prompt": ""}, "empty|at least one token|Empty"),
    ({"prompt": "word " * 120_000}, "maximum context length"),
    ({"mm_processor_kwargs": {"k": 0}}, "k must be >= 1"),
    ({"mm_processor_kwargs": {"k": -4}}, "k must be >= 1"),
    ({"mm_processor_kwargs": {"k": 2.5}}, "k must be an integer"),
    ({"mm_processor_kwargs": {"k": 12}}, "not served by this model"),
    ({"mm_processor_kwargs": {"k": 2}}, "does not fit"),  # with a document too long for k=2, below
    ({"mm_processor_kwargs": {"raw_tail": -1}}, "raw_tail must be"),
])
def test_bad_input_is_a_400_and_the_server_keeps_serving(client, document, body, message):
    body = {"prompt": document, **body}
    prompt = body.pop("prompt")
    if body.get("mm_processor_kwargs", {}).get("k") == 2:
        prompt = document * 3  # ~13.5K tokens: k=2 gives ~6.2K slots, more than the window
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body=body)
    assert re.search(message, str(e.value)), str(e.value)
    ok = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=2)
    assert ok.choices[0].text is not None


def test_readme_first_command_serves_and_answers(smollm2_checkpoint, heldout_texts):
    """`make demo`'s last step: serve the default, send an over-long document, stop (DEMO_EXIT=1)."""
    env = dict(os.environ, DEMO_EXIT="1", PORT=str(_free_port()), HF_HUB_OFFLINE="1")
    r = subprocess.run(["bash", "scripts/serve_demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "accepts up to 91136 tokens" in r.stdout
    assert "the engine read" in r.stdout and "--- chat, streamed ---" in r.stdout
