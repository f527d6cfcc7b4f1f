"""The benchmarks run end to end on a tiny configuration and write their report.

Not timed tests: figures come from the full runs in docs/benchmarks.md. These check
that each command runs the real engines, measures what it says, and writes its JSON
and plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine  # a real vLLM engine, Ray runtime or server process (make test-fast skips)


def _extemb(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "extemb_vllm.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_serve_tiny(tiny_checkpoint, tmp_path):
    from extemb_vllm.vllm_plugin.cpu_settings import installed_tcmalloc, serving_dtype

    out = _extemb("bench", "serve", "--model", str(tiny_checkpoint), "--contexts", "32,300", "--requests", "2",
                  "--gen", "3", "--k", "4", "--eager", "--json", "serve.json", "--plot", "serve.png", cwd=tmp_path)
    result = json.loads((tmp_path / "serve.json").read_text())
    # the settings `vllm serve` runs with (eager asked here, to keep the test short), said in the table
    dtype = str(serving_dtype()).removeprefix("torch.")
    assert result["settings"] == {"dtype": dtype, "eager": True, "tcmalloc": installed_tcmalloc()}
    assert f"every engine: {dtype}, eager, {'tcmalloc preloaded' if installed_tcmalloc() else 'no tcmalloc'}" in out
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


def _extemb_in_repo(*args):
    """From the repository root (the held-out text lives in ./data), outputs elsewhere."""
    from .conftest import ROOT

    return _extemb(*args, cwd=ROOT)


@pytest.mark.slow
def test_bench_ray_tiny(tiny_checkpoint, tmp_path):
    _extemb_in_repo("bench", "ray", "--model", str(tiny_checkpoint), "--workers", "1,2", "--docs", "4",
                    "--doc-tokens", "64", "--requests", "2", "--tokens", "200", "--gen", "4", "--concurrency", "2",
                    "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "ray.json"),
                    "--plot", str(tmp_path / "ray.png"))
    res = json.loads((tmp_path / "ray.json").read_text())
    assert (tmp_path / "ray.png").stat().st_size > 10_000
    one, two = res["embedder"]
    assert one["replicas"] == 1 and two["replicas"] == 2 and one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
    assert len(two["chunks_by_replica"]) == 2  # both workers encoded
    for name in ("vllm serve", "ray app"):
        s = res["end_to_end"][name]
        assert s["sent"] == s["completed"] == 2 and s["requests_per_s"] > 0, (name, s)


@pytest.mark.slow
def test_bench_load_tiny_with_faults(tiny_checkpoint, tmp_path):
    out = _extemb_in_repo("bench", "load", "--model", str(tiny_checkpoint), "--servers", "ray-app",
                          "--clients", "4", "--duration", "20", "--max-requests", "60", "--long-tokens", "200",
                          "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "load.json"),
                          "--plot", str(tmp_path / "load.png"))
    res = json.loads((tmp_path / "load.json").read_text())
    assert (tmp_path / "load.png").stat().st_size > 10_000
    s = res["servers"]["ray-app"]
    assert s["completed"] > 0 and s["failed"] == 0 and s["cancelled_by_client"] > 0  # the mix hangs up on some streams
    assert s["unfinished_on_server_after"] == 0 and len(s["memory_samples"]) > 5
    assert s["bad_inputs"] and all(a["ok"] and a["next_request_ok"] for a in s["bad_inputs"]), s["bad_inputs"]
    f = res["faults"]
    assert [x["process"].split(":")[-1] for x in f["faults"]] == ["EmbedderWorker", "LLMWorker"]
    assert f["served_after"] and f["completed"] > 0
    assert all(c.startswith(("HTTP 503", "error event in the stream")) for c in f["failed_by_cause"]), f["failed_by_cause"]
    assert "Bad inputs against ray-app" in out
