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


def gain_fraction_with_interval(baseline_sums, full_sums, method_sums, block_counts, n_boot: int = 1000,
                                seed: int = 0, level: float = 0.95):
    """(fraction, low, high): the share of full attention's perplexity gain over the baseline
    that a method recovers, (ppl_base - ppl_method) / (ppl_base - ppl_full): 1 = as good as
    full attention, 0 = no better than the baseline, below 0 = worse than it.

    The three were scored on the same blocks (same targets), so the bootstrap resamples
    blocks jointly (paired): the interval is of the difference, not of three noisy levels.
    """
    base, full, meth = (np.asarray(x, dtype=np.float64) for x in (baseline_sums, full_sums, method_sums))
    counts = np.asarray(block_counts, dtype=np.float64)
    if not len(base) == len(full) == len(meth) == len(counts):
        raise ValueError("the gain fraction needs the three methods scored on the same blocks")

    def frac(idx):
        n = counts[idx].sum(-1)
        pb, pf, pm = (np.exp(x[idx].sum(-1) / n) for x in (base, full, meth))
        return (pb - pm) / (pb - pf)

    with np.errstate(divide="ignore", invalid="ignore"):  # full == baseline: no gain to share (nan)
        point = float(frac(np.arange(len(counts))))
        if len(counts) < 2 or not np.isfinite(point):
            return point, float("nan"), float("nan")
        idx = np.random.default_rng(seed).integers(0, len(counts), size=(n_boot, len(counts)))
        boot = frac(idx)
    lo, hi = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)
