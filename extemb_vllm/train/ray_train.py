"""`extemb train ... --ray-workers N [--gpu]`: the same training loop on a Ray cluster, under Ray
Train's `TorchTrainer` (Ray is already the project's cluster layer: examples/ray/).

Ray Train starts N workers (one GPU each with --gpu, else --ray-cpus-per-worker CPUs), sets up
torch.distributed between them (nccl on GPUs, gloo on CPUs) and restarts them when one fails.
Each worker runs `trainer.train` with a `Team` built from Ray Train's context; rank 0 keeps the
run in a scratch directory and every checkpoint goes to Ray Train's storage
(`<storage>/<name>/step-NNNNNN/`: the run's files, log included). A worker that dies takes the
group down and Ray Train starts it again from the last checkpoint (up to --ray-max-failures
times); running the same command again, under the same name and storage, resumes the same way.
When the run ends, the last checkpoint's files are copied to --out, so `extemb export --run`,
`train-curves` and `compare` read it like any run.

Storage: by default the parent of --out, a local path; on several machines it must be one that
every node sees (NFS, or an s3:// / gs:// URI: --ray-storage).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

from .config import TrainConfig

PATH_FIELDS = ("model", "out", "init_embedder", "cache_dir")  # and the lists `data`, `heldout`


def absolute(cfg: TrainConfig) -> TrainConfig:
    """The config with every path absolute: a worker may start in another directory."""
    kw = asdict(cfg)
    for name in PATH_FIELDS:
        if kw[name]:
            kw[name] = str(Path(kw[name]).resolve())
    kw["data"] = [str(Path(p).resolve()) for p in cfg.data]
    kw["heldout"] = [str(Path(p).resolve()) for p in cfg.heldout]
    return TrainConfig(**kw)


def train_on_ray(cfg: TrainConfig, workers: int, gpu: bool = False, cpus_per_worker: float = 1,
                 address: str | None = None, storage: str | None = None, placement: str = "PACK",
                 max_failures: int = 3) -> Path:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise ValueError(f"--ray-workers must be >= 1, got {workers}")
    cfg = absolute(cfg)
    out = Path(cfg.out)
    # RAY_ADDRESS (or --ray-address) joins a running cluster; without one, a local Ray for this run
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    per_worker = {"CPU": cpus_per_worker} | ({"GPU": 1} if gpu else {})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": asdict(cfg), "threads": max(1, int(cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=per_worker,
                                     placement_strategy=placement),
        run_config=RunConfig(name=out.name, storage_path=storage or str(out.parent),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.checkpoint.to_directory(str(out))  # the last checkpoint's files, where --out says
    ray.shutdown()
    return out


def _worker(config: dict):
    """One Ray Train worker: its Team, its scratch run directory (from the last checkpoint when Ray
    Train restarts it, or the run is started again under the same name), the loop."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from .distributed import Team
    from .trainer import train

    torch.set_num_threads(config["threads"])
    cfg = TrainConfig(**{f.name: config["cfg"][f.name] for f in fields(TrainConfig)})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def report(out: Path, metrics: dict):
        # every rank reports (a barrier); rank 0 hands over the run directory as the checkpoint
        ckpt = ray.train.Checkpoint.from_directory(str(out)) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step-{metrics['step']:06d}")

    team = Team(rank=rank, world=world, device=ray.train.torch.get_device(), runner="ray train",
                node=ray.get_runtime_context().get_node_id(), on_checkpoint=report)
    scratch = Path(tempfile.mkdtemp(prefix=f"extemb-train-rank{rank}-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(scratch))
        train(cfg, resume=checkpoint is not None, team=team, run_dir=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
