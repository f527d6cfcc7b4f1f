"""The Ray ingress's request translation without a Ray runtime (fast): vLLM's request models
validate, SamplingParams made as `vllm serve` makes them cross to the LLM replica intact,
and the answer's logprobs take OpenAI's shapes."""

import pytest

from extemb_vllm.serving import wire
from extemb_vllm.serving.llm_service import _sampling_params
from extemb_vllm.serving.openai_ingress import HTTPError, _logprobs_json, _sampling_bytes, _validated


def _through_the_wire(body, chat=False):
    req = _validated(body, chat)
    payload = wire.encode(wire.GenerateRequest([5, 6], sampling=_sampling_bytes(req, chat, 256, {})))
    return _sampling_params(wire.decode(payload, wire.GenerateRequest))


def test_every_sampling_option_reaches_the_replica():
    sp = _through_the_wire({"model": "m", "prompt": "x", "max_tokens": 7, "n": 3, "stop": ["\n", "END"],
                            "stop_token_ids": [2], "logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": 0.25,
                            "repetition_penalty": 1.1, "top_k": 5, "min_tokens": 2, "seed": 9, "temperature": 0.7,
                            "top_p": 0.9, "ignore_eos": True, "logit_bias": {"5": 1.0}})
    assert (sp.max_tokens, sp.n, sp.stop, sp.logprobs, sp.top_k, sp.min_tokens, sp.seed) == (7, 3, ["\n", "END"], 2, 5, 2, 9)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, 0.25, 1.1)
    assert 2 in sp.stop_token_ids and sp.ignore_eos and sp.temperature == pytest.approx(0.7)
    assert sp.logit_bias == {5: 1.0}
    chat = _through_the_wire({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3}, chat=True)
    assert chat.max_tokens == 4 and chat.logprobs == 3
    unset = _through_the_wire({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert unset.max_tokens == 256  # the positions the window keeps for generation


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "temperature": "hot"}, "temperature: Input should be a valid number"),
    ({"prompt": "x", "echo": True}, r"\['echo'\] not served by the Ray app"),
    ({"prompt": "x", "suffix": "tail"}, r"\['suffix'\] not served"),
])
def test_requests_vllm_refuses_are_refused_by_name(body, message):
    with pytest.raises(HTTPError, match=message) as e:
        _validated({"model": "m", **body}, chat=False)
    assert e.value.status == 400


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"presence_penalty": 9}, "presence_penalty"),
    ({"n": 0}, "n must be at least 1"),
])
def test_sampling_values_out_of_range_are_400(body, message):
    with pytest.raises(HTTPError, match=message):
        _through_the_wire({"model": "m", "prompt": "x", **body})


def test_malformed_sampling_bytes_are_the_requests_fault():
    req = wire.GenerateRequest([5, 6], sampling=b"\x93\x01\x02")
    with pytest.raises(wire.WireError, match="malformed sampling parameters"):
        _sampling_params(req)


def test_logprobs_in_openai_shapes():
    steps = [[wire.TokenLogprob(5, -0.1, "a"), wire.TokenLogprob(6, -2.0, "b")],
             [wire.TokenLogprob(7, -0.5, "cd"), wire.TokenLogprob(8, -0.2, "e")]]
    completion = _logprobs_json(steps, chat=False, top=1)
    assert completion == {"tokens": ["a", "cd"], "token_logprobs": [-0.1, -0.5],
                          "top_logprobs": [{"a": -0.1, "b": -2.0}, {"cd": -0.5, "e": -0.2}], "text_offset": [0, 1]}
    chat = _logprobs_json(steps, chat=True, top=1)["content"]
    assert [c["token"] for c in chat] == ["a", "cd"] and chat[1]["top_logprobs"][0]["token"] == "e"
    assert chat[0]["bytes"] == [97] and _logprobs_json(None, chat=True, top=2) is None


def test_only_the_clients_faults_are_400s():
    """The router's errors: what the layout checks or a worker refused as the client's fault is a
    400; an internal bug's ValueError is the server's 503, never passed off as the client's."""
    from extemb_vllm.model import ContextError
    from extemb_vllm.serving.openai_ingress import _failure

    rejected = wire.ErrorReply("bad_request", "context embeds contain NaN")
    internal = wire.ErrorReply("internal", "worker state lost")
    with pytest.raises(wire.RequestRejected) as bad:
        wire.decode_reply(wire.encode(rejected), wire.GenerateResult)
    with pytest.raises(RuntimeError) as server_side:
        wire.decode_reply(wire.encode(internal), wire.GenerateResult)
    for e, status in ((ContextError("k=3 is not served"), 400), (wire.WireError("malformed"), 400),
                      (bad.value, 400), (ValueError("a bug's unpacking error"), 503), (server_side.value, 503)):
        assert _failure(e).status == status, e
