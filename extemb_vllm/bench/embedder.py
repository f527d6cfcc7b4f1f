"""`extemb bench embedder`: the embedder alone, against the limit its FLOP share sets.

The embedder is L of the base model's N decoder layers run over every token of the
old context. Its limit is therefore L/N of the LLM's own pre-fill time over the same
tokens, measured here in the same run with the same kernels (the LLM's forward
without its head). `x limit` = embedder time / that limit: 1.0 means the embedder
costs exactly its share of layers; above it is overhead (padding, the batched
layout, the strided keep).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..machine import default_device, machine
from ..model.checkpoint import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_flops_per_token(cfg, context: int) -> float:
    """Forward FLOPs of one decoder layer per token at `context` causal tokens (matmuls only)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    weights = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k+v, o, gate+up+down
    attention = 2 * h * (context + 1) / 2  # QK^T and AV over the causal half on average
    return 2 * (weights + attention)


@torch.no_grad()
def run(model_dir="extemb-llama2", chunk_sizes=(512, 1024, 2048, 4096), batches=(1, 4), dtypes=("float32", "bfloat16"),
        max_tokens_per_call=8192, repeats=2, device=None, json_path=None, plot_path=None, progress=print) -> dict:
    device = default_device(device)
    result = {"model": str(model_dir), "machine": machine(), "device": device.type, "repeats": repeats, "rows": []}
    for dtype in dtypes:
        model, _ = load_model(model_dir, dtype=DTYPES[dtype], device=device)
        n_layers, n_emb = model.llm.config.num_hidden_layers, model.ext.embedder_layers
        result.update(llm_layers=n_layers, embedder_layers=n_emb)
        g = torch.Generator().manual_seed(0)
        for c in chunk_sizes:
            for b in batches:
                if b * c > max_tokens_per_call:
                    continue
                ids = torch.randint(100, model.llm.config.vocab_size, (b, c), generator=g).to(device)
                progress(f"[bench embedder] {dtype}: {b} chunk(s) of {c}")
                t_emb = _timed(lambda: model.embedder.encode_chunks(list(ids), model.embed_tokens), repeats)
                t_llm = _timed(lambda: model.llm.model(input_ids=ids, use_cache=False), repeats)
                limit = t_llm * n_emb / n_layers
                flops = b * c * n_emb * layer_flops_per_token(model.llm.config, c)
                result["rows"].append({
                    "dtype": dtype, "chunk": c, "batch": b, "tokens": b * c, "embedder_s": t_emb,
                    "embedder_tokens_per_s": b * c / t_emb, "llm_prefill_s": t_llm, "limit_s": limit,
                    "limit_tokens_per_s": b * c / limit, "x_limit": t_emb / limit, "embedder_gflops": flops / t_emb / 1e9,
                })
        result.setdefault("profile", profile(model, chunk=model.ext.chunk_size, dtype=dtype))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if plot_path:
        plot(result, plot_path)
    return result


@torch.no_grad()
def profile(model, chunk: int, dtype: str, top: int = 8) -> dict:
    """Where one embedder call over one chunk spends its time (torch.profiler, self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = torch.randint(100, model.llm.config.vocab_size, (1, chunk)).to(model.device)
    model.embedder.encode_chunks(list(ids), model.embed_tokens)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=acts) as prof:
        model.embedder.encode_chunks(list(ids), model.embed_tokens)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return {"chunk": chunk, "dtype": dtype, "total_ms": total / 1e3,
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                         "calls": e.count} for e in events[:top]]}


def format_table(result) -> str:
    lines = [f"embedder ({result['embedder_layers']} of {result['llm_layers']} layers) on {result['machine']}; "
             f"limit = LLM pre-fill time x {result['embedder_layers']}/{result['llm_layers']}, same run",
             f"{'dtype':<10}{'chunk':>7}{'batch':>6}{'tok/s':>10}{'limit tok/s':>13}{'x limit':>9}{'GFLOP/s':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['dtype']:<10}{r['chunk']:>7}{r['batch']:>6}{r['embedder_tokens_per_s']:>10.0f}"
                     f"{r['limit_tokens_per_s']:>13.0f}{r['x_limit']:>9.2f}{r['embedder_gflops']:>9.1f}")
    p = result["profile"]
    lines.append(f"profile: one {p['chunk']}-token chunk, {p['dtype']}, {p['total_ms']:.0f} ms self time")
    lines += [f"  {o['share']:6.1%}  {o['self_ms']:9.1f} ms  {o['calls']:>5}x  {o['op']}" for o in p["top_ops"]]
    return "\n".join(lines)


def plot(result, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (dtype, b) in enumerate(sorted({(r["dtype"], r["batch"]) for r in result["rows"]})):
        rows = [r for r in result["rows"] if r["dtype"] == dtype and r["batch"] == b]
        color = f"C{i}"
        ax.plot([r["chunk"] for r in rows], [r["embedder_tokens_per_s"] for r in rows], "o-", color=color,
                label=f"embedder, {dtype}, batch {b}")
        ax.plot([r["chunk"] for r in rows], [r["limit_tokens_per_s"] for r in rows], "--", color=color, alpha=0.6,
                label=f"FLOP-share limit, {dtype}, batch {b}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (tokens)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"extemb bench embedder: {result['machine']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
