"""The two-stream objective: the block mask equals the reference model chunk by chunk."""

import numpy as np
import pytest
import torch

from extemb_vllm.model import ExtEmbConfig
from extemb_vllm.train.two_stream import two_stream_forward, two_stream_layout


def test_layout_small_case():
    lay = two_stream_layout(n_chunks=3, chunk_len=4, k=2)
    # compact: chunks 0,1 -> 2 slots each at positions 0..3; raw chunk i (i >= 1) at i*2 ..
    assert lay.compact_positions.tolist() == [0, 1, 2, 3]
    assert lay.raw_positions.tolist() == [[2, 3, 4, 5], [4, 5, 6, 7]]  # chunk 0 has no raw row
    M = lay.raw_mask  # (chunk 1.., query, [4 compact slots | 4 own raw tokens])
    assert M[0, 0, :4].tolist() == [True, True, False, False]  # chunk 1 sees C_0 only
    assert M[1, :, :4].all()                               # chunk 2 sees C_0 and C_1
    assert M[0, 1, 4:].tolist() == [True, True, False, False]  # causal inside its own chunk
    # every token of chunks 1.. in order (chunk 0's loss does not depend on the embedder)
    assert lay.target_at.tolist() == list(range(4, 12))


def test_linear_cross_entropy_equals_the_plain_loss_and_its_gradient():
    """The blockwise loss (gradient computed in the forward pass) against logits + cross-entropy,
    with token weights and with a distillation target mixed in."""
    from extemb_vllm.train import two_stream
    from extemb_vllm.train.two_stream import linear_cross_entropy

    torch.manual_seed(0)
    n, d, v, top = 37, 16, 50, 5
    w = torch.randn(v, d, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    row_weight = torch.rand(n, dtype=torch.float64) + 0.5
    teacher_logits = torch.randn(n, v, dtype=torch.float64) * 2
    t_val, t_idx = teacher_logits.topk(top, -1)
    teacher = (t_idx, t_val.softmax(-1))
    for distill, weighted in [(0.0, False), (0.0, True), (0.3, False), (0.3, True), (1.0, True)]:
        h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
        lp = (h @ w.T).log_softmax(-1)
        share = row_weight / row_weight.sum() if weighted else torch.full((n,), 1.0 / n, dtype=torch.float64)
        ce = -(lp.gather(-1, targets[:, None]).squeeze(-1) * share).sum()
        p = teacher[1]
        kl = ((p * (p.log() - lp.gather(-1, t_idx))).sum(-1) * share).sum()
        expected = (1 - distill) * ce + distill * kl
        expected.backward()
        h2 = h.detach().clone().requires_grad_(True)
        old_block, two_stream.LOSS_BLOCK_ROWS = two_stream.LOSS_BLOCK_ROWS, 8  # several blocks
        try:
            loss, logprob = linear_cross_entropy(h2, w, targets, teacher=teacher if distill else None,
                                                 distill=distill, row_weight=row_weight if weighted else None)
        finally:
            two_stream.LOSS_BLOCK_ROWS = old_block
        (3.0 * loss).backward()
        torch.testing.assert_close(loss, expected.detach())
        torch.testing.assert_close(h2.grad, 3.0 * h.grad)
        torch.testing.assert_close(logprob, lp.gather(-1, targets[:, None]).squeeze(-1).detach())


@pytest.mark.parametrize("k", [1, 3, 4])
def test_two_stream_equals_reference_per_chunk(tiny, k):
    """Chunk i's log-probs from the joint pass equal the reference model's on [chunks <= i]."""
    model, _ = tiny
    c, n = 12, 4
    ids = torch.randint(3, 300, (n * c,))
    _, lp, lay = two_stream_forward(model, ids, k, c, return_logprobs=True)
    stream2 = ExtEmbConfig(embedder_layers=2, chunk_size=c, window=512, raw_tail=c, fill_window=False,
                           append_stable=False)  # the fixed rule: only chunk i raw
    ref = type(model)(model.llm, model.embedder, stream2)
    by_target = dict(zip(lay.target_at.tolist(), lp))
    for i in range(1, n):
        expected, plan = ref.score(ids[: (i + 1) * c], c, k=k, raw_tail=c)
        assert plan.n_compressed == i * c
        got = torch.stack([by_target[i * c + t] for t in range(c)])
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_later_tokens_do_not_leak_backwards(tiny):
    model, _ = tiny
    c, n = 12, 3
    ids = torch.randint(3, 300, (n * c,))
    changed = ids.clone()
    changed[c + 7] = (changed[c + 7] - 3 + 5) % 297 + 3  # token 7 of chunk 1
    _, a, lay = two_stream_forward(model, ids, 4, c, return_logprobs=True)
    _, b, _ = two_stream_forward(model, changed, 4, c, return_logprobs=True)
    t = lay.target_at
    same = t <= c + 6  # chunk 1 up to the token before the change
    torch.testing.assert_close(a[same], b[same])
    assert not torch.allclose(a[(t > c + 7) & (t < 2 * c)], b[(t > c + 7) & (t < 2 * c)])  # its own future moves
    assert not torch.allclose(a[t >= 2 * c], b[t >= 2 * c])  # chunk 2 reads chunk 1 through compact slots


def test_only_the_embedder_gets_gradients(tiny_checkpoint):
    from extemb_vllm.model.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint)
    model.embedder.train()
    opt = torch.optim.AdamW([p for p in model.embedder.parameters()], lr=1e-2)
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    emb_before = {k: v.clone() for k, v in model.embedder.state_dict().items()}
    loss = two_stream_forward(model, torch.randint(3, 300, (36,)), 4, 12)
    loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    opt.step()
    assert all(torch.equal(v, llm_before[k]) for k, v in model.llm.state_dict().items())
    changed = [k for k, v in model.embedder.state_dict().items() if not torch.equal(v, emb_before[k])]
    assert changed and all(k.startswith("body.layers.") for k in changed)


