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
    accum: int = 2
    lr: float = 2e-4
    warmup: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 25
    eval_samples: int = 8
    eval_ks: list[int] = field(default_factory=lambda: [8, 32])
    save_every: int = 25
    device: str | None = None
    grad_ckpt: bool | None = None  # default: on CUDA
    bf16: bool | None = None  # bf16 autocast and a bf16 frozen LLM; default: on CUDA
    seed: int = 0
    cache_dir: str = "data/cache"
    ema: float = 0.0  # decay of the weights' moving average (0: none), e.g. 0.98: ~50 updates
    # weight of KL(full-context teacher || slots) in the loss, (1 - w) * CE + w * KL; 0: the LM loss alone
    distill: float = 0.0
    distill_top: int = 64  # the teacher's most likely next tokens kept per position
    recall: float = 0.0  # share of samples that are synthetic recall samples (train/recall.py)
    recall_answer_share: float = 0.5  # share of a recall sample's loss carried by its answers
