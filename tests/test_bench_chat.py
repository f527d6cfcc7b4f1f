"""`extemb bench chat`'s bookkeeping, without a server: conversations, counters, summary, table."""

import io
from types import SimpleNamespace as NS

import pytest

from extemb_vllm.bench import chat, servers

TEXT = "".join(f"{i:05d} " for i in range(40_000))  # every stretch distinct, 240,000 characters


def test_workload_gives_each_rule_a_fresh_document_of_the_same_length():
    work = chat.workload(TEXT, doc_chars=30_000, follow_ups=3, step_chars=10_000, growth_turns=4)
    assert set(work["chats"]) == {(s, r) for s in chat.SCENARIOS for r in chat.RULES}
    fill, stable = work["chats"]["follow-ups", "fill"], work["chats"]["follow-ups", "stable"]
    assert len(fill) == 4 and fill[1:] == stable[1:] == list(chat.FOLLOW_UPS[:3])
    assert len(fill[0]) == len(stable[0]) == 30_000 + len(chat.FIRST_QUESTION)
    assert fill[0][:100] != stable[0][:100]
    grow_fill, grow_stable = work["chats"]["growing", "fill"], work["chats"]["growing", "stable"]
    assert [len(t) for t in grow_fill] == [len(t) for t in grow_stable] == [10_000 + len(chat.STEP_QUESTION)] * 4
    # each document is one stretch of the text (growing: its steps consecutive); no two overlap
    docs = [work["warm_up"].removesuffix(chat.STEP_QUESTION)]
    for (scenario, _), turns in work["chats"].items():
        docs.append(turns[0].removesuffix(chat.FIRST_QUESTION) if scenario == "follow-ups"
                    else "".join(t.removesuffix(chat.STEP_QUESTION) for t in turns))
    spans = sorted((TEXT.index(d), TEXT.index(d) + len(d)) for d in docs)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_workload_refuses_too_little_text():
    with pytest.raises(ValueError, match="240000 characters, 250000 wanted"):
        chat.workload(TEXT, doc_chars=90_000, follow_ups=1, step_chars=10_000, growth_turns=3)


class FakeClient:
    """An OpenAI-like client: streams a fixed answer and records the messages of each call."""

    def __init__(self, answers, positions):
        self.calls, self.answers, self.positions = [], list(answers), list(positions)
        self.chat = NS(completions=NS(create=self.create))

    def create(self, **kw):
        self.calls.append(kw)
        words, n = self.answers.pop(0), self.positions.pop(0)
        chunks = [NS(choices=[NS(delta=NS(content=""), finish_reason=None)], usage=None)]  # the role chunk
        chunks += [NS(choices=[NS(delta=NS(content=w), finish_reason=None)], usage=None) for w in words]
        # usage as the plug-in's middleware tells it: tokens sent, and the positions read in `extemb`
        chunks.append(NS(choices=[], usage=NS(prompt_tokens=3 * n, completion_tokens=len(words),
                                              model_extra={"extemb": {"prompt_positions": n}})))
        return iter(chunks)