def _tiny_train_config(tiny_checkpoint, tmp_path, **overrides):
    """A tiny run: 6 copies of the tiny text, samples of 4 chunks of 12, eval and save every 2 steps."""
    from extemb_vllm.train.config import TrainConfig

    from .conftest import TINY_TEXT

    (tmp_path / "texts").mkdir()
    for name in "abcdef":
        (tmp_path / "texts" / f"{name}.txt").write_text(TINY_TEXT)
    return TrainConfig(**{"model": str(tiny_checkpoint), "data": [str(tmp_path / "texts")], "out": str(tmp_path / "run"),
                          "sample_len": 48, "chunk_len": 12, "k_ladder": [2, 4], "accum": 2, "eval_every": 2,
                          "save_every": 2, "eval_samples": 2, "eval_ks": [4], "cache_dir": str(tmp_path / "cache"),
                          **overrides})


def test_train_command_runs_evaluates_and_resumes(tiny_checkpoint, tmp_path):
    """Tiny end-to-end: log, eval records, loss curve, checkpoint, and --resume continuing the step count."""
    import json

    from extemb_vllm.train.config import TrainConfig
    from extemb_vllm.train.trainer import train

    from .conftest import TINY_TEXT

    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "h.txt").write_text(TINY_TEXT[::-1])
    cfg = _tiny_train_config(tiny_checkpoint, tmp_path, heldout=[str(tmp_path / "held")], steps=4)
    out = train(cfg)
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 2, 4]
    # the steps' machine time (CPU per thread) is logged beside their wall time: a pause is not training
    assert all(0 < r["busy_seconds"] <= 1.5 * r["step_seconds"] for r in recs if r["kind"] == "train")
    assert {"full_context", "no_context"} <= set(next(r for r in recs if r["kind"] == "reference"))
    assert (out / "loss.png").stat().st_size > 1000 and (out / "embedder.safetensors").exists()
    # a step logged after the last checkpoint (then a crash) is redone, not logged twice; --accum
    # may change between stretches and the samples count follows
    with open(out / "log.jsonl", "a") as f:
        last_train = [r for r in recs if r["kind"] == "train"][-1]
        f.write(json.dumps({**last_train, "step": 5, "samples": 10}) + "\n")
    cfg.steps, cfg.accum = 6, 1
    train(cfg, resume=True)
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["samples"] for r in recs if r["kind"] == "train"] == [2, 4, 6, 8, 9, 10]
    assert [(r["step"], r["samples"], r["config"]["accum"]) for r in recs if r["kind"] == "session"] == [
        (0, 0, 2), (4, 8, 1)]
    # the instruction stage: the same command on other data, starting from the first stage's
    # embedder (its step-0 held-out loss is the first stage's last one: the weights came along)
    (tmp_path / "texts2").mkdir()
    (tmp_path / "texts2" / "q.txt").write_text(TINY_TEXT.upper())
    stage2 = TrainConfig(**{**vars(cfg), "data": [str(tmp_path / "texts2")], "out": str(tmp_path / "stage2"),
                            "init_embedder": str(out / "embedder.safetensors"), "steps": 1})
    recs2 = [json.loads(line) for line in open(train(stage2) / "log.jsonl")]
    last_eval = [r for r in recs if r["kind"] == "eval"][-1]["loss_by_k"]
    assert [r for r in recs2 if r["kind"] == "eval"][0]["loss_by_k"] == pytest.approx(last_eval, abs=1e-5)
    assert [r["step"] for r in recs2 if r["kind"] == "train"] == [1]


