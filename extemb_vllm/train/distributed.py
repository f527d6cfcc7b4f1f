"""Who runs the training steps: one process, a `torchrun` rank, or a Ray Train worker.

The loop (trainer.py) is the same for all three; this module is the one place that knows
other processes may be taking part. A `Team` says how many processes there are, which one
this is and where it computes, and it does the few things that need all of them:

* the embedder, and only the embedder, is wrapped in torch DDP (gloo on CPUs, nccl on GPUs):
  a backward pass averages its gradients over the team, once per optimiser step. The frozen
  LLM is loaded by every process and never synchronised (it never changes).
* the samples: every rank draws the whole global step from the same seeded stream and trains
  on its own block of it (`share`), so no sample is used twice in a step and a team of W ranks
  with `accum` samples each draws exactly the samples one process with W x accum would draw.
* the numbers the log and the stopping rule need from every rank (`gather`, `slowest`);
  the moving average, evaluation, logging and checkpoints are rank 0's (`chief`).
* `checkpointed`: after rank 0 saved, every rank calls it; under Ray Train it reports the
  checkpoint to Ray's storage (a barrier across the workers).
"""

from __future__ import annotations

import gc
import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..machine import default_device


class _EncodeChunks(nn.Module):
    """What DDP wraps: the embedder with `encode_chunks` as its forward. DDP must see the forward
    to know that a backward whose gradients it averages follows."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, chunks, embed_tokens):
        return self.embedder.encode_chunks(chunks, embed_tokens)


class _SyncedEmbedder(nn.Module):
    """Stands in for `model.embedder` during a training step: the same `encode_chunks`, through DDP."""

    def __init__(self, ddp: nn.Module):
        super().__init__()
        self.ddp = ddp

    def encode_chunks(self, chunks, embed_tokens):
        return self.ddp(chunks, embed_tokens)


@dataclass
class Team:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    runner: str = "one process"  # "one process" | "torchrun" | "ray train"
    node: str = field(default_factory=socket.gethostname)  # where this rank runs (a host, a Ray node id)
    # called by every rank after rank 0 saved a checkpoint into the run directory (Ray Train reports it)
    on_checkpoint: Callable[[Path, dict], None] | None = None
    owns_group: bool = False  # this Team started the process group (torchrun) and ends it
    _ddp: nn.Module | None = None

    @property
    def chief(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.world > 1 else None

    def share(self, draws: list) -> list:
        """This rank's block of a global step's samples (the stream's order: rank 0 first)."""
        if len(draws) % self.world:
            raise ValueError(f"{len(draws)} samples do not split over {self.world} ranks")
        n = len(draws) // self.world
        return draws[self.rank * n : (self.rank + 1) * n]

    def wrap(self, embedder: nn.Module):
        """Wrap the embedder in DDP (a team of one keeps it as it is). Call once, after every rank
        loaded the same weights: DDP broadcasts rank 0's at construction all the same."""
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # gradients as views of DDP's buckets: no second copy of them (6.5 GB for Llama-2-7B's 8 layers)
            self._ddp = nn.parallel.DistributedDataParallel(_EncodeChunks(embedder), device_ids=ids,
                                                            gradient_as_bucket_view=True)

    @contextmanager
    def averaging(self, model, sync: bool):
        """Inside: `model.embedder` runs through DDP, and a backward all-reduces the gradients if
        `sync` (the last sample of the rank's share) or only accumulates them (the others)."""
        if self._ddp is None:
            yield
            return
        live, model.embedder = model.embedder, _SyncedEmbedder(self._ddp)
        try:
            with nullcontext() if sync else self._ddp.no_sync():
                yield
        finally:
            model.embedder = live

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def gather(self, values: list[float]) -> list[float]:
        """Every rank's values (the same number from each), in rank order."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts).tolist()

    def slowest(self, seconds: float) -> float:
        """The largest of the ranks' values: a step lasts as long as its slowest rank, and every rank
        must take the same decision from it (the --cpu-minutes / --minutes budgets)."""
        if self.world == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def members(self) -> list[dict]:
        """Where each rank runs: [{rank, node, pid}], for the log's session record."""
        me = {"rank": self.rank, "node": self.node, "pid": os.getpid()}
        if self.world == 1:
            return [me]
        out = [None] * self.world
        dist.all_gather_object(out, me)
        return out

    @contextmanager
    def rank0_first(self):
        """Rank 0 runs the block first (it writes shared caches: the token cache), the others after it."""
        if self.world > 1 and not self.chief:
            dist.barrier()
        yield
        if self.world > 1 and self.chief:
            dist.barrier()

    def checkpointed(self, out: Path, metrics: dict):
        if self.on_checkpoint is not None:
            self.on_checkpoint(out, metrics)

    def close(self):
        """End of training. Every rank waits for the others first (rank 0 may still be evaluating and
        saving), then DDP is freed before the group ends: DDP holds the group, and a gloo group freed
        later, as the interpreter shuts down, can abort the process (SIGABRT, "terminate called
        without an active exception")."""
        if self.world > 1:
            dist.barrier()
        if self._ddp is not None:
            self._ddp = None
            gc.collect()  # DDP's module sits in reference cycles: free it now, not at exit
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def one_process(device: str | None = None) -> Team:
    return Team(device=default_device(device))


def from_torchrun(device: str | None = None) -> Team:
    """A rank started by `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in the environment):
    one process per GPU (cuda:LOCAL_RANK, nccl) or per CPU share (gloo)."""
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = default_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Team(rank=rank, world=world, device=dev, runner="torchrun", owns_group=True)


def from_environment(device: str | None = None) -> Team:
    """A torchrun rank when torchrun started this process with more than one, else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return from_torchrun(device)
    return one_process(device)
