"""The benchmarks run end to end on a tiny configuration and write their report.

Not timed tests: figures come from the full runs in docs/benchmarks.md. These check
that each command runs the real engines, measures what it says, and writes its JSON
and plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _extemb(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "extemb_vllm.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_serve_tiny(tiny_checkpoint, tmp_path):
    out = _extemb("bench", "serve", "--model", str(tiny_checkpoint), "--contexts", "32,300", "--requests", "2",
                  "--gen", "3", "--k", "4", "--json", "serve.json", "--plot", "serve.png", cwd=tmp_path)
    result = json.loads((tmp_path / "serve.json").read_text())
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    cells = {(c["engine"], c["context"]): c for c in result["cells"]}
    assert set(cells) == {(e, c) for e in ("plug-in", "full", "truncated") for c in (32, 300)}
    for c in cells.values():
        assert c["requests"] == 2 and c["generated_tokens_per_s"] > 0 and c["ttft_p50_s"] > 0
        assert c["throughput_vs_full"] > 0 and c["peak_memory_gib"] > 0
    # 300 + question tokens do not fit the tiny window (64): k=4 does not fit either, so the
    # plug-in takes the smallest ladder k that does and says so; its cache holds the window only.
    plug, full = cells[("plug-in", 300)], cells[("full", 300)]
    assert plug["k"] == 8
    assert plug["positions_per_request"] <= 64 < full["positions_per_request"]
    assert plug["kv_blocks_vs_full"] < 1 and full["kv_blocks_vs_full"] == 1
    assert cells[("truncated", 300)]["positions_per_request"] == 64 - 3
    assert cells[("plug-in", 32)]["k"] == 4  # 32 + question exceeds the window already
    assert "plug-in" in out and "x KV" in out


@pytest.mark.slow
def test_bench_embedder_tiny(tiny_checkpoint, tmp_path):
    out = _extemb("bench", "embedder", "--model", str(tiny_checkpoint), "--chunks", "16,64", "--batches", "1,2",
                  "--dtypes", "float32", "--repeats", "1", "--json", "emb.json", "--plot", "emb.png", cwd=tmp_path)
    result = json.loads((tmp_path / "emb.json").read_text())
    assert (tmp_path / "emb.png").stat().st_size > 10_000
    assert [(r["chunk"], r["batch"]) for r in result["rows"]] == [(16, 1), (16, 2), (64, 1), (64, 2)]
    for r in result["rows"]:
        assert r["embedder_tokens_per_s"] > 0 and r["x_limit"] > 0
        assert r["limit_s"] == pytest.approx(r["llm_prefill_s"] * 2 / 4)  # 2 of the tiny model's 4 layers
    assert result["profile"]["top_ops"] and "x limit" in out