def test_converse_grows_the_conversation_and_takes_per_turn_deltas():
    client = FakeClient([["Ann", "."], ["Rome"], ["a", " key"]], positions=[3000, 3010, 3020])
    counters = iter([  # cumulative: before and after each turn
        dict(prefix_cache_hits=0, prefix_cache_queries=0, chunks_encoded=0, chunks_reused=0),
        dict(prefix_cache_hits=16, prefix_cache_queries=3000, chunks_encoded=6, chunks_reused=0),
        dict(prefix_cache_hits=16, prefix_cache_queries=3000, chunks_encoded=6, chunks_reused=0),
        dict(prefix_cache_hits=2416, prefix_cache_queries=6010, chunks_encoded=6, chunks_reused=6),
        dict(prefix_cache_hits=2416, prefix_cache_queries=6010, chunks_encoded=6, chunks_reused=6),
        dict(prefix_cache_hits=5416, prefix_cache_queries=9030, chunks_encoded=7, chunks_reused=11),
    ])
    rows = chat.converse(client, "m", ["doc + q0", "q1", "q2"], chat.RULES["stable"], 16, lambda: next(counters))
    msgs = [c["messages"] for c in client.calls]
    assert msgs[0] == [{"role": "user", "content": "doc + q0"}]
    assert msgs[1] == msgs[0] + [{"role": "assistant", "content": "Ann."}, {"role": "user", "content": "q1"}]
    assert msgs[2] == msgs[1] + [{"role": "assistant", "content": "Rome"}, {"role": "user", "content": "q2"}]
    call = client.calls[0]
    assert call["extra_body"] == {"mm_processor_kwargs": {"append_stable": True}}
    assert call["stream"] and call["stream_options"] == {"include_usage": True} and call["temperature"] == 0
    assert [r["positions"] for r in rows] == [3000, 3010, 3020]
    assert [r["sent_tokens"] for r in rows] == [9000, 9030, 9060]
    assert [r["prefix_hits"] for r in rows] == [16, 2400, 3000]
    assert [r["prefix_queries"] for r in rows] == [3000, 3010, 3020]
    assert [r["chunks_encoded"] for r in rows] == [6, 0, 1]
    assert [r["chunks_reused"] for r in rows] == [0, 6, 5]
    assert rows[0]["reused_of_previous"] is None
    assert rows[1]["reused_of_previous"] == pytest.approx(2400 / 3000)
    assert rows[2]["reused_of_previous"] == pytest.approx(3000 / 3010)
    assert rows[1]["hit_share"] == pytest.approx(2400 / 3010)
    assert all(r["ttft_s"] is not None and r["ttft_s"] <= r["latency_s"] for r in rows)


def test_converse_refuses_usage_without_the_positions_read():
    client = FakeClient([["x"]], [10])
    client.create = lambda **kw: iter([NS(choices=[], usage=NS(prompt_tokens=10, completion_tokens=1,
                                                               model_extra={}))])
    client.chat = NS(completions=NS(create=client.create))
    zero = dict(prefix_cache_hits=0, prefix_cache_queries=0, chunks_encoded=0, chunks_reused=0)
    with pytest.raises(RuntimeError, match="no `extemb` extension"):
        chat.converse(client, "m", ["q"], chat.RULES["fill"], 16, lambda: zero)


def test_converse_refuses_a_stream_without_usage():
    client = FakeClient([["x"]], [10])
    client.create = lambda **kw: iter([NS(choices=[NS(delta=NS(content="x"), finish_reason="stop")], usage=None)])
    client.chat = NS(completions=NS(create=client.create))
    zero = dict(prefix_cache_hits=0, prefix_cache_queries=0, chunks_encoded=0, chunks_reused=0)
    with pytest.raises(RuntimeError, match="no usage"):
        chat.converse(client, "m", ["q"], chat.RULES["fill"], 16, lambda: zero)


def _row(turn, ttft, prompt, hits, queries, enc, reused, prev=None):
    return {"turn": turn, "positions": prompt, "ttft_s": ttft, "prefix_hits": hits, "prefix_queries": queries,
            "hit_share": hits / queries, "reused_of_previous": None if prev is None else hits / prev,
            "chunks_encoded": enc, "chunks_reused": reused}


ROWS = [_row(0, 2.0, 3000, 0, 3000, 8, 0), _row(1, 0.5, 3100, 2900, 3100, 1, 8, prev=3000),
        _row(2, 0.3, 3200, 3100, 3200, 1, 9, prev=3100)]


def test_summarise_ratios():
    m = chat.summarise(ROWS)
    assert m["first_ttft_s"] == 2.0
    assert m["follow_up_ttft_s"] == pytest.approx(0.4)
    assert m["follow_up_vs_first"] == pytest.approx(0.2)
    assert (m["prefix_hits"], m["prefix_queries"]) == (6000, 9300)
    assert m["hit_share"] == pytest.approx(6000 / 9300)
    assert m["reused_of_previous_mean"] == pytest.approx((2900 / 3000 + 3100 / 3100) / 2)
    assert (m["chunks_encoded"], m["chunks_reused"]) == (10, 17)
    assert m["distinct_chunks"] is None and m["unchanged"] is None  # rows made without a planner
    planned = [dict(r, unchanged=u, distinct_chunks=d) for r, u, d in zip(ROWS, (None, 2950, 3050), (8, 8, 9))]
    m = chat.summarise(planned)
    assert m["unchanged"] == 6000 and m["hits_of_unchanged"] == pytest.approx((2900 + 3100) / 6000)
    assert m["distinct_chunks"] == 9
    single = chat.summarise(ROWS[:1])
    assert single["follow_up_ttft_s"] is None and single["follow_up_vs_first"] is None


