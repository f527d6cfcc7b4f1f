"""Perplexity with a bootstrap interval over scored blocks."""

from __future__ import annotations

import math

import numpy as np


def perplexity_with_interval(block_nll_sums, block_counts, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """(ppl, low, high): exp of mean token NLL, with a percentile bootstrap over blocks.

    Blocks, not tokens, are resampled: tokens of one block share their context
    and are far from independent, so a token-level bootstrap would be too narrow.
    """
    sums = np.asarray(block_nll_sums, dtype=np.float64)
    counts = np.asarray(block_counts, dtype=np.float64)
    ppl = math.exp(sums.sum() / counts.sum())
    if len(sums) < 2:
        return ppl, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    boot = np.exp(sums[idx].sum(1) / counts[idx].sum(1))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return ppl, float(lo), float(hi)
