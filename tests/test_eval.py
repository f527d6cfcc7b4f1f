"""Evaluation mechanics on the tiny model, and the real SmolLM2 default end to end (slow)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from extemb_vllm.eval import passkey, ppl
from extemb_vllm.eval.stats import (
    change_vs_baseline_with_interval,
    gain_fraction_with_interval,
    perplexity_with_interval,
)
from extemb_vllm.texts import cut_spans

from .conftest import ROOT, TINY_TEXT


def test_spans_never_cross_documents():
    docs = [torch.arange(0, 100), torch.arange(1000, 1250)]
    spans = cut_spans(docs, 50, 5)
    assert len(spans) == 5 and all(len(s) == 50 for s in spans)
    assert all((s < 1000).all() or (s >= 1000).all() for s in spans)
    with pytest.raises(ValueError, match="only 7"):
        cut_spans(docs, 50, 8)


def test_bootstrap_interval_brackets_the_estimate():
    sums, counts = [10.0, 12.0, 9.0, 14.0], [5, 5, 5, 5]
    p, lo, hi = perplexity_with_interval(sums, counts)
    assert p == pytest.approx(math.exp(45 / 20))
    assert lo < p < hi


def test_gain_fraction_is_paired_and_anchored_at_baseline_and_full():
    rng = np.random.default_rng(0)
    counts = np.full(40, 100)
    base = rng.normal(330, 30, 40)  # per-block NLL sums; block difficulty varies a lot
    full = base - 20 + rng.normal(0, 1, 40)  # full attention: a steady gain on every block
    assert gain_fraction_with_interval(base, full, full, counts)[0] == pytest.approx(1.0)
    assert gain_fraction_with_interval(base, full, base, counts)[0] == pytest.approx(0.0)
    half = (base + full) / 2
    f, lo, hi = gain_fraction_with_interval(base, full, half, counts)
    pb, pf, pm = (math.exp(x.sum() / counts.sum()) for x in (base, full, half))
    assert f == pytest.approx((pb - pm) / (pb - pf)) and 0.45 < f < 0.55 and lo < f < hi  # in ppl, not log
    # paired: block difficulty cancels, so the interval is tight although the levels are noisy
    assert hi - lo < 0.1
    _, plo, phi = perplexity_with_interval(half, counts)
    assert (phi - plo) / math.exp(half.sum() / counts.sum()) > 0.05
    worse = base + 10  # worse than the baseline: a negative share
    assert gain_fraction_with_interval(base, full, worse, counts)[0] < 0
    with pytest.raises(ValueError, match="same blocks"):
        gain_fraction_with_interval(base, full, half[:-1], counts)


def test_change_vs_baseline_is_paired():
    rng = np.random.default_rng(1)
    counts = np.full(40, 100)
    base = rng.normal(330, 30, 40)
    better = base - 3 + rng.normal(0, 0.5, 40)  # 3 nats per 100-token block better: about -3%
    c, lo, hi = change_vs_baseline_with_interval(base, better, counts)
    assert c == pytest.approx(math.exp(better.sum() / 4000) / math.exp(base.sum() / 4000) - 1)
    assert lo < c < hi < 0  # paired: decidably better although the levels' intervals overlap
    assert change_vs_baseline_with_interval(base, base, counts)[:1] == (0.0,)
    with pytest.raises(ValueError, match="same blocks"):
        change_vs_baseline_with_interval(base, better[:-1], counts)


def test_ppl_tiny(tiny, tmp_path):
    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT)
    methods = ppl.parse_methods(["2", "4", "auto"], mismatched=True, stable=True)
    res = ppl.evaluate_ppl(model, tok, [text], [64, 128], methods, n_spans=2, score_tokens=32, progress=False)
    cell = {(r.method, r.length): r for r in res}
    # at 64 tokens everything fits the window: auto = truncated = full (same inputs)
    assert cell["auto", 64].ppl == pytest.approx(cell["full", 64].ppl, rel=1e-4)
    assert cell["truncated", 64].ppl == pytest.approx(cell["full", 64].ppl, rel=1e-4)
    # at 128 the truncated window loses context; the k runs read it all through compact slots
    assert cell["k4", 128].ks == [4] and cell["k4", 128].max_llm_positions <= 64
    assert cell["k2", 128].ppl is None and "does not fit" in cell["k2", 128].note  # 56 slots + 16 > 64
    assert cell["auto", 128].ks == [2, 4]  # per block: the smallest k that fits
    assert all(r.ppl is None or (math.isfinite(r.ppl) and r.n_tokens == 64) for r in res)
    ppl.write_json(res, tmp_path / "r.json", {})
    ppl.plot(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "k2-mismatched" in ppl.format_table(res)
    # the compressed runs at 128 carry their share of full attention's gain (same blocks)
    assert math.isfinite(cell["k4", 128].gain_fraction) and cell["k4", 128].gain_low <= cell["k4", 128].gain_high
    assert cell["truncated", 128].gain_fraction is None and "share of full attention" in ppl.format_table(res)
    # and, at every length, the paired change against truncation: 0 where the inputs are the same
    assert cell["auto", 64].vs_truncated == pytest.approx(0.0, abs=1e-4)
    k4 = cell["k4", 128]
    assert k4.vs_truncated == pytest.approx(k4.ppl / cell["truncated", 128].ppl - 1)
    assert k4.vs_truncated_low <= k4.vs_truncated <= k4.vs_truncated_high
    # the control, paired against the same k with the right document's slots
    mis = cell["k4-mismatched", 128]
    assert mis.vs_matched == pytest.approx(mis.ppl / k4.ppl - 1)
    assert mis.vs_matched_low <= mis.vs_matched <= mis.vs_matched_high and k4.vs_matched is None
    assert "the control" in ppl.format_table(res)
    assert cell["truncated", 128].vs_truncated is None and "change against truncated" in ppl.format_table(res)
    # the append-stable twin, paired against window filling: 0 where nothing is compressed
    assert cell["auto-stable", 64].vs_fill == pytest.approx(0.0, abs=1e-6)
    st = cell["auto-stable", 128]
    assert st.vs_fill == pytest.approx(st.ppl / cell["auto", 128].ppl - 1)
    assert st.vs_fill_low <= st.vs_fill <= st.vs_fill_high and cell["auto", 128].vs_fill is None
    assert "append-stable rule" in ppl.format_table(res)


def test_ppl_key_tokens(tiny, tmp_path):
    """--key-tokens: each figure again on the tokens full attention predicts better than truncation by more
    than alpha; the same tokens for every method; none at a length
    where full and truncated read the same inputs."""
    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT)
    methods = ppl.parse_methods(["4"], mismatched=True)
    res = ppl.evaluate_ppl(model, tok, [text], [64, 128], methods, n_spans=2, score_tokens=32, progress=False,
                           key_alpha=0.0)
    cell = {(r.method, r.length): r for r in res}
    assert all(r.key_tokens == 0 and r.key_ppl is None for r in res if r.length == 64)
    n_key = cell["full", 128].key_tokens
    assert 0 < n_key < 64 and all(r.key_tokens == n_key for r in res if r.length == 128 and r.ppl)
    assert cell["full", 128].key_ppl < cell["truncated", 128].key_ppl  # what makes them key tokens
    k4, mis = cell["k4", 128], cell["k4-mismatched", 128]
    assert math.isfinite(k4.key_gain_fraction) and k4.key_gain_low <= k4.key_gain_high
    assert mis.key_vs_matched == pytest.approx(mis.key_ppl / k4.key_ppl - 1)
    assert "key tokens" in ppl.format_table(res) and "of them key tokens: 128: " in ppl.format_table(res)
    ppl.plot(res, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="both must be run"):
        ppl.evaluate_ppl(model, tok, [text], [128], [ppl.Method("full"), ppl.Method("compressed", 4)], n_spans=2,
                         score_tokens=32, progress=False, key_alpha=0.5)


def test_ppl_methods_are_named_and_parsed_one_way():
    methods = ppl.parse_methods(["16", "auto"], mismatched=True, stable=True)
    assert [m.name for m in methods] == ["truncated", "full", "k16", "k16-mismatched", "k16-stable", "auto",
                                         "auto-stable"]
    assert all(ppl.Method.parse(m.name) == m for m in methods)
    assert ppl.Method.parse("k16-stable").paired_with().name == "k16"
    assert ppl.Method.parse("k16-mismatched").paired_with().name == "k16" and ppl.Method("full").paired_with() is None
    for bad in ("k0", "kx", "auto-fast", "k16-"):
        with pytest.raises(ValueError, match="unknown method"):
            ppl.Method.parse(bad)


def test_ppl_reports_what_does_not_fit(tiny, tmp_path):
    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT)
    res = ppl.evaluate_ppl(model, tok, [text], [400, 600], ["full", "k2"], n_spans=1, score_tokens=32, progress=False)
    cell = {(r.method, r.length): r for r in res}
    assert cell["full", 600].ppl is None and "512 positions" in cell["full", 600].note
    assert cell["k2", 600].ppl is None and "does not fit" in cell["k2", 600].note
    assert cell["full", 400].ppl is not None


def test_passkey_prompt_holds_the_key_at_depth(tiny):
    _, tok = tiny
    ids = passkey.make_prompt(tok, 300, 0.5, 12345)
    text = tok.decode(ids)
    assert abs(len(ids) - 300) <= 2
    at = text.index("12345")
    assert 0.3 < at / len(text) < 0.7 and text.rstrip().endswith("The pass key is")


def test_passkey_tiny(tiny, tmp_path):
    model, tok = tiny
    cells = passkey.evaluate_passkey(model, tok, [150, 300], [0.1, 0.9], ["auto", "truncated", "full"],
                                     trials=1, progress=False)
    grid = {(c.method, c.length, c.depth) for c in cells}
    assert len(cells) == len(grid) == 12 and all(not c.note and c.trials == 1 for c in cells)
    # the key's teacher-forced NLL beside the exact answers: truncation cannot see a needle before its
    # window (another key planted there leaves the answer's NLL unchanged), the compressed input can
    assert all(c.key_nll is not None and c.key_nll > 0 for c in cells)
    assert "NLL per token of the key" in passkey.format_table(cells)
    planted = {key: passkey.make_prompt(tok, 300, 0.1, key) for key in (12345, 67890)}
    nll = {(m, key): passkey._key_nll(model, tok, m, ids, 12345, model.ext.window, None, 8, None)
           for m in ("truncated", "auto") for key, ids in planted.items()}
    assert nll["truncated", 12345] == pytest.approx(nll["truncated", 67890], rel=1e-5)
    assert nll["auto", 12345] != pytest.approx(nll["auto", 67890], rel=1e-5)
    # a scored answer: the key's digits in the generated text, however the tokenizer split them
    assert passkey.answer_is_correct(tok, tok("The pass key is 12345.").input_ids, 12345)
    assert passkey.answer_is_correct(tok, tok("1 2345").input_ids, 12345)
    assert not passkey.answer_is_correct(tok, tok("12346 and 2345").input_ids, 12345)
    passkey.plot(cells, tmp_path / "p.png")
    passkey.write_json(cells, tmp_path / "p.json", {})


def _extemb(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "extemb_vllm.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_rejects_bad_k(tiny_checkpoint):
    r = _extemb("eval", "ppl", "--model", str(tiny_checkpoint), "--text", __file__, "--k", "0")
    assert r.returncode == 2 and "--k takes integers >= 1" in r.stderr


@pytest.mark.slow
def test_smollm2_build_and_eval_ppl(smollm2_checkpoint, heldout_texts, tmp_path):
    """The real default: `extemb build` is reused, `extemb eval ppl` gives finite numbers and a plot."""
    r = _extemb("build")
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout
    # a fresh machine's build uses the trained embedder shipped in the package, no download
    from extemb_vllm.model.checkpoint import BUILD_INFO, SHIPPED_EMBEDDER

    info = json.loads((smollm2_checkpoint / BUILD_INFO).read_text())
    assert info["embedder_trained"] and info["embedder_weights"] == str(SHIPPED_EMBEDDER)
    out_json, out_png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    r = _extemb("eval", "ppl", "--text", str(heldout_texts / "sonnets.txt"), "--lengths", "384,768",
                "--window", "256", "--raw-tail", "64", "--score-tokens", "128", "--spans", "2",
                "--k", "8,auto", "--mismatched", "--key-tokens", "0.5", "--json", str(out_json), "--plot", str(out_png))
    assert r.returncode == 0, r.stderr
    results = json.loads(out_json.read_text())["results"]
    cell = {(x["method"], x["length"]): x for x in results}
    for key in [("truncated", 384), ("full", 768), ("k8", 768), ("auto", 768)]:
        assert math.isfinite(cell[key]["ppl"]) and cell[key]["n_tokens"] == 256, key
    # a real pretrained model: perplexity on Shakespeare is far below the vocabulary size
    assert cell["full", 768]["ppl"] < 200
    assert out_png.stat().st_size > 5000
    assert "perplexity" in r.stdout and "does not fit" not in r.stdout
    # --key-tokens reaches the evaluation: the key-token figures are in the table and the JSON
    assert re.search(r"of them key tokens: .*768: [1-9]", r.stdout) and cell["k8", 768]["key_tokens"] > 0
    assert cell["k8-mismatched", 768]["key_vs_matched"] is not None


@pytest.mark.slow
def test_smollm2_demo_prints_a_continuation(smollm2_checkpoint, heldout_texts):
    r = _extemb("demo", "--tokens", "5000", "--max-new-tokens", "8",
                "--text", str(heldout_texts / "antony_and_cleopatra.txt"))
    assert r.returncode == 0, r.stderr
    assert "compressing the oldest" in r.stdout and "--- continuation (8 tokens" in r.stdout
