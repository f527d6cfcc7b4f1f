"""The reference model: planning (adaptive k), input layout, scoring, generation, errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from extemb_vllm.model import ContextError, ExtEmbConfig, plan_compression

# the fixed-raw-tail rule (exactly raw_tail raw); the window-filling rule is tested on FILL, the
# append-stable rule (the default) on STABLE
CFG = ExtEmbConfig(embedder_layers=2, chunk_size=16, k_ladder=(2, 4, 8), window=64, raw_tail=16, reserve=4,
                   fill_window=False, append_stable=False)
FILL = CFG.replace(fill_window=True)


def test_input_that_fits_stays_raw():
    plan = plan_compression(64, CFG)
    assert plan.k is None and plan.n_compressed == 0 and plan.llm_length == 64


def test_adaptive_k_is_the_smallest_that_fits():
    # 100 tokens: 84 compressed in chunks 16x5 + 4. k=2: 8*5+2=42 slots + 16 raw = 58 <= 64 -> k=2
    assert plan_compression(100, CFG).k == 2
    # 200 tokens: 184 compressed = 16x11 + 8. k=2: 92+16 > 64; k=4: 44+2+16 = 62 <= 64 -> k=4
    plan = plan_compression(200, CFG)
    assert (plan.k, plan.n_slots, plan.n_raw, plan.llm_length) == (4, 46, 16, 62)
    # reserving room for generated tokens pushes k up
    assert plan_compression(200, CFG, reserve=8).k == 8


def test_ladder_may_hold_larger_k():
    cfg = CFG.replace(k_ladder=(2, 4, 8, 64))
    assert plan_compression(500, cfg).k == 64


def test_forced_k_compresses_even_when_it_fits():
    plan = plan_compression(40, CFG, k=4)
    assert (plan.n_compressed, plan.n_slots, plan.n_raw) == (24, 6, 16)


def test_fill_window_keeps_as_many_tokens_raw_as_fit():
    # 200 tokens, k=4 as with the fixed rule; then the raw tail grows from 16 while it fits:
    # 181 compressed = 16x11 + 5 -> 44 + 2 = 46 slots + 19 raw = 65 > 64; 182 -> 46 + 18 = 64
    plan = plan_compression(200, FILL)
    assert (plan.k, plan.n_raw, plan.n_slots, plan.llm_length) == (4, 18, 46, 64)
    assert plan.chunks[-1] == (176, 182)
    # an input that fits stays raw even with a forced k; the fixed rule would compress it
    assert plan_compression(40, FILL, k=4).k is None
    # per call, the config's rule can be switched either way
    assert plan_compression(200, FILL, fill_window=False).n_raw == 16
    assert plan_compression(200, CFG, fill_window=True) == plan


@pytest.mark.parametrize("n, k, reserve", [(n, k, r) for n in (61, 65, 100, 200, 333, 480) for k in (None, 4, 8)
                                            for r in (0, 4, 9)])
def test_fill_window_raw_tail_is_the_longest_that_fits(n, k, reserve):
    from extemb_vllm.model import compact_slots

    try:
        plan = plan_compression(n, FILL, k=k, reserve=reserve)
    except ContextError:
        with pytest.raises(ContextError):
            plan_compression(n, CFG, k=k, reserve=reserve)  # fill never refuses what the fixed rule takes
        return
    fixed = plan_compression(n, CFG, k=k, reserve=reserve) if n > 64 - reserve else None
    if fixed is None or fixed.k is None:
        assert plan.k is None and plan.n_raw == n
        return
    assert plan.k == fixed.k and plan.n_raw >= fixed.n_raw and plan.llm_length <= 64 - reserve
    fits = [r for r in range(16, n) if compact_slots(n - r, plan.k, 16) + r <= 64 - reserve]
    assert plan.n_raw == max(fits)  # brute force: no longer raw tail fits
    assert plan.n_slots == compact_slots(plan.n_compressed, plan.k, 16)


def test_input_that_cannot_fit_names_the_numbers():
    with pytest.raises(ContextError) as e:
        plan_compression(1000, CFG)  # 984 compressed = 16x61 + 8; at k=8: 61*2 + 1 = 123 slots + 16 raw
    msg = str(e.value)
    assert "1000 tokens" in msg and "k=8" in msg and "window 64" in msg and "123 compact slots" in msg and "= 139 >" in msg
    with pytest.raises(ContextError, match="k=2"):
        plan_compression(200, CFG, k=2)


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_bad_k_is_a_clear_error(bad):
    with pytest.raises(ContextError, match="k must be"):
        plan_compression(200, CFG, k=bad)


def test_empty_input_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(ContextError, match="empty"):
        plan_compression(0, CFG)
    with pytest.raises(ContextError, match="empty"):
        model.generate(torch.tensor([], dtype=torch.long))


def test_window_beyond_base_positions_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ContextError, match="512 positions"):
        model.plan(100, window=1024)


def test_llm_input_is_compact_then_raw(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (200,))
    plan = model.plan(200)
    embeds = model.build_inputs(ids, plan)
    assert embeds.shape == (1, plan.llm_length, model.llm.config.hidden_size)
    torch.testing.assert_close(embeds[0, : plan.n_slots], model.compact_embeddings(ids[: plan.n_compressed], plan.k))
    torch.testing.assert_close(embeds[0, plan.n_slots :], model.embed_tokens(ids[plan.n_compressed :]))


def test_score_matches_a_manual_forward(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (120,))
    lp, plan = model.score(ids, 10, k=4)
    x = torch.cat([model.compact_embeddings(ids[: plan.n_compressed], 4), model.embed_tokens(ids[plan.n_compressed :])])
    pos = torch.arange(x.shape[0])[None]  # consecutive position ids over compact + raw
    logits = model.llm(inputs_embeds=x[None], position_ids=pos).logits[0]
    expected = logits[-11:-1].log_softmax(-1).gather(-1, ids[-10:, None]).squeeze(-1)
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)


def test_uncompressed_score_is_the_plain_llama(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (50,))
    lp, plan = model.score(ids, 20)
    assert plan.k is None
    logits = model.llm(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(lp, logits[-21:-1].log_softmax(-1).gather(-1, ids[-20:, None]).squeeze(-1),
                               atol=1e-5, rtol=1e-5)


def test_greedy_generation_follows_the_scores(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (150,))
    new, plan = model.generate(ids, max_new_tokens=5)
    assert plan.k is not None and plan.llm_length + 5 <= model.ext.window
    assert new.shape == (5,)
    # the first greedy token is the argmax of the next-token distribution over the same input
    logits = model.forward(model.build_inputs(ids, plan))[0, -1]
    assert new[0].item() == logits.argmax().item()


def test_mismatched_context_changes_the_scores(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (120,))
    other = torch.randint(3, 300, (120,))
    right, _ = model.score(ids, 16, k=4, raw_tail=16)
    wrong, _ = model.score(ids, 16, k=4, raw_tail=16, compact_ids=other)
    assert not torch.allclose(right, wrong)


# --- the append-stable rule (online mode: a conversation that grows) ---
STABLE = FILL.replace(append_stable=True)


def _layout(plan):
    """What the LLM's positions hold: (k, compressed chunks), and where raw token i sits."""
    return (plan.k, tuple(plan.chunks)), plan.n_slots - plan.n_compressed


