"""The catalogue of bad inputs, each with the answer a server must give, run over HTTP against
`vllm serve` and the Ray app alike (the same bodies: layout options ride in
`mm_processor_kwargs`, which both accept). After every bad input a good request must still
complete: a bad input costs only its own request.

Used by the tests (tests/test_server.py, tests/test_ray_app.py) and by `extemb bench load`,
which writes every input tried and the answer it got into the report.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class BadInput:
    name: str
    expect_status: int
    expect_message: str  # regex the error message must match ("" for a success)
    body: dict | None = None  # JSON body; "model" is filled in
    raw: bytes | None = None  # or raw bytes, sent as application/json
    path: str = "/v1/completions"
    headers: dict = field(default_factory=dict)
    servers: tuple = ("vllm-serve", "ray-app")


def catalogue(long_text: str, max_model_len: int, k_not_served: int = 12) -> list[BadInput]:
    """long_text: a document longer than the window (so its old part is compressed)."""
    huge_ids = [100] * (max_model_len + 1000)
    kw = lambda **o: {"mm_processor_kwargs": o}  # noqa: E731
    return [
        BadInput("empty prompt", 400, "empty|non-empty|at least one", {"prompt": ""}),
        BadInput("whitespace-only prompt", 400, "empty or whitespace|non-empty", {"prompt": " \n\t  "}),
        BadInput("context past the extended limit", 400, "maximum context length|exceed",
                 {"prompt": huge_ids}),
        BadInput("k = 0", 400, "k must be >= 1", {"prompt": long_text, **kw(k=0)}),
        BadInput("k negative", 400, "k must be >= 1", {"prompt": long_text, **kw(k=-4)}),
        BadInput("k not an integer", 400, "k must be an integer", {"prompt": long_text, **kw(k=2.5)}),
        BadInput("k outside the ladder", 400, "not served by this model", {"prompt": long_text, **kw(k=k_not_served)}),
        BadInput("k too small for the window", 400, "does not fit",  # 0.9 x the limit at k=4: slots >> window
                 {"prompt": [100] * (max_model_len * 9 // 10), **kw(k=4)}),
        BadInput("raw_tail negative", 400, "raw_tail must be", {"prompt": long_text, **kw(raw_tail=-1)}),
        BadInput("fill_window not a boolean", 400, "fill_window must be true or false",
                 {"prompt": long_text, **kw(fill_window="yes")}),
        # mm_processor_kwargs of the wrong JSON type, and each option of the wrong type or size
        BadInput("mm_processor_kwargs an array", 400, "mm_processor_kwargs must be a JSON object.*array",
                 {"prompt": long_text, "mm_processor_kwargs": [16]}),
        BadInput("mm_processor_kwargs a string", 400, "mm_processor_kwargs must be a JSON object.*string",
                 {"prompt": long_text, "mm_processor_kwargs": "k=16"}),
        BadInput("unknown option in mm_processor_kwargs", 400, "unknown key.*raw_tial",
                 {"prompt": long_text, **kw(raw_tial=64)}),
        BadInput("k a string", 400, "k must be an integer", {"prompt": long_text, **kw(k="16")}),
        BadInput("raw_tail a fraction", 400, "raw_tail must be a non-negative integer",
                 {"prompt": long_text, **kw(raw_tail=512.5)}),
        BadInput("reserve an array", 400, "reserve must be a non-negative integer",
                 {"prompt": long_text, **kw(reserve=[256])}),
        BadInput("fill_window a number", 400, "fill_window must be true or false",
                 {"prompt": long_text, **kw(fill_window=1)}),
        BadInput("append_stable a string", 400, "append_stable must be true or false",
                 {"prompt": long_text, **kw(append_stable="on")}),
        BadInput("two layout rules at once", 400, "fill_window and append_stable are two different",
                 {"prompt": long_text, **kw(append_stable=True, fill_window=True)}),
        BadInput("raw_tail larger than the window", 400, "raw_tail=.*does not fit the window",
                 {"prompt": long_text, **kw(raw_tail=max_model_len)}),
        BadInput("reserve the whole window", 400, "reserve=.*smaller than the window",
                 {"prompt": long_text, **kw(reserve=max_model_len)}),
        BadInput("unknown field", 400, "unknown field.*max_token", {"prompt": "Hello", "max_token": 5}),
        BadInput("max_tokens 0", 400, "max_tokens", {"prompt": "Hello", "max_tokens": 0}),
        BadInput("token id outside the vocabulary", 400, "vocab", {"prompt": [5, 10_000_000]}),
        BadInput("non-UTF-8 body", 400, "JSON|decode|utf|parsing the body",
                 raw=b'{"prompt": "caf\xe9", "max_tokens": 2}'),
        BadInput("raw control character in a JSON string", 400, "JSON|decode|control",
                 raw=b'{"prompt": "a\x01b", "max_tokens": 2}'),
        BadInput("escaped control characters (valid text: served)", 200, "",
                 {"prompt": "bell \u0007 nul \u0000 esc \u001b end", "max_tokens": 2}),
        BadInput("malformed JSON", 400, "JSON|decode|Expecting", raw=b'{"prompt": "Hello", '),
        BadInput("body is not an object", 400, "object|dict|valid", raw=b'[1, 2, 3]'),
        BadInput("huge JSON body (16 MB)", 400, "maximum context length|exceed|too large",
                 {"prompt": [100] * 4_000_000}),
        BadInput("unknown model", 404, "does not exist|unknown model", {"prompt": "Hello", "model": "no-such-model"}),
        BadInput("chat without messages", 400, "messages|at least one message", {"messages": []},
                 path="/v1/chat/completions"),
        BadInput("unknown document id", 404, "unknown document id", {"prompt": "Hello", "context_id": "doc-nope"},
                 servers=("ray-app",)),
    ]


@dataclass
class Answer:
    name: str
    expected: str
    status: int
    message: str
    ok: bool  # the expected status and message
    next_request_ok: bool  # a good request right after it completed


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", ""))[:500]
    return "" if r.status_code == 200 else json.dumps(body)[:500]


def run(base_url: str, model: str, cases: list[BadInput], server: str, api_key: str | None = None,
        timeout_s: float = 300) -> list[Answer]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    good = {"model": model, "prompt": "The quick brown fox", "max_tokens": 2}
    answers = []
    with httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers) as http:
        for case in cases:
            if server not in case.servers:
                continue
            if case.raw is not None:
                r = http.post(case.path, content=case.raw, headers={"content-type": "application/json"})
            else:
                r = http.post(case.path, json={"model": model, "max_tokens": 2, **case.body})
            msg = _message(r)
            ok = r.status_code == case.expect_status and bool(re.search(case.expect_message, msg, re.I))
            after = http.post("/v1/completions", json=good)
            answers.append(Answer(case.name, f"{case.expect_status} /{case.expect_message}/", r.status_code, msg, ok,
                                  after.status_code == 200))
    return answers


def auth_answers(base_url: str, model: str, api_key: str) -> list[Answer]:
    """With a key configured: no key and a wrong key are 401, the right key is served."""
    out = []
    for name, headers, want in [("no API key", {}, 401), ("wrong API key", {"Authorization": "Bearer wrong"}, 401),
                                ("right API key", {"Authorization": f"Bearer {api_key}"}, 200)]:
        r = httpx.post(base_url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2},
                       headers=headers, timeout=120)
        out.append(Answer(name, str(want), r.status_code, _message(r), r.status_code == want, True))
    return out


def answers_json(answers: list[Answer]) -> list[dict]:
    return [asdict(a) for a in answers]

