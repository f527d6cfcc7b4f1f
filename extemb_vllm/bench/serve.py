"""`extemb bench serve`: a batched long-context workload through three engines, in one run.

Workload: for each context length C, N requests, each a fresh document of C tokens
plus a short question, G generated tokens (greedy, EOS ignored so every request
makes G tokens). Engines, one after the other in this process, same base weights,
same engine settings, by default those `vllm serve` runs with from the README's command:
the dtype the plug-in picks on this CPU (bfloat16 with native bf16, else float32), compiled
(not eager), tcmalloc preloaded where installed (the CLI starts itself again with it):

  plug-in    the ExtEmb model: old context compressed at k, the raw tail read as is
  full       plain vLLM, full attention over the whole prompt (only where C fits the base)
  truncated  plain vLLM over the last W - G tokens (W = the ExtEmb window)

Per (engine, C): requests/s, document and generated tokens/s, time to first token
(p50/p99 from vLLM's request stats), KV-cache blocks per request and peak memory.
Ratios are against `full` at the same C, measured in the same run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..machine import machine
from ..model.config import ContextError, ExtEmbConfig, plan_compression
from .engines import PeakMemory, describe, make_engine, plain_llama_dir, serving_settings, shutdown

QUESTION = "\n\nQuestion: what is the document above about? Answer:"
ENGINES = ("plug-in", "full", "truncated")


def _documents(contexts, n, vocab, seed=0) -> dict[int, list[list[int]]]:
    """Random token documents, different for every request and length: nothing can come from
    the prefix or encoder cache, so each request pays its whole pre-fill."""
    rng = np.random.default_rng(seed)
    lo = min(1000, vocab // 2)  # clear of the special tokens at the low ids
    return {c: [rng.integers(lo, vocab, c).tolist() for _ in range(n)] for c in contexts}


def _k_for(context: int, k, ext: ExtEmbConfig, raw_tail: int | None, fill_window: bool | None) -> int | None:
    """The requested k where it fits this context, else the smallest ladder k that does; None
    when nothing is compressed (the table says which k each row used)."""
    opts = dict(raw_tail=raw_tail, reserve=ext.reserve, fill_window=fill_window)
    if k is not None:
        try:
            return plan_compression(context, ext, k=k, **opts).k
        except ContextError:
            pass
    return plan_compression(context, ext, **opts).k


def _run_cell(llm, prompts, gen, doc_tokens):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
    ttft = [o.metrics.first_token_latency for o in outs if o.metrics is not None]
    if len(ttft) != len(outs):
        raise RuntimeError("vLLM returned no request stats; TTFT needs disable_log_stats=False")
    block = llm.llm_engine.vllm_config.cache_config.block_size
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    positions = [len(o.prompt_token_ids) for o in outs]
    return {
        "requests": len(outs), "wall_s": wall, "requests_per_s": len(outs) / wall,
        "document_tokens_per_s": doc_tokens / wall, "generated_tokens_per_s": generated / wall,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "positions_per_request": float(np.mean(positions)),
        "kv_blocks_per_request": float(np.mean([math.ceil((p + gen) / block) for p in positions])),
        "block_size": block, "peak_memory_gib": mem.peak_bytes / 2**30,
    }


def _warm_up(llm, prompts, gen):
    """Two untimed requests shaped like the first cell's (their own documents): first-call costs
    (allocations, kernel selection, compilation) stay out of the figures."""
    from vllm import SamplingParams

    llm.generate(prompts[:2], SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True), use_tqdm=False)


def run(model_dir="extemb-llama2", contexts=(2000, 4000, 8000, 16000, 32000, 64000), requests=4, gen=16, k=16,
        raw_tail=None, engines=ENGINES, json_path=None, plot_path=None, progress=print, fill_window=None,
        dtype=None, eager=False) -> dict:
    """dtype None: the plug-in's choice for this CPU; the same dtype and eager/compiled for every engine."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    ext = ExtEmbConfig.from_dict(cfg["extemb"])
    max_pos = cfg["max_position_embeddings"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    question = tok(QUESTION, add_special_tokens=False).input_ids
    docs = _documents(contexts, requests, cfg["vocab_size"])
    warm_docs = _documents(contexts[:1], requests, cfg["vocab_size"], seed=1)[contexts[0]]
    result = {"model": str(model_dir), "machine": machine(), "contexts": list(contexts), "requests": requests,
              "generated_per_request": gen, "k_requested": k, "window": ext.window,
              "raw_tail": ext.raw_tail if raw_tail is None else raw_tail, "chunk_size": ext.chunk_size, "base_positions": max_pos,
              "fill_window": ext.fill_window if fill_window is None else fill_window,
              "question_tokens": len(question), "settings": serving_settings(dtype, eager), "cells": []}
    settings = result["settings"]

    def cells_for(engine, docs):
        for c in docs:
            prompts = [d + question for d in docs[c]]
            if engine == "plug-in":
                kc = _k_for(len(prompts[0]), k, ext, raw_tail, fill_window)
                kwargs = {"k": kc, "raw_tail": raw_tail, "fill_window": fill_window}
                kwargs = {key: v for key, v in kwargs.items() if v is not None}
                opts = {"mm_processor_kwargs": kwargs} if kc else {}
                yield c, kc, [{"prompt_token_ids": p, **opts} for p in prompts]
            elif engine == "full":
                if len(prompts[0]) + gen <= max_pos:
                    yield c, None, [{"prompt_token_ids": p} for p in prompts]
            else:
                yield c, None, [{"prompt_token_ids": p[-(ext.window - gen):]} for p in prompts]

    for engine in engines:
        same = {"dtype": settings["dtype"], "eager": settings["eager"]}
        if engine == "plug-in":
            llm = make_engine(model_dir, limit_mm_per_prompt={"context": 1}, **same)
        else:
            llm = make_engine(plain_llama_dir(model_dir), max_model_len=max_pos, **same)
        _warm_up(llm, next(cells_for(engine, {contexts[0]: warm_docs}))[2], gen)
        for c, kc, prompts in cells_for(engine, docs):
            progress(f"[bench serve] {engine}: {requests} x {c} tokens" + (f", k={kc}" if kc else ""))
            cell = _run_cell(llm, prompts, gen, doc_tokens=requests * c)
            result["cells"].append({"engine": engine, "context": c, "k": kc, **cell})
        del llm
        shutdown()

    _add_ratios(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if plot_path:
        plot(result, plot_path)
    return result


def _add_ratios(result):
    full = {c["context"]: c for c in result["cells"] if c["engine"] == "full"}
    for c in result["cells"]:
        base = full.get(c["context"])
        if base is not None:
            c["throughput_vs_full"] = c["requests_per_s"] / base["requests_per_s"]
            c["kv_blocks_vs_full"] = c["kv_blocks_per_request"] / base["kv_blocks_per_request"]
            c["ttft_p50_vs_full"] = c["ttft_p50_s"] / base["ttft_p50_s"]
    # Growth with C where full attention cannot go: seconds per request per 1K document tokens.
    plug = [c for c in result["cells"] if c["engine"] == "plug-in"]
    for c in plug:
        c["s_per_request_per_1k_tokens"] = c["wall_s"] / c["requests"] / (c["context"] / 1024)


def format_table(result) -> str:
    head = (f"{result['requests']} requests x (C-token document + {result['question_tokens']}-token question), "
            f"{result['generated_per_request']} generated each; plug-in window {result['window']}, raw tail "
            f"{'>= ' if result.get('fill_window') else ''}{result['raw_tail']}"
            f"{' (window filled)' if result.get('fill_window') else ''}, chunks of {result['chunk_size']}; "
            f"{result['machine']}")
    if "settings" in result:
        head += f"\nevery engine: {describe(result['settings'])}"
    cols = (f"{'engine':<10}{'C':>7}{'k':>4}{'req/s':>9}{'doc tok/s':>11}{'gen tok/s':>10}{'TTFT p50':>10}"
            f"{'p99':>8}{'KV blk/req':>11}{'peak GiB':>9}{'x req/s':>9}{'x KV':>7}")
    lines = [head, f"full attention runs where C + question + generated <= the base's {result['base_positions']} "
                   f"positions; x = ratio against it at the same C", cols]
    for c in result["cells"]:
        lines.append(
            f"{c['engine']:<10}{c['context']:>7}{c['k'] or '-':>4}{c['requests_per_s']:>9.4f}"
            f"{c['document_tokens_per_s']:>11.0f}{c['generated_tokens_per_s']:>10.2f}{c['ttft_p50_s']:>10.2f}"
            f"{c['ttft_p99_s']:>8.2f}{c['kv_blocks_per_request']:>11.1f}{c['peak_memory_gib']:>9.2f}"
            f"{c.get('throughput_vs_full', float('nan')):>9.2f}{c.get('kv_blocks_vs_full', float('nan')):>7.3f}")
    return "\n".join(lines)


def plot(result, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("requests_per_s", "requests / s"), ("kv_blocks_per_request", "KV-cache blocks per request"),
              ("peak_memory_gib", "peak memory (GiB)"))
    for ax, (key, label) in zip(axes, panels):
        for engine in ENGINES:
            cells = [c for c in result["cells"] if c["engine"] == engine]
            if cells:
                ax.plot([c["context"] for c in cells], [c[key] for c in cells], "o-", label=engine)
        ax.axvline(result["base_positions"], color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document tokens C (dotted: the base model's positions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"extemb bench serve: {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