@pytest.mark.parametrize("reserve", [0, 4, 9])
def test_append_stable_plan_prefix_is_unchanged_by_appending(reserve):
    """Over every length: the compressed count only rises within a k, and whenever the layout of
    n + 1 tokens keeps the same compressed chunks, every slot and raw token of n sits where it
    sat. Changes happen only when the window overflows (or k's band changes)."""
    cfg = STABLE
    budget = cfg.window - reserve
    plans = {n: plan_compression(n, cfg, reserve=reserve) for n in range(1, 200)}
    stable_lengths = [n for n, p in plans.items() if p.k is None or p.n_compressed % cfg.chunk_size == 0]
    assert stable_lengths[-1] > 150  # the rule reaches far into the extended length (then window filling)
    changes = 0
    for n in range(1, stable_lengths[-1]):
        a, b = plans[n], plans[n + 1]
        assert a.llm_length <= budget and b.llm_length <= budget
        if b.n_compressed % cfg.chunk_size:  # beyond the stable rule's reach
            break
        if (a.k, a.n_compressed) == (b.k, b.n_compressed):
            assert _layout(a) == _layout(b) and b.llm_length == a.llm_length + 1
            continue
        changes += 1
        assert a.llm_length == budget or a.k != b.k  # only a full window moves the boundary
        if a.k == b.k:
            assert b.n_compressed > a.n_compressed and b.chunks[: len(a.chunks)] == a.chunks
    fill_changes = sum(plan_compression(n, FILL, reserve=reserve).n_compressed
                       != plan_compression(n + 1, FILL, reserve=reserve).n_compressed for n in range(1, 150))
    assert 0 < changes < fill_changes / 3  # the window-filling rule moves its boundary with almost every token


