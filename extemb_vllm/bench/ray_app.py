"""`extemb bench ray`: the Ray app's two scaling questions, in one run.

1. Embedder throughput (document tokens/s) against the number of embedder workers: for
   each count, a fresh local Ray runtime in its own process deploys that many
   EmbedderWorker replicas (the machine's CPUs, or GPUs, split between them) and many
   callers send distinct documents (no store hits) through `EmbedderClient`.
2. End to end: the same OpenAI workload (long documents past the window plus a question,
   G generated tokens, C concurrent clients) against `vllm serve` (the in-engine plug-in)
   and against the Ray app (`serve run` of examples/ray/extemb.yaml), one after the other.

Every phase runs in processes of its own, so one Ray runtime never hosts two runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..machine import machine
from .clients import RequestSpec, drive, long_prompts, summarize
from .servers import RayAppServer, VllmServer



# -- phase 1: embedder workers --------------------------------------------------------------------
def embedder_scaling_child(model_dir: str, replicas: int, docs: int, doc_tokens: int, callers: int,
                           dtype: str, gpus_per_worker: float) -> dict:
    """Runs in its own process: a local Ray runtime with `replicas` embedder workers."""
    import ray
    from ray import serve

    from ..model.checkpoint import read_extemb_config
    from ..serving.embedder_service import EmbedderClient, EmbedderWorker

    cpus = os.cpu_count()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    options = {"num_cpus": cpus / replicas, "num_gpus": gpus_per_worker}
    worker = EmbedderWorker.options(num_replicas=replicas, ray_actor_options=options).bind(model_dir, dtype=dtype)
    handle = serve.run(worker, name="embedder-bench", route_prefix=None)
    client = EmbedderClient(handle)
    chunk = read_extemb_config(model_dir).chunk_size
    rng = np.random.default_rng(replicas)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    lo = min(1000, vocab // 2)  # clear of the special tokens

    def document():  # fresh random tokens: nothing comes from a store
        ids = rng.integers(lo, vocab, doc_tokens).tolist()
        return [ids[i : i + chunk] for i in range(0, doc_tokens, chunk)]

    for _ in range(replicas):  # warm every replica (first forward allocates)
        client.encode(document())
    work = [document() for _ in range(docs)]
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(client.encode, work))
    wall = time.perf_counter() - t0
    stats = [handle.stats.remote().result() for _ in range(4 * replicas)]
    per_replica = {s["actor_name"]: s["chunks_encoded"] for s in stats}
    serve.shutdown()
    ray.shutdown()
    return {"replicas": replicas, "docs": docs, "doc_tokens": doc_tokens, "callers": callers, "wall_s": wall,
            "tokens_per_s": docs * doc_tokens / wall, "cpus_per_worker": cpus / replicas,
            "gpus_per_worker": gpus_per_worker, "chunks_by_replica": per_replica}


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "extemb_vllm.bench.ray_app", "--child", *args],
                         capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"embedder phase failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# -- phase 2: end to end --------------------------------------------------------------------------
def end_to_end(server, prompts: list[str], gen: int, concurrency: int) -> dict:
    specs = [RequestSpec("long", p, gen) for p in prompts]
    asyncio.run(drive(server.base_url, server.model, specs[:concurrency], concurrency))  # warm-up
    t0 = time.perf_counter()
    outcomes = asyncio.run(drive(server.base_url, server.model, specs[concurrency:], concurrency))
    return summarize(outcomes, time.perf_counter() - t0)


def run(model_dir: Path, workers: list[int], docs: int, doc_tokens: int, e2e_requests: int, e2e_tokens: int,
        gen: int, concurrency: int, dtype: str, gpus_per_worker: float, outdir: Path) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(), "model": str(model_dir), "command": " ".join(sys.argv), "embedder": [],
           "end_to_end": {}}
    for r in workers:
        print(f"[bench ray] embedder workers: {r}", file=sys.stderr)
        res["embedder"].append(_run_child([str(model_dir), str(r), str(docs), str(doc_tokens),
                                           str(max(2, 2 * r)), dtype, str(gpus_per_worker)]))
        print(f"  {res['embedder'][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    prompts = long_prompts(model_dir, e2e_requests + concurrency, e2e_tokens)
    # both servers alike: the plug-in's dtype for this CPU, eager (the Ray app's LLM replica is),
    # tcmalloc preloaded where installed (servers.py)
    servers = {"vllm serve": lambda: VllmServer(model_dir, outdir / "vllm-serve.log",
                                                eager=True, extra_args=("--max-num-seqs", "16")),
               "ray app": lambda: RayAppServer(model_dir, outdir / "ray-app")}
    for name, make in servers.items():
        print(f"[bench ray] end to end: {name}", file=sys.stderr)
        with make() as server:
            res["end_to_end"][name] = end_to_end(server, prompts, gen, concurrency)
        print(f"  {res['end_to_end'][name]['requests_per_s']:.3f} requests/s", file=sys.stderr)
    base = res["embedder"][0]["tokens_per_s"]
    for row in res["embedder"]:
        row["speedup_vs_1"] = row["tokens_per_s"] / base
    e2e = res["end_to_end"]
    e2e["ray app"]["ratio_vs_vllm_serve"] = e2e["ray app"]["requests_per_s"] / e2e["vllm serve"]["requests_per_s"]
    res["settings"] = dict(docs=docs, doc_tokens=doc_tokens, e2e_requests=e2e_requests, e2e_tokens=e2e_tokens,
                           gen=gen, concurrency=concurrency, dtype=dtype)
    return res


def format_table(res: dict) -> str:
    lines = ["embedder workers | cpus each | tokens/s | x vs 1 | chunks by replica",
             "---|---|---|---|---"]
    for r in res["embedder"]:
        lines.append(f"{r['replicas']} | {r['cpus_per_worker']:g} | {r['tokens_per_s']:.0f} | "
                     f"{r['speedup_vs_1']:.2f} | {sorted(r['chunks_by_replica'].values())}")
    lines += ["", "server | sent | completed | failed | requests/s | latency p50 / p99 s | ratio",
              "---|---|---|---|---|---|---"]
    for name, s in res["end_to_end"].items():
        lines.append(f"{name} | {s['sent']} | {s['completed']} | {s['failed']} | {s['requests_per_s']:.4f} | "
                     f"{s['latency_p50_s']:.1f} / {s['latency_p99_s']:.1f} | {s.get('ratio_vs_vllm_serve', 1.0):.2f}")
    return "\n".join(lines)


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    rows = res["embedder"]
    a.plot([r["replicas"] for r in rows], [r["tokens_per_s"] for r in rows], "o-")
    a.set(xlabel="embedder workers", ylabel="document tokens/s", title="embedder pool throughput", ylim=(0, None))
    a.set_xticks([r["replicas"] for r in rows])
    names = list(res["end_to_end"])
    b.bar(names, [res["end_to_end"][n]["requests_per_s"] for n in names], color=["tab:gray", "tab:blue"])
    b.set(ylabel="requests/s", title=f"end to end, {res['settings']['e2e_tokens']}-token documents")
    fig.suptitle(res["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    model, reps, docs, tokens, callers, dtype, gpus = sys.argv[2:9]
    print(json.dumps(embedder_scaling_child(model, int(reps), int(docs), int(tokens), int(callers), dtype,
                                            float(gpus))))
