"""The CPU settings vLLM documents, measured: dtype, tcmalloc, compiled or eager, each for plain vLLM
and the plug-in with the same settings on both sides (docs/benchmarks.md, section 10).

    .venv/bin/python scripts/measure_cpu_settings.py --json docs/figures/cpu-settings.json

Each setting is one `extemb bench serve` run in a process of its own (tcmalloc is preloaded when a
process starts, or not at all): plain vLLM with full attention and the plug-in (its default layout,
as `vllm serve` plans an over-long prompt) on the same documents, one batch each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extemb_vllm.machine import machine  # noqa: E402

# (dtype, eager, tcmalloc): the earlier benchmarks' setting first, what `vllm serve` now runs last
SETTINGS = [("float32", True, False), ("bfloat16", True, False), ("bfloat16", True, True),
            ("bfloat16", False, True)]


def bench(model: str, dtype: str, eager: bool, tcmalloc: bool, contexts: int, requests: int, gen: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "serve.json"
        cmd = [sys.executable, "-m", "extemb_vllm.cli", "bench", "serve", "--model", model, "--contexts",
               str(contexts), "--requests", str(requests), "--gen", str(gen), "--k", "auto", "--engines", "plug-in",
               "full", "--dtype", dtype, *(["--eager"] if eager else []), "--tcmalloc" if tcmalloc else "--no-tcmalloc",
               "--json", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="extemb-llama2")
    ap.add_argument("--contexts", type=int, default=8000)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for dtype, eager, tcmalloc in SETTINGS:
        print(f"[cpu settings] {dtype}, {'eager' if eager else 'compiled'}, "
              f"{'tcmalloc' if tcmalloc else 'no tcmalloc'}", file=sys.stderr, flush=True)
        res = bench(args.model, dtype, eager, tcmalloc, args.contexts, args.requests, args.gen)
        cells = {c["engine"]: c for c in res["cells"]}
        rows.append({"settings": res["settings"], "plain_s": cells["full"]["wall_s"],
                     "plugin_s": cells["plug-in"]["wall_s"], "k": cells["plug-in"]["k"],
                     "plain_ttft_p50_s": cells["full"]["ttft_p50_s"], "plugin_ttft_p50_s": cells["plug-in"]["ttft_p50_s"]})
        print(f"  plain {rows[-1]['plain_s']:.1f} s, plug-in {rows[-1]['plugin_s']:.1f} s", file=sys.stderr, flush=True)
    res = {"machine": machine(), "command": " ".join(sys.argv), "contexts": args.contexts, "requests": args.requests,
           "gen": args.gen, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))


def table(res: dict) -> str:
    base = res["rows"][0]
    lines = [f"{res['requests']} documents of {res['contexts']} tokens + a question, {res['gen']} generated each, one "
             f"batch; {res['machine']}",
             "", "dtype | compiled | tcmalloc | plain vLLM s | plug-in s (k) | plug-in x faster | plain vs row 1 | "
             "plug-in vs row 1", "---|---|---|---|---|---|---|---"]
    for r in res["rows"]:
        s = r["settings"]
        lines.append(f"{s['dtype']} | {'no' if s['eager'] else 'yes'} | {'yes' if s['tcmalloc'] else 'no'} | "
                     f"{r['plain_s']:.1f} | {r['plugin_s']:.1f} ({r['k']}) | {r['plain_s'] / r['plugin_s']:.1f} | "
                     f"{base['plain_s'] / r['plain_s']:.2f}x | {base['plugin_s'] / r['plugin_s']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