def test_moving_average_of_the_weights_is_evaluated_saved_resumed_and_exported(tiny_checkpoint, tmp_path):
    """--ema: the average is evaluated beside the live weights, saved, carried across --resume, and
    `extemb export --ema` ships it with a record that says so."""
    import json

    from safetensors.torch import load_file

    from extemb_vllm.train.export import export_embedder
    from extemb_vllm.train.trainer import EMA_WEIGHTS, train

    cfg = _tiny_train_config(tiny_checkpoint, tmp_path, steps=2, ema=0.5)
    out = train(cfg)
    evals = [r for r in map(json.loads, open(out / "log.jsonl")) if r["kind"] == "eval"]
    assert [set(r) >= {"loss_by_k", "ema_loss_by_k"} for r in evals] == [True, True]
    live, avg = load_file(str(out / "embedder.safetensors")), load_file(str(out / EMA_WEIGHTS))
    assert live.keys() == avg.keys() and any(not torch.equal(live[k], avg[k]) for k in live)
    cfg.steps = 4
    train(cfg, resume=True)
    assert torch.load(out / "train-state.pt", weights_only=True)["ema_updates"] == 4  # counted across the resume
    rec = json.loads(export_embedder(out, tmp_path / "ship" / "e.safetensors", ema=True).with_suffix(".json").read_text())
    assert rec["averaged"] == {"decay": 0.5, "updates": 4}
    shipped, avg = load_file(str(tmp_path / "ship" / "e.safetensors")), load_file(str(out / EMA_WEIGHTS))
    assert all(torch.equal(shipped[k], avg[k].to(torch.bfloat16)) for k in avg)


