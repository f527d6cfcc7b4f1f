"""What one optimiser step does, whoever runs it (train/distributed.py): where its samples come
from (`SampleStream`), how it computes on the device (`Compute`), and the step itself (`Step`):
each sample's loss and gradient, averaged over the global batch, the clip, the optimiser, the
learning-rate schedule, and the moving average of the weights.

The learning rate follows the global batch by the square-root rule of adaptive optimisers
(Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", 2022):
`--lr` is the rate for a global batch of `--lr-batch` samples (default: `--accum`, one
process's batch), and a step of B samples uses `lr * sqrt(B / lr_batch)`. One process keeps
exactly `--lr`; W ranks of `--accum` samples each use `lr * sqrt(W)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig
from .data import WindowSampler
from .recall import RecallMaker, RecallSample, answer_weights
from .slot_attention import available as slot_attention_available
from .two_stream import two_stream_forward


@dataclass(frozen=True)
class Compute:
    """How the steps compute on a device. Pure: a test checks the CUDA choice on a machine without one."""

    device: torch.device
    bf16: bool  # a bf16 frozen LLM and bf16 autocast
    checkpoint: bool  # recompute the embedder's and the frozen LLM's layers in the backward pass
    attention: str  # the raw rows' attention: "cpu-slot-kernel" | "sdpa-masked" (two_stream.py)


def compute_plan(cfg: TrainConfig, device: torch.device) -> Compute:
    cuda = device.type == "cuda"
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda
    checkpoint = cfg.grad_ckpt if cfg.grad_ckpt is not None else cuda
    attention = "cpu-slot-kernel" if slot_attention_available(device) else "sdpa-masked"
    return Compute(device, bf16, checkpoint, attention)


@dataclass
class Draw:
    """One sample of the stream: its window, its k, and the recall sample made from it (or None)."""

    ids: torch.Tensor
    k: int
    recall: RecallSample | None

    @property
    def kind(self) -> str:
        return "text" if self.recall is None else "recall"


class SampleStream:
    """The seeded stream of training samples: windows of the training text, a k for each, and facts
    planted in a share of them (--recall). Every rank of a team draws all of it (cheap: random
    numbers and a slice) and trains on its own block, so the stream does not depend on who runs it."""

    def __init__(self, cfg: TrainConfig, train_docs: dict, tokenizer):
        self.cfg = cfg
        self.sampler = WindowSampler(train_docs, cfg.sample_len, seed=cfg.seed, align=cfg.window_align or cfg.chunk_len)
        self.k_rng = np.random.default_rng(cfg.seed + 1)
        self.recall_maker = RecallMaker(tokenizer, cfg.chunk_len, seed=cfg.seed + 2)

    def draw(self) -> Draw:
        ids = self.sampler.sample()
        # the draw is made for every sample, so the text and k streams stay the same whatever cfg.recall is
        made = self.recall_maker.make(ids) if self.recall_maker.rng.random() < self.cfg.recall else None
        return Draw(ids, int(self.k_rng.choice(self.cfg.k_ladder)), made)

    def rngs(self) -> dict:
        return {"sampler": self.sampler.rng, "k": self.k_rng, "recall": self.recall_maker.rng}

    def restore(self, states: dict):
        self.sampler.rng.bit_generator.state = states["sampler"]
        self.k_rng.bit_generator.state = states["k"]
        if "recall" in states:
            self.recall_maker.rng.bit_generator.state = states["recall"]


class Step:
    """The optimiser step: the objective's loss of each of this rank's samples, their gradients
    averaged over the global batch (the team's DDP), clipped; AdamW, the warm-up schedule, and the
    moving average of the weights (`ema`: rank 0's, None elsewhere)."""

    def __init__(self, cfg: TrainConfig, model, objective, team, compute: Compute):
        self.cfg, self.model, self.objective, self.team, self.compute = cfg, model, objective, team, compute
        self.global_batch = cfg.accum * team.world
        self.lr = cfg.lr * math.sqrt(self.global_batch / (cfg.lr_batch or cfg.accum))
        self.params = [p for p in model.embedder.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._warmup)
        self.ema = None
        if cfg.ema and team.chief:
            avg = torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema)
            self.ema = torch.optim.swa_utils.AveragedModel(model.embedder, multi_avg_fn=avg)
        team.wrap(model.embedder)

    def _warmup(self, step: int) -> float:
        return min(1.0, (step + 1) / max(self.cfg.warmup, 1))

    def follow_lr(self):
        """After loading a saved optimiser and schedule: the rate is this run's, not the saved one (the
        global batch, or --lr, may have changed between stretches of a run)."""
        self.sched.base_lrs = [self.lr for _ in self.sched.base_lrs]
        for group in self.opt.param_groups:
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * self._warmup(self.sched.last_epoch)

    def loss(self, draw: Draw) -> torch.Tensor:
        cfg, device = self.cfg, self.compute.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.compute.bf16):
            if draw.recall is not None:
                return two_stream_forward(self.model, draw.recall.ids.to(device), draw.k, cfg.chunk_len,
                                          row_len=cfg.raw_rows or None, checkpoint=self.compute.checkpoint,
                                          token_weight=answer_weights(draw.recall.answer, cfg.recall_answer_share)
                                          .to(device))
            return self.objective.loss(self.model, draw.ids.to(device), draw.k)

    def run(self, mine: list[Draw]) -> tuple[list[float], float]:
        """One optimiser step on this rank's samples: (their losses, the gradient norm before clipping)."""
        losses = []
        for i, draw in enumerate(mine):
            # one all-reduce per step: with the last sample's backward
            with self.team.averaging(self.model, sync=i == len(mine) - 1):
                loss = self.loss(draw)
                (loss / len(mine)).backward()
            losses.append(loss.item())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip).item()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model.embedder)
        return losses, grad_norm
