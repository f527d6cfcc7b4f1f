"""The settings of a training run (`extemb train`): one dataclass, whose defaults the CLI shows."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.config import ExtEmbConfig


@dataclass
class TrainConfig:
    model: str
    data: list[str]
    out: str
    heldout: list[str] = field(default_factory=list)
    init_embedder: str | None = None
    sample_len: int = 2048
    chunk_len: int = 512
    k_ladder: list[int] = field(default_factory=lambda: list(ExtEmbConfig.k_ladder))  # the served ladder
    steps: int = 100
    cpu_minutes: float = 0.0  # stop once the steps have used this much CPU time per thread (0: no limit)
    minutes: float = 0.0  # stop once the steps have run this long, wall clock (0: no limit): a lent GPU's time
    accum: int = 2  # samples per optimiser step on each rank (the global batch: accum x ranks)
    lr: float = 2e-4
    lr_batch: int = 0  # the global batch at which `lr` is the rate; others scale it by sqrt (0: accum)
    warmup: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 25
    eval_samples: int = 8
    eval_ks: list[int] = field(default_factory=lambda: [8, 32])
    save_every: int = 25
    device: str | None = None
    grad_ckpt: bool | None = None  # recompute the embedder's and the frozen LLM's layers; default: on CUDA
    bf16: bool | None = None  # bf16 autocast and a bf16 frozen LLM; default: on CUDA
    seed: int = 0
    window_align: int = 0  # training windows start at multiples of this (0: the chunk length; 1: anywhere)
    cache_dir: str = "data/cache"
    ema: float = 0.0  # decay of the weights' moving average (0: none), e.g. 0.98: ~50 updates
    # weight of KL(full-context teacher || slots) in the loss, (1 - w) * CE + w * KL; 0: the LM loss alone
    distill: float = 0.0
    distill_top: int = 64  # the teacher's most likely next tokens kept per position
    recall: float = 0.0  # share of samples that are synthetic recall samples (train/recall.py)
    recall_answer_share: float = 0.5  # share of a recall sample's loss carried by its answers
    # key tokens (train/key_tokens.py): a text token's loss weight is 1 + key_weight * its long-context
    # gain in nats (clipped to key_cap); 0: every token alike
    key_weight: float = 0.0
    key_cap: float = 4.0
    # the content margin: on tokens long context helps, the right slots must beat another sample's
    # (the previous one's, at the same k) by `margin` nats; its weight in the loss (0: off)
    content_margin: float = 0.0
    margin: float = 0.25
    raw_rows: int = 0  # score only the first raw_rows tokens of each chunk (0: all); slots from whole chunks
