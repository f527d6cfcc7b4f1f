"""Key tokens and the objectives built on them (issue 27): the frozen LLM's long-context gain, its
cache, the margin hinge, rows cut to their first tokens, and a tiny run of each arm."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from extemb_vllm.train.key_tokens import GainCache, frozen_logprobs, key_weights
from extemb_vllm.train.two_stream import compact_slots, linear_cross_entropy, two_stream_forward

from .test_two_stream import _tiny_train_config


def test_hinge_adds_its_loss_and_gradient():
    """`hinge=(floor, weight)`: the loss gains sum(weight * max(0, floor - logprob)) and the gradient is
    autograd's of that sum, alone and beside token weights and a distillation target."""
    from extemb_vllm.train import two_stream

    torch.manual_seed(1)
    n, d, v = 29, 8, 40
    w = torch.randn(v, d, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    row_weight = torch.rand(n, dtype=torch.float64) + 0.5
    t_val, t_idx = (torch.randn(n, v, dtype=torch.float64) * 2).topk(4, -1)
    teacher = (t_idx, t_val.softmax(-1))
    hinge_weight = torch.rand(n, dtype=torch.float64) * (torch.rand(n) > 0.3)
    for distill, weighted in [(0.0, False), (0.0, True), (0.4, True)]:
        h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
        lp_all = (h @ w.T).log_softmax(-1)
        lp = lp_all.gather(-1, targets[:, None]).squeeze(-1)
        floor = lp.detach() + torch.randn(n, dtype=torch.float64)  # about half the rows below their floor
        share = row_weight / row_weight.sum() if weighted else torch.full((n,), 1.0 / n, dtype=torch.float64)
        p = teacher[1]
        kl = ((p * (p.log() - lp_all.gather(-1, t_idx))).sum(-1) * share).sum()
        expected = (1 - distill) * -(lp * share).sum() + distill * kl + (hinge_weight * (floor - lp).clamp_min(0)).sum()
        expected.backward()
        h2 = h.detach().clone().requires_grad_(True)
        old, two_stream.LOSS_BLOCK_ROWS = two_stream.LOSS_BLOCK_ROWS, 8
        try:
            loss, _ = linear_cross_entropy(h2, w, targets, teacher=teacher if distill else None, distill=distill,
                                           row_weight=row_weight if weighted else None, hinge=(floor, hinge_weight))
        finally:
            two_stream.LOSS_BLOCK_ROWS = old
        loss.backward()
        torch.testing.assert_close(loss, expected.detach())
        torch.testing.assert_close(h2.grad, h.grad)


def test_rows_cut_to_their_first_tokens_score_those_tokens_alike(tiny):
    """`row_len=r`: the log-probs of the first r tokens of each chunk are the full pass's (attention is
    causal inside a row), the loss is their mean, and slots given as `compact` are read in place."""
    model, _ = tiny
    c, n, r = 16, 4, 5
    ids = torch.randint(3, 300, (n * c,))
    _, lp, lay = two_stream_forward(model, ids, 4, c, return_logprobs=True)
    loss_cut, lp_cut, lay_cut = two_stream_forward(model, ids, 4, c, return_logprobs=True, row_len=r)
    assert lay_cut.target_at.tolist() == [i * c + t for i in range(1, n) for t in range(r)]
    first = (lay.target_at % c) < r
    torch.testing.assert_close(lp_cut, lp[first], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss_cut, -lp_cut.mean())
    _, lp_given, _ = two_stream_forward(model, ids, 4, c, return_logprobs=True,
                                        compact=compact_slots(model, ids, 4, c))
    torch.testing.assert_close(lp_given, lp)
    other = torch.randint(3, 300, (n * c,))
    _, lp_wrong, _ = two_stream_forward(model, ids, 4, c, return_logprobs=True,
                                        compact=compact_slots(model, other, 4, c))
    chunk1 = lay.target_at < 2 * c
    assert not torch.allclose(lp_wrong[chunk1], lp[chunk1])  # chunk 1 reads the other sample's chunk 0


def test_gains_are_full_minus_own_chunk_and_cached(tiny, tmp_path):
    model, _ = tiny
    c, n = 16, 3
    ids = torch.randint(3, 300, (n * c,))
    full, alone = frozen_logprobs(model, ids, c)
    with torch.no_grad():
        ref_full = model.llm(ids[None]).logits[0].log_softmax(-1)[c - 1 : -1].gather(-1, ids[c:, None])[:, 0]
        rows = ids[c:].view(n - 1, c)
        ref_alone = model.llm(rows).logits.log_softmax(-1)[:, :-1].gather(-1, rows[:, 1:, None])[..., 0]
    torch.testing.assert_close(full, ref_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.view(n - 1, c)[:, 1:], ref_alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(alone.view(n - 1, c)[:, 0], full.view(n - 1, c)[:, 0])  # a chunk's first token: no gain
    cache = GainCache(tmp_path, model, c, torch.float32)
    g1 = cache.gains(model, ids)
    g2 = GainCache(tmp_path, model, c, torch.float32).gains(model, ids)  # another process finds it on disk
    assert (cache.hits, cache.misses) == (0, 1) and len(list(cache.dir.glob("*.npy"))) == 1
    torch.testing.assert_close(g1, full - alone)
    torch.testing.assert_close(g2, g1, atol=2e-3, rtol=1e-3)  # stored as fp16
    w = key_weights(torch.tensor([-1.0, 0.0, 0.5, 10.0]), strength=2.0, cap=4.0)
    assert w.tolist() == [1.0, 1.0, 2.0, 9.0]


def test_windows_start_on_the_grid():
    from extemb_vllm.train.data import WindowSampler

    docs = {"a": np.arange(1000, dtype=np.uint32), "b": np.arange(5000, 5700, dtype=np.uint32)}
    sampler = WindowSampler(docs, 200, seed=0, align=64)
    starts = [int(sampler.sample()[0]) for _ in range(200)]
    assert all((s % 5000 if s >= 5000 else s) % 64 == 0 for s in starts)
    assert {s >= 5000 for s in starts} == {True, False}
    assert max(s for s in starts if s < 5000) <= 1000 - 200


@pytest.mark.parametrize("arm", [dict(key_weight=2.0), dict(key_weight=2.0, content_margin=1.0, raw_rows=6),
                                 dict(content_margin=1.0), dict(raw_rows=6, recall=0.5, sample_len=768,
                                                                chunk_len=256)])
def test_each_arm_trains_and_logs(tiny_checkpoint, tmp_path, arm):
    """A tiny run of each objective: finite losses; with key tokens, the gains of every window are computed
    once and a second run over the same windows finds them all in the cache."""
    from extemb_vllm.train.trainer import train

    cfg = _tiny_train_config(tiny_checkpoint, tmp_path, steps=3, accum=1, **arm)
    recs = [json.loads(line) for line in open(train(cfg) / "log.jsonl")]
    steps = [r for r in recs if r["kind"] == "train"]
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) for r in steps)
    if arm.get("key_weight") or arm.get("content_margin"):
        assert steps[-1]["gain_cache_hits"] + steps[-1]["gain_cache_misses"] == 3
        cfg.out = str(tmp_path / "again")
        recs = [json.loads(line) for line in open(train(cfg) / "log.jsonl")]
        assert [r["gain_cache_misses"] for r in recs if r["kind"] == "train"][-1] == 0