@pytest.mark.slow
def test_loss_goes_down_on_real_text(smollm2_checkpoint, heldout_texts):
    """A few optimiser steps on one real-text sample lower its two-stream loss (SmolLM2, fp32)."""
    from extemb_vllm.model.checkpoint import load_model

    model, tok = load_model(smollm2_checkpoint)
    model.embedder.train()
    ids = torch.tensor(tok((heldout_texts / "sonnets.txt").read_text()).input_ids[3000:4024])
    # the stretches' rate (at 2e-4 the trained default's loss swings around a step or two)
    opt = torch.optim.AdamW(model.embedder.parameters(), lr=1e-4)
    losses = []
    for _ in range(6):
        loss = two_stream_forward(model, ids, 8, 256)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(two_stream_forward(model, ids, 8, 256).item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_export_ships_bf16_weights_with_a_record(tiny_source, tiny_checkpoint, tmp_path, capsys):
    """`extemb export`: bf16 safetensors that `extemb build` loads, and a record that traces them to the run;
    a run of another base is refused as the embedded default's embedder."""
    import hashlib
    import json

    from safetensors.torch import load_file

    from extemb_vllm.model.checkpoint import build_checkpoint, load_model
    from extemb_vllm.train.export import export_embedder
    from extemb_vllm.train.trainer import seeds_drawn, train

    from .conftest import TINY_EXT

    run = train(_tiny_train_config(tiny_checkpoint, tmp_path, steps=2))
    with pytest.raises(ValueError, match="not of the embedded default"):
        export_embedder(run)  # the tiny base's embedder does not go into the default's slot
    with open(run / "log.jsonl", "a") as f:  # a step logged after the last checkpoint: not in the record
        f.write(json.dumps({"step": 3, "samples": 6, "kind": "train", "ks": [2, 2], "loss": 1.0}) + "\n")
    out = export_embedder(run, tmp_path / "ship" / "emb.safetensors", note="test")
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and rec["bytes"] == out.stat().st_size
    assert rec["steps"] == 2 and rec["samples"] == 4 and rec["training_tokens"] == 4 * 48
    assert sum(rec["k_seen"].values()) == 4 and rec["sessions"][0]["step"] == 0 and rec["sessions"][0]["machine"]
    assert rec["heldout_eval_last"]["step"] == 2 and rec["note"] == "test"
    assert rec["initialised_from"] is None and rec["samples_total"] == 4
    # a run that continues exported weights carries their record along, and counts their samples;
    # on the same data with the same seed it is told that it draws the first run's windows again
    (tmp_path / "second").mkdir()
    cfg2 = _tiny_train_config(tiny_checkpoint, tmp_path / "second", steps=1, init_embedder=str(out),
                              data=[str(tmp_path / "texts")])
    capsys.readouterr()
    run2 = train(cfg2)
    assert "first 4 windows of --seed 0 on this data" in capsys.readouterr().out
    rec2 = json.loads(export_embedder(run2, tmp_path / "ship2" / "emb.safetensors").with_suffix(".json").read_text())
    assert rec2["initialised_from"]["sha256"] == rec["sha256"] and rec2["samples_total"] == 4 + 2
    assert seeds_drawn(rec2, cfg2.data, 48) == {0: 4} and seeds_drawn(rec2, ["other"], 48) == {}
    shipped, trained = load_file(str(out)), load_file(str(run / "embedder.safetensors"))
    assert shipped.keys() == trained.keys() and all(v.dtype == torch.bfloat16 for v in shipped.values())
    # a checkpoint built with them carries the trained weights (to bf16 precision)
    ckpt = build_checkpoint(tmp_path / "built", source=tiny_source, ext=TINY_EXT, embedder_weights=out)
    model, _ = load_model(ckpt)
    body = model.embedder.body.state_dict()
    for name, ref in trained.items():
        torch.testing.assert_close(body[name.removeprefix("embedder.")].float(), ref.to(torch.bfloat16).float())
    # shipped over the very file it started from, and shipped again: still traced to that file's run
    for _ in range(2):
        rec3 = json.loads(export_embedder(run2, out).with_suffix(".json").read_text())
        assert rec3["initialised_from"]["sha256"] == rec["sha256"] and rec3["samples_total"] == 4 + 2


def test_distillation_and_recall_samples_train_and_are_evaluated(tiny_checkpoint, tmp_path):
    """--distill and --recall: a tiny run mixes the teacher in, draws recall samples, logs which sample
    was which, and evaluates the held-out recall answers beside the held-out text."""
    import json

    from extemb_vllm.train.trainer import train

    from .conftest import TINY_TEXT

    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "h.txt").write_text(TINY_TEXT[::-1])
    cfg = _tiny_train_config(tiny_checkpoint, tmp_path, heldout=[str(tmp_path / "held")], steps=4, sample_len=768,
                             chunk_len=256, distill=0.5, distill_top=8, recall=0.5)
    recs = [json.loads(line) for line in open(train(cfg) / "log.jsonl")]
    kinds = [k for r in recs if r["kind"] == "train" for k in r["sample_kinds"]]
    assert set(kinds) == {"text", "recall"}, kinds
    assert all(np.isfinite(r["loss"]) for r in recs if r["kind"] == "train")
    ev = [r for r in recs if r["kind"] == "eval"]
    assert [set(r["recall_loss_by_k"]) for r in ev] == [{"4"}] * 3
    assert [len(r["per_sample"]["4"]) for r in ev] == [2] * 3  # kept per sample, for paired comparisons


