"""The spine: vLLM with the plug-in gives the reference model's greedy tokens and log-probs."""

import pytest
import torch

from .vllm_helpers import compare_with_reference, make_llm, shutdown

pytestmark = pytest.mark.engine  # a real vLLM engine, Ray runtime or server process (make test-fast skips)

# |logprob difference| bounds, fp32 on CPU (vLLM's paged-attention kernel vs torch SDPA).
# Observed: tiny model ~5e-7; SmolLM2 (30 layers, up to 2.7K positions) ~2.6e-4. For scale:
# a 1% change of one embedder matrix of the tiny model moves log-probs by ~1e-3, a wrong
# layout (positions, k, slots) by far more.
TOL = 2e-4
TOL_SMOLLM2 = 2e-3


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint):
    # blocks of 32 (the CPU backend's smallest): the 64-position window holds two, so prefix-cache
    # reuse is measurable
    llm = make_llm(tiny_checkpoint, max_model_len=64, max_num_batched_tokens=512, block_size=32)
    yield llm
    shutdown(llm)


def _ids(n, seed):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("k", [None, 2, 4, 8])
def test_tiny_single_request(tiny_llm, tiny, k):
    model, _ = tiny
    n = 120 if k in (None, 8) else 60  # k=2 fits only shorter contexts in the 64-token window
    worst = compare_with_reference(tiny_llm, model, [(_ids(n, 1), 10, {"k": k, "reserve": 4})])
    assert worst < TOL


def test_tiny_batch_mix(tiny_llm, tiny):
    """Long and short prompts, several k and raw tails, in one batch."""
    model, _ = tiny
    cases = [
        (_ids(200, 2), 10, {"reserve": 4}),              # adaptive k (8)
        (_ids(30, 3), 30, {}),                            # short: a plain prompt, nothing compressed
        (_ids(90, 4), 5, {"k": 4, "raw_tail": 8, "reserve": 4}),
        (_ids(50, 5), 20, {"k": 2, "raw_tail": 20, "reserve": 4}),
        (_ids(45, 6), 40, {"reserve": 4}),                # context given but it fits: stays raw
        (_ids(150, 7), 150, {}),                          # plain prompt over the window: compressed
        (_ids(100, 8), 100, {"k": 4, "raw_tail": 12}),    # plain prompt, k and raw tail per request
        (_ids(1, 10), 1, {"k": 4}),                       # one token and a k: nothing to compress
        (_ids(90, 11), 5, {"k": 4, "raw_tail": 8, "reserve": 4, "fill_window": False}),  # exactly 8 raw
        (_ids(40, 12), 5, {"k": 4, "fill_window": False}),  # fits, but the fixed rule compresses it
        (_ids(200, 13), 10, {"reserve": 4, "append_stable": True}),  # whole chunks, k by band
        (_ids(130, 14), 130, {"append_stable": True}),    # plain prompt, the append-stable rule
    ]
    assert compare_with_reference(tiny_llm, model, cases) < TOL


def test_tiny_embedder_groups_give_the_same_outputs(tiny_llm, tiny, monkeypatch):
    """Chunks of a step go through the embedder in bounded groups (memory flat in C); the
    grouping must not change a single output. 32 tokens per group: 2 chunks of 16."""
    from extemb_vllm.vllm_plugin import model as plugin_model

    model, _ = tiny
    monkeypatch.setattr(plugin_model, "EMBEDDER_BATCH_TOKENS", 32)
    cases = [(_ids(300, 21), 10, {"k": 8, "reserve": 4}), (_ids(150, 22), 150, {"k": 4, "reserve": 4})]
    assert compare_with_reference(tiny_llm, model, cases) < TOL


def test_tiny_precomputed_compact_embeddings(tiny_llm, tiny):
    """Compact embeddings made outside the engine (as the Ray workers do) give the same output."""
    from vllm import SamplingParams

    model, _ = tiny
    ids = torch.tensor(_ids(200, 9))
    plan = model.plan(200, k=8, reserve=4)
    compact = model.compact_embeddings(ids[: plan.n_compressed], 8)
    sp = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
    req = {"prompt_token_ids": ids[plan.n_compressed :].tolist(),
           "multi_modal_data": {"context": {"embeds": compact, "reserve": 4}}}
    from_embeds, from_ids = tiny_llm.generate(
        [req, {"prompt_token_ids": ids.tolist(), "mm_processor_kwargs": {"k": 8, "reserve": 4}}], sp, use_tqdm=False)
    assert from_embeds.outputs[0].token_ids == from_ids.outputs[0].token_ids
    a = [next(iter(d.values())).logprob for d in from_embeds.outputs[0].logprobs]
    b = [next(iter(d.values())).logprob for d in from_ids.outputs[0].logprobs]
    assert max(abs(x - y) for x, y in zip(a, b)) < TOL


@pytest.mark.parametrize("embeds,message", [
    (torch.full((6, 128), float("nan")), "NaN or infinite"),
    (torch.full((6, 128), float("inf")), "NaN or infinite"),
    (torch.zeros(6, 64), r"shape \(n >= 1, 128\)"),
    (torch.zeros(1, 6, 128), r"shape \(n >= 1, 128\)"),
    (torch.zeros(0, 128), r"shape \(n >= 1, 128\)"),
    (torch.zeros(6, 128, dtype=torch.int32), "must be float32"),
    ([[0.0] * 128] * 6, "must be a torch.Tensor"),
    (torch.zeros(70, 128), "> window 64"),
])
def test_tiny_malformed_embeddings_are_refused(tiny_llm, embeds, message):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(Exception, match=message):
        tiny_llm.generate({"prompt_token_ids": [5, 6, 7], "multi_modal_data": {"context": {"embeds": embeds}}}, sp,
                          use_tqdm=False)
    ok = tiny_llm.generate({"prompt_token_ids": [5, 6, 7]}, sp, use_tqdm=False)  # the engine keeps serving
    assert len(ok[0].outputs[0].token_ids) == 2