def test_append_stable_compresses_whole_chunks_with_k_by_band():
    # 90 tokens, window 64, k=2 (8 slots a chunk): as few whole chunks as fit: 3 -> 90 - 3*8 = 66 > 64;
    # 4 -> 32 slots + 26 raw = 58
    plan = plan_compression(90, STABLE)
    assert (plan.k, plan.n_compressed, plan.n_slots, plan.n_raw) == (2, 64, 32, 26)
    # k=2's band ends at 95 (4 chunks' 32 slots + the worst raw part, 16 + 15 tokens = 63), so 100 is
    # read at k=4: 3 chunks -> 12 slots + 52 raw = 64
    plan = plan_compression(100, STABLE)
    assert (plan.k, plan.n_compressed, plan.n_slots, plan.n_raw) == (4, 48, 12, 52)
    # k rises with the band of total length, never back
    ks = [plan_compression(n, STABLE).k for n in range(65, 400)]
    assert ks == sorted(ks) and set(ks) == {2, 4, 8}
    # beyond its reach (the last chunk of the extended length) the window-filling plan serves
    assert plan_compression(350, STABLE) == plan_compression(350, FILL)
    # a request may choose either rule; naming both is refused
    from extemb_vllm.model.config import check_request_options

    assert plan_compression(100, FILL, append_stable=True) == plan
    with pytest.raises(ContextError, match="give one of them"):
        check_request_options({"fill_window": True, "append_stable": True}, FILL)
    with pytest.raises(ContextError, match="append_stable must be true or false"):
        check_request_options({"append_stable": "yes"}, FILL)


@settings(max_examples=200, deadline=None)
@given(chunk=st.sampled_from([8, 16, 32, 512]), window=st.integers(64, 4096), raw_frac=st.floats(0.05, 0.5),
       ladder=st.sampled_from([(2, 4, 8), (4, 8, 16, 32), (3, 5)]), windows=st.floats(0.01, 25),
       extra=st.integers(1, 5000))
def test_append_stable_property_over_configs(chunk, window, raw_frac, ladder, windows, extra):
    """For any config and any two lengths n < m of one growing input: k never falls, the
    compressed whole chunks of n stay compressed (a prefix of m's) while k holds, and when m
    compresses nothing new, n's layout is m's prefix position for position."""
    cfg = ExtEmbConfig(embedder_layers=1, chunk_size=chunk, k_ladder=ladder, window=window,
                       raw_tail=max(1, int(window * raw_frac)), reserve=0, append_stable=True)
    n = max(1, int(window * windows))
    try:
        a, b = plan_compression(n, cfg), plan_compression(n + extra, cfg)
    except ContextError:  # past the extended length
        return
    assert a.llm_length <= window and b.llm_length <= window
    stable = [p for p in (a, b) if p.k is None or p.n_compressed % chunk == 0]
    if len(stable) < 2:  # the last band: window filling serves (tested above)
        return
    if a.k is not None and b.k is not None:
        assert b.k >= a.k
        if b.k == a.k:
            assert b.n_compressed >= a.n_compressed and b.chunks[: len(a.chunks)] == a.chunks
            if b.n_compressed == a.n_compressed:
                assert _layout(a) == _layout(b)