METRICS = """# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="extemb-llama2"} 1200.0
vllm:prefix_cache_hits_created{engine="0",model_name="extemb-llama2"} 1.7e+09
vllm:prefix_cache_queries_total{engine="0",model_name="extemb-llama2"} 3000.0
vllm:prefix_cache_queries{engine="1",model_name="other"} 999.0
# TYPE extemb_chunks_encoded_total counter
extemb_chunks_encoded_total 12.0
extemb_chunks_cached_total 3.0
"""


@pytest.mark.parametrize("text, hits, queries, encoded, cached", [
    (METRICS, 1200.0, 3000.0, 12, 3),
    ('vllm:prefix_cache_hits{engine="0"} 5.0\nvllm:prefix_cache_hits{engine="1"} 2.0\n'
     'vllm:prefix_cache_queries{engine="0"} 9.0\n', 7.0, 9.0, 0, 0),
])
def test_counters_read_from_metrics_with_and_without_total_suffix(monkeypatch, text, hits, queries, encoded, cached):
    monkeypatch.setattr(servers.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(text.encode()))
    read = chat.server_counters("http://x")
    assert read() == {"prefix_cache_hits": hits, "prefix_cache_queries": queries,
                      "chunks_encoded": encoded, "chunks_reused": cached}


def test_format_table_shows_the_numbers():
    res = {"model": "extemb-llama2", "machine": "test box", "server": "dtype bfloat16 (native bf16); tcmalloc preloaded",
           "settings": dict(doc_chars=60000, follow_ups=2, step_chars=24000, growth_turns=4, max_tokens=16),
           "conversations": [{"scenario": "follow-ups", "rule": "stable", "turns": ROWS,
                              "summary": chat.summarise(ROWS)}]}
    table = chat.format_table(res)
    turn1 = next(line for line in table.splitlines() if line.split()[:3] == ["follow-ups", "stable", "1"])
    assert turn1.split() == ["follow-ups", "stable", "1", "3100", "0.500", "2900", "3100", "93.5", "96.7", "-", "-",
                             "1", "8"]  # no planner in these rows: unchanged positions not counted
    summary = [line for line in table.splitlines() if line.startswith("follow-ups")][-1]
    assert summary.split() == ["follow-ups", "stable", "2.000", "0.400", "0.20", "6000", "9300", "64.5", "98.3",
                               "-", "10", "17", "-"]
    first = next(line for line in table.splitlines() if line.split()[:3] == ["follow-ups", "stable", "0"])
    assert first.split()[8] == "-"  # no previous turn
    assert "server: the README's command (dtype bfloat16 (native bf16); tcmalloc preloaded)" in table


def test_unchanged_positions_follow_the_layout_rule():
    """A turn appended to a conversation leaves its whole prefix in place under the append-stable
    rule; under window filling the slot/raw boundary moves and little stays."""
    from extemb_vllm.model import ExtEmbConfig, plan_request

    ext = ExtEmbConfig(embedder_layers=2, chunk_size=16, k_ladder=(2, 4, 8), window=64, raw_tail=16, reserve=4)
    ids = list(range(3, 203))
    for opts, at_least in (({"append_stable": True}, None), ({"append_stable": False}, 0)):
        a = chat.position_contents(plan_request([], ids[:150], opts, ext, None))
        b = chat.position_contents(plan_request([], ids[:153], opts, ext, None))
        same = chat.unchanged_positions(a, b)
        if at_least is None:
            assert same == len(a)  # everything the previous turn had
        else:
            assert same < len(a) // 2
    assert chat.unchanged_positions([1, 2, 3], [1, 2, 4, 5]) == 2 and chat.unchanged_positions([1], [1, 2]) == 1