def test_tiny_context_as_text_equals_context_as_token_ids(tiny_llm, tiny):
    from vllm import SamplingParams

    _, tok = tiny
    text = "it was the age of wisdom, it was the age of foolishness, " * 6
    ids = tok(text, add_special_tokens=False).input_ids
    prompt = tok(" it was", add_special_tokens=False).input_ids
    sp = SamplingParams(max_tokens=3, temperature=0, logprobs=0)
    a, b = tiny_llm.generate([
        {"prompt_token_ids": prompt, "multi_modal_data": {"context": text}},
        {"prompt_token_ids": prompt, "multi_modal_data": {"context": {"token_ids": ids}}},
    ], sp, use_tqdm=False)
    assert len(ids) + len(prompt) > 64 - 4 and a.prompt_token_ids == b.prompt_token_ids  # compressed, same layout
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize("context,message", [
    ({"text": "a", "token_ids": [1]}, "exactly one of"),
    ({"txt": "a"}, "unknown keys"),
    ({"token_ids": [1, 2, 99999]}, r"must lie in \[0, 320\)"),
    ({"token_ids": []}, "empty context"),
    ({"token_ids": [1, 2.5]}, "flat list of integers"),
    ({"token_ids": [[1, 2]]}, "flat list of integers"),
    ({"text": "a b c", "k": 0}, "k must be >= 1"),
    ({"text": "a b c", "k": 3}, r"k=3 is not served by this model; choose one of \[2, 4, 8\]"),
    (42, "a context is a string or a dict"),
])
def test_tiny_bad_context_is_refused(tiny_llm, context, message):
    from vllm import SamplingParams

    with pytest.raises(Exception, match=message):
        tiny_llm.generate({"prompt_token_ids": [5, 6], "multi_modal_data": {"context": context}},
                          SamplingParams(max_tokens=1), use_tqdm=False)


def test_tiny_growing_input_reuses_the_prefix_cache_with_the_append_stable_rule(tiny_llm, tiny):
    """A request, then the same tokens with a few appended (a chat turn): under the append-stable
    rule vLLM's prefix cache serves every full block of the first request's positions (slots
    included: same chunks, same k, same hashes); under the window-filling rule the slot/raw
    boundary moves, here inside the first block, and the cache serves nothing."""
    from vllm import SamplingParams

    model, _ = tiny
    ids = _ids(260, 31)
    block = tiny_llm.llm_engine.vllm_config.cache_config.block_size
    # a length whose stable layout keeps its compressed chunks when 3 tokens are appended
    def first_change(a, b):  # the first LLM position whose content differs between two layouts
        return min(a.n_slots, b.n_slots) if a.n_compressed != b.n_compressed or a.k != b.k else a.llm_length

    def fill(n):
        return model.plan(n, reserve=4, fill_window=True)

    n = next(n for n in range(120, 250) if (p := model.plan(n, reserve=4, append_stable=True)).k is not None
             and model.plan(n + 3, reserve=4, append_stable=True).n_compressed == p.n_compressed
             and first_change(fill(n), fill(n + 3)) < block)
    sp = SamplingParams(max_tokens=1, temperature=0)
    cached = {}
    for stable in (True, False):
        offset = 0 if stable else 1  # other tokens per rule, so one rule's cache cannot serve the other
        seq = [t + offset for t in ids]
        opts = {"mm_processor_kwargs": {"append_stable": stable, "reserve": 4}}
        first = tiny_llm.generate([{"prompt_token_ids": seq[:n], **opts}], sp, use_tqdm=False)[0]
        second = tiny_llm.generate([{"prompt_token_ids": seq[: n + 3], **opts}], sp, use_tqdm=False)[0]
        cached[stable] = (second.num_cached_tokens, len(first.prompt_token_ids))
    hits, positions = cached[True]
    assert hits == (positions // block) * block >= block
    assert cached[False][0] == 0


def test_tiny_a_chunk_encoded_once_serves_every_k(tiny_llm, tiny):
    """The same context at k=4, then at k=8 (a conversation that grew into the next band): the
    engine's chunk cache serves the second from the first's full-resolution outputs, and the
    answers still equal the reference's. Counted by the plug-in's series (the engine runs in this
    process: prometheus_client's default registry holds them)."""
    from prometheus_client import REGISTRY

    def counts():
        return [REGISTRY.get_sample_value(f"extemb_chunks_{what}_total") or 0 for what in ("encoded", "cached")]

    model, _ = tiny
    ids = _ids(120, 51)
    seen = []
    for k in (4, 8):
        before = counts()
        assert compare_with_reference(tiny_llm, model, [(ids, 10, {"k": k, "reserve": 4})]) < TOL
        seen.append([after - b for after, b in zip(counts(), before)])
    chunks = len(model.plan(120, k=8, reserve=4).chunks)
    assert seen == [[chunks, 0], [0, chunks]] and chunks > 0
