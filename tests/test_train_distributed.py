"""Data-parallel training (issue 28) on real torch.distributed (gloo, 2 CPU processes, the tiny random
Llama): the same weights as one process on the same global batch, and `torchrun` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from extemb_vllm.train.config import TrainConfig
from extemb_vllm.train.distributed import Team

from .conftest import TINY_TEXT

pytestmark = pytest.mark.engine  # starts processes of a torch.distributed group (make test-fast skips)

BIN = Path(sys.executable).parent


def _texts(root: Path) -> tuple[list[str], list[str]]:
    (root / "texts").mkdir()
    (root / "held").mkdir()
    for i, name in enumerate("abcdef"):  # six documents, each the text turned by a different amount
        (root / "texts" / f"{name}.txt").write_text(TINY_TEXT[i * 97 :] + TINY_TEXT[: i * 97])
    (root / "held" / "h.txt").write_text(TINY_TEXT[::-1])
    return [str(root / "texts")], [str(root / "held")]


def _config(tiny_checkpoint, tmp_path: Path, out: str, **kw) -> TrainConfig:
    data, held = _texts(tmp_path) if not (tmp_path / "texts").exists() else ([str(tmp_path / "texts")],
                                                                             [str(tmp_path / "held")])
    base = dict(model=str(tiny_checkpoint), data=data, heldout=held, out=str(tmp_path / out), sample_len=768,
                chunk_len=256, k_ladder=[2, 4], steps=3, eval_every=2, eval_samples=1, eval_ks=[4], save_every=2,
                ema=0.5, recall=0.5, lr=1e-3, warmup=1, cache_dir=str(tmp_path / "cache"))
    return TrainConfig(**(base | kw))


def _rank(rank: int, world: int, port: int, cfg: TrainConfig):
    """One rank of a gloo group (torch.multiprocessing.spawn): the trainer with its Team."""
    import torch.distributed as dist

    from extemb_vllm.train.trainer import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    train(cfg, team=Team(rank=rank, world=world, runner="test (spawn)", owns_group=True))


def _train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, open(out / "log.jsonl")) if r["kind"] == "train"]


def test_two_ranks_give_one_process_weights_on_the_same_global_batch(tiny_checkpoint, tmp_path):
    """2 ranks x 2 samples against 1 process x 4 samples, both at the rate the global batch of 4 gets:
    the same samples, k and recall draws, per-sample losses, live weights and moving average."""
    import torch.multiprocessing as mp

    from extemb_vllm.bench.servers import free_port
    from extemb_vllm.train.trainer import EMA_WEIGHTS, train

    ddp = _config(tiny_checkpoint, tmp_path, "ddp", accum=2)
    mp.spawn(_rank, args=(2, free_port(), ddp), nprocs=2, join=True)
    # one process, 4 samples per step, told that --lr is meant for a batch of 2 (as each rank was)
    one = _config(tiny_checkpoint, tmp_path, "one", accum=4, lr_batch=2)
    torch.set_num_threads(1)
    try:
        train(one)
    finally:
        torch.set_num_threads(os.cpu_count())
    a, b = _train_records(Path(ddp.out)), _train_records(Path(one.out))
    assert [(r["ks"], r["sample_kinds"], r["samples"], r["global_batch"]) for r in a] == \
        [(r["ks"], r["sample_kinds"], r["samples"], r["global_batch"]) for r in b]
    assert {"text", "recall"} <= {k for r in a for k in r["sample_kinds"]}
    assert [r["lr"] for r in a] == pytest.approx([r["lr"] for r in b]) and a[-1]["lr"] == pytest.approx(1e-3 * 2**0.5)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    session = next(r for r in map(json.loads, open(Path(ddp.out) / "log.jsonl")) if r["kind"] == "session")
    assert (session["world"], session["backend"], session["global_batch"]) == (2, "gloo", 4)
    assert len({m["pid"] for m in session["ranks"]}) == 2
    init = {k: v for k, v in load_file(str(Path(tiny_checkpoint) / "embedder.safetensors")).items()}
    for name in ("embedder.safetensors", EMA_WEIGHTS):
        got, want = load_file(str(Path(ddp.out) / name)), load_file(str(Path(one.out) / name))
        assert any(not torch.allclose(want[k], init[k].to(want[k].dtype)) for k in want)  # training moved them
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    # rank 0 alone evaluated and logged; the other rank wrote nothing beside it
    assert [r["step"] for r in map(json.loads, open(Path(ddp.out) / "log.jsonl")) if r["kind"] == "eval"] == [0, 2, 3]


def test_share_gives_each_rank_its_own_block():
    draws = list(range(6))
    shares = [Team(rank=r, world=3).share(draws) for r in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="do not split"):
        Team(rank=0, world=4).share(draws)


def _torchrun(args: list[str], log: Path) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(BIN / "extemb"),
           "train", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)


def test_torchrun_two_ranks_end_to_end_and_resume(tiny_checkpoint, tmp_path):
    """`torchrun --nproc-per-node 2 --no-python extemb train ...` as the README writes it, then the same
    with --resume and more steps; the run exports like any other."""
    from extemb_vllm.train.export import export_embedder

    data, held = _texts(tmp_path)
    out = tmp_path / "run"
    args = ["--model", str(tiny_checkpoint), "--data", *data, "--heldout", *held, "--out", str(out),
            "--sample-len", "48", "--chunk-len", "12", "--k-ladder", "2,4", "--accum", "1", "--eval-every", "2",
            "--eval-samples", "1", "--eval-ks", "4", "--save-every", "2", "--ema", "0.5",
            "--cache-dir", str(tmp_path / "cache")]
    first = _torchrun([*args, "--steps", "4"], tmp_path / "first.log")
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    again = _torchrun([*args, "--steps", "6", "--resume"], tmp_path / "again.log")
    assert again.returncode == 0, (tmp_path / "again.log").read_text()[-3000:]
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["samples"] for r in recs if r["kind"] == "train"] == [2, 4, 6, 8, 10, 12]
    sessions = [r for r in recs if r["kind"] == "session"]
    assert [(s["step"], s["runner"], s["world"], s["backend"], s["global_batch"]) for s in sessions] == [
        (0, "torchrun", 2, "gloo", 2), (4, "torchrun", 2, "gloo", 2)]
    assert torch.load(out / "train-state.pt", weights_only=True)["ema_updates"] == 6
    rec = json.loads(export_embedder(out, tmp_path / "ship.safetensors", ema=True).with_suffix(".json").read_text())
    assert rec["samples"] == 12 and [s["config"]["accum"] for s in rec["sessions"]] == [1, 1]