def test_recall_samples_plant_facts_in_compressed_chunks_and_ask_later():
    """Each recall sample keeps its length, states its facts in chunks before the one that asks (so they
    reach the answers only through the slots), asks 1 to 4 questions at varying distances, and never uses
    the pass-key evaluation's phrasing or five-digit keys."""
    import re

    from extemb_vllm.train.recall import RecallMaker, answer_weights

    from .conftest import TINY_TEXT, tiny_tokenizer

    tok = tiny_tokenizer()
    c = 512
    text = torch.tensor(tok(TINY_TEXT * 3).input_ids[:4 * c])
    maker = RecallMaker(tok, chunk_len=c, seed=0)
    n_facts, asking = [], []
    for _ in range(40):
        s = maker.make(text)
        assert s.ids.shape == text.shape and s.answer.shape == text.shape
        where = s.answer.nonzero()[:, 0]
        ask = int(where[0]) // c
        assert int(where[-1]) // c == ask >= 1  # every answer in one chunk after the first
        body, tail = tok.decode(s.ids[: ask * c]), tok.decode(s.ids[ask * c :])
        answers = re.findall(r" (.+?)\.", tok.decode(s.ids[s.answer]))
        assert "pass key" not in (body + tail).lower()
        for a in answers:
            assert a in body and not re.fullmatch(r"\d{5}", a), a
        n_facts.append(len(answers))
        asking.append(ask)
        w = answer_weights(s.answer, 0.5)
        assert w[s.answer].sum() == pytest.approx(w[~s.answer].sum()) and w.mean() == pytest.approx(1.0)
    assert set(n_facts) == {1, 2, 3, 4} and set(asking) == {1, 2, 3}


@pytest.mark.parametrize("k", [1, 3, 4])
def test_slot_attention_gives_the_masked_attentions_loss_and_gradients(tiny_checkpoint, monkeypatch, k):
    """The CPU path (flash attention over only the blocks a row reads, merged by log-sum-exp, with a
    hand-written backward) against one masked SDPA call: the same loss and embedder gradients."""
    from extemb_vllm.model.checkpoint import load_model
    from extemb_vllm.train import two_stream

    model, _ = load_model(tiny_checkpoint)
    model.embedder.train()
    ids = torch.randint(3, 300, (5 * 16,))
    results = []
    for fast in (True, False):
        monkeypatch.setattr(two_stream, "slot_attention_available", lambda device, fast=fast: fast)
        model.embedder.zero_grad()
        loss = two_stream_forward(model, ids, k, 16)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.embedder.named_parameters()}))
    (loss_fast, grads_fast), (loss_masked, grads_masked) = results
    torch.testing.assert_close(loss_fast, loss_masked)
    for name, g in grads_masked.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_fast[name], g, atol=1e-5, rtol=1e-4)


def test_compare_is_paired_and_curves_plot(tiny_checkpoint, tmp_path):
    """`extemb compare`: the same weights twice differ by exactly 0 with a zero-width interval, other
    weights do not; `extemb train-curves` reads a run's log into samples / CPU-minutes / loss points."""
    import shutil

    from extemb_vllm.model.checkpoint import EMBEDDER_FILE
    from extemb_vllm.train.compare import compare_embedders, format_comparison, plot_runs, run_curves
    from extemb_vllm.train.trainer import train

    from .conftest import TINY_TEXT

    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "h.txt").write_text(TINY_TEXT[::-1])
    run = train(_tiny_train_config(tiny_checkpoint, tmp_path, heldout=[str(tmp_path / "held")], steps=2))
    base, copy = str(tiny_checkpoint / EMBEDDER_FILE), str(tmp_path / "copy.safetensors")
    shutil.copy(base, copy)
    trained = str(run / "embedder.safetensors")
    res = compare_embedders(str(tiny_checkpoint), [base, copy, trained], [str(tmp_path / "held")],
                            n_samples=3, sample_len=48, chunk_len=12, ks=[2, 4], bf16=False, key_alpha=0.0,
                            mismatched=True)
    for prefix in ("", "key_"):
        assert all(v == (0.0, 0.0, 0.0) for v in res[prefix + "vs_first"][copy].values())
        assert all(v[0] != 0 for v in res[prefix + "vs_first"][trained].values())
        assert all(v[0] != 0 for v in res[prefix + "content"][trained].values())  # another window's slots differ
        assert len(res[prefix + "embedders"][trained]["4"]) == 3
    # key tokens are a subset of the scored ones, the ones the whole window helps (gain > 0 here)
    n_key, n_all = sum(res["key_references"]["tokens_per_sample"]), sum(res["references"]["tokens_per_sample"])
    assert 0 < n_key < n_all == 3 * 3 * 11
    assert res["key_references"]["full_context"] < res["key_references"]["no_context"]
    assert "key tokens" in format_comparison(res) and "wrong window's slots" in format_comparison(res)
    curves = run_curves(run, weights="live")
    assert [p[0] for p in curves["points"]] == [0, 4]  # evaluated at steps 0 and 2 (2 samples a step)
    assert curves["points"][0][1] == 0.0 and curves["points"][-1][1] > 0
    plot_runs([curves], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