def test_cpu_minutes_budget_stops_the_run(tiny_checkpoint, tmp_path):
    """--cpu-minutes: the run stops after the step that reaches the budget, saves there, and a resume
    with a larger budget goes on from the CPU time already spent."""
    from extemb_vllm.train.trainer import train

    cfg = _tiny_train_config(tiny_checkpoint, tmp_path, steps=1000, cpu_minutes=1e-6, save_every=1000)
    out = train(cfg)
    steps = [r for r in map(json.loads, open(out / "log.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1]
    assert torch.load(out / "train-state.pt", weights_only=True)["step"] == 1
    spent = steps[-1]["busy_minutes"]
    cfg.cpu_minutes = spent + 1e-6
    train(cfg, resume=True)
    steps = [r for r in map(json.loads, open(out / "log.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2] and steps[-1]["busy_minutes"] > spent


def test_arms_table_reads_cpu_minutes_from_the_export_record(tiny_checkpoint, tmp_path):
    """`extemb compare-arms`: each candidate's CPU-minutes come from its export record, its paired figures
    from the compare result; the table and the plot are drawn."""
    from extemb_vllm.model.checkpoint import EMBEDDER_FILE
    from extemb_vllm.train.compare import arms_table, compare_embedders, format_arms, plot_arms
    from extemb_vllm.train.export import export_embedder
    from extemb_vllm.train.trainer import train

    from .conftest import TINY_TEXT

    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "h.txt").write_text(TINY_TEXT[::-1])
    cfg = _tiny_train_config(tiny_checkpoint, tmp_path, steps=2, key_weight=1.0)
    run = train(cfg)
    cand = export_embedder(run, tmp_path / "cand" / "arm-2.safetensors")
    # a new run from the candidate's weights continues its arm: its minutes add to the parent's
    run2 = train(dataclasses.replace(cfg, out=str(tmp_path / "run2"), init_embedder=str(cand)))
    cand2 = export_embedder(run2, tmp_path / "cand" / "arm-2-more.safetensors")
    res = compare_embedders(str(tiny_checkpoint), [str(tiny_checkpoint / EMBEDDER_FILE), str(cand), str(cand2)],
                            [str(tmp_path / "held")], n_samples=3, sample_len=48, chunk_len=12, ks=[2, 4], bf16=False,
                            key_alpha=0.0, mismatched=True)
    row, row2 = arms_table([res])
    spent, spent2 = ([r for r in map(json.loads, open(d / "log.jsonl")) if r["kind"] == "train"][-1]["busy_minutes"]
                     for d in (run, run2))
    assert row2["lineage"] == ["run", "run2"] and row2["cpu_minutes"] == pytest.approx(spent + spent2)
    assert row["run"] == "run" and row["lineage"] == ["run"] and row["samples"] == 4 and row["cpu_minutes"] == pytest.approx(spent)
    assert row["vs_shipped_k4"] == tuple(res["vs_first"][str(cand)]["4"])
    assert set(row) >= {"key_vs_shipped_k2", "key_content_k4"}
    assert "key_content_k4" in format_arms([row])
    plot_arms([row, row2], tmp_path / "arms.png")
    assert (tmp_path / "arms.png").stat().st_size > 1000
