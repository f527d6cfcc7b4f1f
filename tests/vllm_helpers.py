"""Run the same requests through vLLM (the plug-in) and through the reference model."""

from __future__ import annotations

import gc
import os

import torch

# In-process engine, no compilation: starts in seconds, and tests need no __main__ guard.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def make_llm(model_dir, max_model_len, dtype="float32", **kw):
    from vllm import LLM

    return LLM(model=str(model_dir), enforce_eager=True, max_model_len=max_model_len, dtype=dtype, seed=0,
               limit_mm_per_prompt={"context": 1}, **kw)


def shutdown(llm):
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def vllm_request(ids, n_prompt, **opts):
    """ids split into context (given as token ids) and the last n_prompt tokens as the prompt;
    n_prompt >= len(ids): a plain prompt (compressed by the renderer when it is too long)."""
    if n_prompt >= len(ids):
        return {"prompt_token_ids": list(ids), **({"mm_processor_kwargs": opts} if opts else {})}
    return {"prompt_token_ids": list(ids[-n_prompt:]),
            "multi_modal_data": {"context": {"token_ids": list(ids[:-n_prompt]), **opts}}}


def precomputed_request(model, ids, opts):
    """The same input with its compact embeddings made outside the engine (as the Ray workers
    do): {"embeds": (slots, hidden)} as the context, the raw tail as the prompt."""
    ids = torch.tensor(ids)
    plan = model.plan(len(ids), k=opts.get("k"), raw_tail=opts.get("raw_tail"),
                      reserve=opts.get("reserve", model.ext.reserve), fill_window=opts.get("fill_window"),
                      append_stable=opts.get("append_stable"))
    if plan.k is None:
        return {"prompt_token_ids": ids.tolist()}
    with torch.no_grad():
        compact = model.compact_embeddings(ids[: plan.n_compressed], plan.k)
    return {"prompt_token_ids": ids[plan.n_compressed :].tolist(),
            "multi_modal_data": {"context": {"embeds": compact, "reserve": opts.get("reserve", model.ext.reserve)}}}


def compare_with_reference(llm, model, cases, max_tokens=4, precomputed=False, same_greedy=True, mean=False,
                           request=None):
    """cases: (ids, n_prompt, opts). Returns the largest |logprob difference| over all checks.
    precomputed: send each input as compact embeddings made by the reference model's embedder.

    Checks, per case: greedy tokens equal (unless same_greedy=False: an engine in bf16 may part
    from the float32 reference at a near tie); log-probs of the generated tokens (vLLM's, scored
    by the reference along the same sequence) and of the raw prompt tokens (placeholders
    excluded) equal within tolerance. mean=True: the largest per-case mean |difference| instead
    (bf16 rounding moves a few of thousands of positions by tenths; a wrong input moves many).
    request: (ids, n_prompt, opts) -> what vLLM is sent instead (a control's wrong input).
    """
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, prompt_logprobs=0)
    make = request or (lambda ids, n, o: precomputed_request(model, ids, o) if precomputed else vllm_request(ids, n, **o))
    reqs = [make(ids, n, o) for ids, n, o in cases]
    outs = llm.generate(reqs, sp, use_tqdm=False)
    worst = 0.0
    for (ids, n_prompt, opts), out in zip(cases, outs):
        ids = torch.tensor(ids)
        reserve = opts.get("reserve", model.ext.reserve)
        k, raw_tail = opts.get("k"), opts.get("raw_tail")
        plan = model.plan(len(ids), k=k, raw_tail=raw_tail, reserve=reserve, fill_window=opts.get("fill_window"),
                          append_stable=opts.get("append_stable"))
        # vLLM's engine prompt is [placeholders..., raw tail]
        assert len(out.prompt_token_ids) == plan.llm_length, (len(out.prompt_token_ids), plan)
        got = list(out.outputs[0].token_ids)
        embeds = model.build_inputs(ids, plan)
        want = []
        with torch.no_grad():
            for _ in range(max_tokens):  # greedy on the reference, step by step
                nxt = model.forward(embeds)[0, -1].argmax().item()
                want.append(nxt)
                embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[nxt]]))], dim=1)
        assert got == want or not same_greedy, f"greedy tokens differ: vLLM {got} vs reference {want} ({plan})"
        # log-probs of the raw prompt tokens and of the generated ones, on one sequence
        seq = torch.cat([ids, torch.tensor(got)])
        n_raw = plan.n_raw + len(got)
        lp, plan2 = model.score(seq, n_raw - (1 if plan.k is None else 0), k=plan.k, raw_tail=n_raw,
                                window=model.ext.window + len(got), fill_window=False)  # exactly this layout
        assert plan2.n_compressed == plan.n_compressed
        ref_gen = lp[-len(got):]
        v_gen = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, got)])
        raw_positions = out.prompt_logprobs[plan.n_slots + (1 if plan.k is None else 0):]
        v_prompt = torch.tensor([next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                                 for d, t in zip(raw_positions, out.prompt_token_ids[-len(raw_positions):])])
        ref_prompt = lp[: len(v_prompt)]
        diff = torch.cat([v_gen - ref_gen, v_prompt - ref_prompt]).abs()
        worst = max(worst, (diff.mean() if mean else diff.max()).item())
    return worst
