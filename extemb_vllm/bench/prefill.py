"""Pre-fill of long prompts: the ExtEmb plug-in against plain vLLM (full attention)
on the same base weights, measured in one run, one engine after the other.

Reports pre-fill time (a request with max_tokens=1: embedder + LLM pre-fill + one
token) and KV-cache blocks per request (positions the engine stores, in blocks).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def plain_llama_dir(model_dir: Path) -> Path:
    """A plain Llama view of a checkpoint: same base weights (linked), no embedder."""
    out = model_dir.parent / f"{model_dir.name}.plain-llama"
    out.mkdir(exist_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("extemb", "max_seq_len", "advertised_max_model_len"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in model_dir.iterdir():
        if f.name in ("config.json", "embedder.safetensors", "build-info.json"):
            continue
        link = out / f.name
        if link.is_symlink():  # re-point: the checkpoint may have been rebuilt or moved
            link.unlink()
        link.symlink_to(f.resolve())
    return out


def _engine(model, max_model_len, **kw):
    from vllm import LLM

    return LLM(model=str(model), max_model_len=max_model_len, enforce_eager=True, dtype="float32", seed=0, **kw)


def _shutdown(llm):
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def _time_requests(llm, prompts, repeats):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(prompts[:1], sp, use_tqdm=False)  # warm-up (first-call allocations)
    times, positions = [], []
    for r in range(repeats):
        # a fresh document each time: nothing may come from the prefix or encoder cache
        batch = [dict(p, prompt_token_ids=[(t + r + 1) % 1000 + 1000 for t in p["prompt_token_ids"]]) for p in prompts]
        t = time.perf_counter()
        outs = llm.generate(batch, sp, use_tqdm=False)
        times.append((time.perf_counter() - t) / len(batch))
        positions.append(statistics.mean(len(o.prompt_token_ids) for o in outs))
    block = llm.llm_engine.vllm_config.cache_config.block_size
    return statistics.median(times), statistics.mean(positions), block


def run(model_dir="extemb-llama2", tokens=8000, k=16, requests=1, repeats=3, json_path=None) -> dict:
    import torch
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base_cfg = json.loads((model_dir / "config.json").read_text())
    max_pos = base_cfg["max_position_embeddings"]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1000, 2000, (tokens,), generator=g).tolist() for _ in range(requests)]
    result = {"tokens": tokens, "k": k, "requests_per_batch": requests, "repeats": repeats,
              "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
              "torch_threads": torch.get_num_threads(), "vocab": tok.vocab_size}

    runs = {}
    if tokens + 1 <= max_pos:
        llm = _engine(plain_llama_dir(model_dir), tokens + 1)
        runs["plain vLLM, full attention"] = _time_requests(llm, [{"prompt_token_ids": p} for p in ids], repeats)
        _shutdown(llm)
    llm = _engine(model_dir, None, limit_mm_per_prompt={"context": 1})
    prompts = [{"prompt_token_ids": p, "mm_processor_kwargs": {"k": k}} for p in ids]
    runs[f"ExtEmb plug-in, k={k}"] = _time_requests(llm, prompts, repeats)
    _shutdown(llm)

    base = runs.get("plain vLLM, full attention")
    rows = []
    for name, (sec, pos, block) in runs.items():
        blocks = math.ceil((pos + 1) / block)
        row = {"engine": name, "prefill_s": sec, "positions": pos, "kv_blocks": blocks, "block_size": block}
        if base:
            row["speedup_vs_full"] = base[0] / sec
            row["kv_blocks_ratio_vs_full"] = blocks / math.ceil((base[1] + 1) / base[2])
        rows.append(row)
    result["rows"] = rows
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_table(result) -> str:
    lines = [f"pre-fill of a {result['tokens']}-token prompt ({result['requests_per_batch']} per batch, "
             f"median of {result['repeats']}), {result['machine']}",
             f"{'engine':<30}{'pre-fill s':>12}{'positions':>11}{'KV blocks':>11}{'speed-up':>10}{'KV ratio':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['engine']:<30}{r['prefill_s']:>12.2f}{r['positions']:>11.0f}{r['kv_blocks']:>11}"
                     f"{r.get('speedup_vs_full', float('nan')):>10.2f}{r.get('kv_blocks_ratio_vs_full', float('nan')):>10.3f}")
    return "\n".join(lines)
