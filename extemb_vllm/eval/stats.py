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
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample of blocks without tokens (key tokens)
        boot = np.exp(sums[idx].sum(1) / counts[idx].sum(1))
    lo, hi = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return ppl, float(lo), float(hi)


def _paired_bootstrap(stat, sums: list, block_counts, n_boot: int, seed: int, level: float):
    """(point, low, high) of `stat(*perplexities)` for methods scored on the same blocks: the
    blocks are resampled jointly (paired), so the interval is of the difference, not of
    several noisy levels."""
    sums = [np.asarray(x, dtype=np.float64) for x in sums]
    counts = np.asarray(block_counts, dtype=np.float64)
    if any(len(x) != len(counts) for x in sums):
        raise ValueError("a paired comparison needs the methods scored on the same blocks")

    def at(idx):
        n = counts[idx].sum(-1)
        return stat(*(np.exp(x[idx].sum(-1) / n) for x in sums))

    with np.errstate(divide="ignore", invalid="ignore"):  # e.g. full == baseline: no gain to share (nan)
        point = float(at(np.arange(len(counts))))
        if len(counts) < 2 or not np.isfinite(point):
            return point, float("nan"), float("nan")
        boot = at(np.random.default_rng(seed).integers(0, len(counts), size=(n_boot, len(counts))))
    lo, hi = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def gain_fraction_with_interval(baseline_sums, full_sums, method_sums, block_counts, n_boot: int = 1000,
                                seed: int = 0, level: float = 0.95):
    """(fraction, low, high): the share of full attention's perplexity gain over the baseline
    that a method recovers, (ppl_base - ppl_method) / (ppl_base - ppl_full): 1 = as good as
    full attention, 0 = no better than the baseline, below 0 = worse than it. Paired bootstrap."""
    return _paired_bootstrap(lambda pb, pf, pm: (pb - pm) / (pb - pf), [baseline_sums, full_sums, method_sums],
                             block_counts, n_boot, seed, level)


def change_vs_baseline_with_interval(baseline_sums, method_sums, block_counts, n_boot: int = 1000,
                                     seed: int = 0, level: float = 0.95):
    """(change, low, high): ppl_method / ppl_base - 1 (below 0 = better than the baseline), with a
    paired bootstrap interval. Defined where full attention is out of range too (past 8K)."""
    return _paired_bootstrap(lambda pb, pm: pm / pb - 1, [baseline_sums, method_sums], block_counts,
                             n_boot, seed, level)
