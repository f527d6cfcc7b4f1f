"""Which thread setting serves long prompts fastest with `vllm serve` on a 2-core machine?

vLLM's engine process logs "Reducing Torch threads from 2 to 1 for serving" unless
OMP_NUM_THREADS is set, and its CPU worker binds its OpenMP threads to all cores but the
ones it reserves for the scheduler (one on x86: the model runs on 1 of 2 cores) unless
VLLM_CPU_NUM_OF_RESERVED_CPU says otherwise. This starts the README's serve command as
written, once per setting, interleaved (A B C A B C), and times streamed completions of fresh
over-long documents (distinct text each time: nothing comes from a cache) and of one prompt
inside the window.

    .venv/bin/python scripts/measure_serve_threads.py --json docs/figures/serve-threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from extemb_vllm.bench.servers import ROOT, Server, readme_serve_command
from extemb_vllm.machine import machine

SETTINGS = {"default": {}, "OMP_NUM_THREADS=2": {"OMP_NUM_THREADS": "2"},
            "VLLM_CPU_NUM_OF_RESERVED_CPU=0": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}
MODEL = "extemb-llama2"


def timed_stream(http: httpx.Client, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds to the last) of one streamed completion."""
    t0 = time.perf_counter()
    first = None
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and first is None and '"text":"' in line.replace(" ", ""):
                first = time.perf_counter() - t0
    return first if first is not None else float("nan"), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (each starts both servers once)")
    ap.add_argument("--requests", type=int, default=2, help="over-long documents per server start")
    ap.add_argument("--tokens", type=int, default=16000, help="tokens per over-long document")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(ROOT / MODEL)
    text = "\n".join(p.read_text() for p in sorted((ROOT / "data" / "fiction" / "heldout").glob("*.txt")))
    ids = tok(text, add_special_tokens=False).input_ids
    need = args.rounds * len(SETTINGS) * (args.requests * args.tokens + 3000)
    if len(ids) < need:
        raise SystemExit(f"held-out fiction has {len(ids)} tokens, the run needs {need}")
    # the README's command without the environment it sets: each setting here sets its own
    command = "vllm serve" + readme_serve_command().split("vllm serve", 1)[1]
    rows, cursor = [], 0
    for rnd in range(args.rounds):
        for name, env in SETTINGS.items():
            log = ROOT / "runs" / f"serve-threads-{rnd}-{len(rows)}.log"
            server = Server(["bash", "-c", f"source .venv/bin/activate && {command}"], 8000, log, env=env)
            for var in ("OMP_NUM_THREADS", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND"):
                if var not in env:
                    server.env.pop(var, None)  # vLLM's own default
            with server, httpx.Client(base_url=server.base_url, timeout=1800) as http:
                timed_stream(http, ids[cursor : cursor + 64], 2)  # warm-up
                cursor += 64
                for _ in range(args.requests):
                    ttft, total = timed_stream(http, ids[cursor : cursor + args.tokens], 16)
                    cursor += args.tokens
                    rows.append({"setting": name, "round": rnd, "kind": f"{args.tokens} tokens", "ttft_s": ttft,
                                 "total_s": total})
                    print(rows[-1], flush=True)
                ttft, total = timed_stream(http, ids[cursor : cursor + 3000], 16)
                cursor += 3000
                rows.append({"setting": name, "round": rnd, "kind": "3000 tokens", "ttft_s": ttft, "total_s": total})
                print(rows[-1], flush=True)
                logged = log.read_text()
                binding = [line.split("]", 1)[-1].strip() for line in logged.splitlines() if "core ids=" in line]
                rows[-1]["torch_threads_reduced"] = "Reducing Torch threads" in logged
                rows[-1]["worker_binding"] = binding[:1]

    summary = {}
    for name in SETTINGS:
        for kind in sorted({r["kind"] for r in rows}):
            cell = [r["ttft_s"] for r in rows if r["setting"] == name and r["kind"] == kind]
            summary[f"{name} | {kind}"] = {"median_ttft_s": statistics.median(cell), "n": len(cell)}
    base = list(SETTINGS)[0]
    for key, cell in summary.items():
        name, kind = key.split(" | ")
        cell["speed-up vs default"] = summary[f"{base} | {kind}"]["median_ttft_s"] / cell["median_ttft_s"]
        print(f"{kind:>13} {name:32} median TTFT {cell['median_ttft_s']:6.2f} s (n={cell['n']}) "
              f"speed-up {cell['speed-up vs default']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "command": command, "rows": rows,
                                         "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
