"""Perplexity by context length, PG19-style: the same last N tokens of each span,
scored given everything before them, for several total lengths and methods.

Targets are scored in blocks of `raw_tail` tokens. For a block [s, s+b):
  full        the whole span up to the block, one forward (if the base allows it)
  truncated   only the W - b raw tokens before the block: the model's window
  k<K>        compact embeddings (k=K) of older tokens + recent raw tokens + the block
  auto        as served: raw when it fits the window, else the smallest k that fits
  k<K>-mismatched  the control: compact embeddings of another span's tokens
  k<K>-stable / auto-stable  laid out by the append-stable rule (whole chunks, k by band) instead
              of window filling: what the rule that lets a growing chat reuse its cache costs
With `key_alpha`, every figure is also given on the key tokens: those whose log-probability
full attention raises by more than key_alpha nats over truncation (the frozen LLM's own
judgement of where long context matters; LongPPL's idea, Fang et al., ICLR 2025).
Whole-text perplexity averages mostly over tokens no context helps; both are reported.
Every LLM input of truncated / k / auto is at most W positions, so they are
compared at the same window. With `fill_window` (as served) the compressed methods
keep as many tokens before the block raw as the window holds beside the slots;
without it only the block is raw: the paper's stream 2, each block predicted from
compact slots of all the past plus its own raw tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model import ContextError
from .stats import change_vs_baseline_with_interval, gain_fraction_with_interval, perplexity_with_interval
from ..texts import cut_spans, read_texts


@dataclass
class PplResult:
    method: str
    length: int
    ppl: float | None  # None: the method cannot read this length (says `note`)
    ci_low: float | None = None
    ci_high: float | None = None
    n_tokens: int = 0
    n_blocks: int = 0
    ks: list[int] = field(default_factory=list)  # k used by the blocks (auto picks per block)
    max_llm_positions: int = 0
    note: str = ""
    # compressed methods: share of full attention's gain over `truncated` they recover, with
    # a paired bootstrap interval (None where full or truncated did not run on the same blocks)
    gain_fraction: float | None = None
    gain_low: float | None = None
    gain_high: float | None = None
    # compressed methods: ppl / ppl_truncated - 1 on the same blocks (paired interval); unlike
    # the share it needs no full attention, so it says "better than truncation?" past 8K too
    vs_truncated: float | None = None
    vs_truncated_low: float | None = None
    vs_truncated_high: float | None = None
    # the mismatched control: ppl / ppl of the same k with the right document's slots - 1, on
    # the same blocks (paired): above 0 with its interval clear of 0 = the slots carry content
    vs_matched: float | None = None
    vs_matched_low: float | None = None
    vs_matched_high: float | None = None
    # the append-stable rule: ppl / ppl of the same method laid out by window filling - 1, on the
    # same blocks (paired): what keeping a growing input's layout stable costs in quality
    vs_fill: float | None = None
    vs_fill_low: float | None = None
    vs_fill_high: float | None = None
    # with key tokens (`key_alpha`): the same figures on the tokens whose log-probability full attention
    # raises by more than key_alpha nats over truncation, as the frozen LLM itself judges them
    key_tokens: int = 0
    key_ppl: float | None = None
    key_ppl_low: float | None = None
    key_ppl_high: float | None = None
    key_gain_fraction: float | None = None
    key_gain_low: float | None = None
    key_gain_high: float | None = None
    key_vs_matched: float | None = None
    key_vs_matched_low: float | None = None
    key_vs_matched_high: float | None = None


@dataclass(frozen=True)
class Method:
    """One way to read a span: full attention, the window alone, or compressed (k=None: as served)."""

    kind: str  # "full", "truncated" or "compressed"
    k: int | None = None
    mismatched: bool = False  # the control: another span's tokens compressed in place of the real ones
    stable: bool = False  # the append-stable layout rule instead of window filling

    @property
    def name(self) -> str:
        if self.kind != "compressed":
            return self.kind
        return (("auto" if self.k is None else f"k{self.k}") + ("-stable" if self.stable else "")
                + ("-mismatched" if self.mismatched else ""))

    @property
    def compressed(self) -> bool:
        return self.kind == "compressed"

    def paired_with(self) -> "Method | None":
        """The method this one is read against on the same blocks: a control against the right
        document's slots, the append-stable rule against window filling."""
        if self.mismatched:
            return replace(self, mismatched=False)
        return replace(self, stable=False) if self.stable else None

    @classmethod
    def parse(cls, name: str) -> "Method":
        if name in ("full", "truncated"):
            return cls(name)
        base, *flags = name.split("-")
        if base != "auto" and not (base.startswith("k") and base[1:].isdigit() and int(base[1:]) >= 1):
            raise ValueError(f"unknown method {name!r}")
        if set(flags) - {"stable", "mismatched"}:
            raise ValueError(f"unknown method {name!r}")
        return cls("compressed", None if base == "auto" else int(base[1:]), "mismatched" in flags, "stable" in flags)


def parse_methods(ks: list[str], mismatched: bool, stable: bool = False) -> list[Method]:
    """truncated, full, and per k (an integer or 'auto') the compressed method, with its
    mismatched control and its append-stable twin when asked for."""
    methods = [Method("truncated"), Method("full")]
    for k in ks:
        k = k.strip().lower()
        if k != "auto" and (not k.isdigit() or int(k) < 1):
            raise ValueError(f"--k takes integers >= 1 or 'auto', got {k!r}")
        m = Method("compressed", None if k == "auto" else int(k))
        methods.append(m)
        if mismatched and m.k is not None:
            methods.append(replace(m, mismatched=True))
        if stable:
            methods.append(replace(m, stable=True))
    return methods


@torch.no_grad()
def evaluate_ppl(model, tokenizer, text_paths, lengths, methods, window=None, raw_tail=None,
                 n_spans=8, score_tokens=1024, progress=True, fill_window=None,
                 key_alpha: float | None = None) -> list[PplResult]:
    W = window or model.ext.window
    B = raw_tail or model.ext.raw_tail
    if not 0 < B < W:
        raise ValueError(f"need 0 < raw_tail < window, got {B} and {W}")
    lengths = sorted(set(lengths))
    if score_tokens >= lengths[0]:
        raise ValueError(f"--score-tokens {score_tokens} must be below the shortest length {lengths[0]}")
    methods = [m if isinstance(m, Method) else Method.parse(m) for m in methods]
    streams = [torch.tensor(tokenizer(t).input_ids) for _, t in read_texts(text_paths)]
    spans = cut_spans(streams, lengths[-1], n_spans)
    if any(m.mismatched for m in methods) and len(spans) < 2:
        raise ValueError("the mismatched-context control needs at least 2 spans")
    names = {m.name for m in methods}
    if key_alpha is not None and not {"full", "truncated"} <= names:
        raise ValueError("key tokens are judged by full attention against truncation: both must be run")

    results = []
    bar = tqdm(total=len(lengths) * len(spans), desc="perplexity", unit="span", disable=not progress)
    for L in lengths:
        cache: dict = {}  # chunk content -> embedder output; shared by blocks, k and methods
        per = {m.name: {"lps": [], "sums": [], "counts": [], "ks": set(), "pos": 0, "note": ""} for m in methods}
        blocks = [(s, min(s + B, L)) for s in range(L - score_tokens, L, B)]
        for i, span in enumerate(spans):
            tok = span[-L:].to(model.device)
            other = spans[(i + 1) % len(spans)][-L:].to(model.device)
            for m in methods:
                acc = per[m.name]
                if acc["note"]:
                    continue
                try:
                    for lp, k, pos in _score_method(model, m, tok, other, blocks, W, cache, fill_window):
                        acc["lps"].append(lp.float().cpu())
                        acc["sums"].append(-lp.sum().item())
                        acc["counts"].append(lp.numel())
                        acc["pos"] = max(acc["pos"], pos)
                        if k:
                            acc["ks"].add(k)
                except ContextError as e:
                    acc["note"] = str(e)
            bar.update()
        key = _key_masks(per, key_alpha) if key_alpha is not None else None
        for m in methods:
            acc = per[m.name]
            if acc["note"] or not acc["counts"]:
                results.append(PplResult(m.name, L, None, note=acc["note"] or "not run"))
                continue
            ppl, lo, hi = perplexity_with_interval(acc["sums"], acc["counts"])
            r = PplResult(m.name, L, ppl, lo, hi, int(sum(acc["counts"])), len(acc["counts"]), sorted(acc["ks"]),
                          acc["pos"])
            base, full = per.get("truncated"), per.get("full")
            compressed = m.compressed
            if compressed and base and not base["note"]:
                r.vs_truncated, r.vs_truncated_low, r.vs_truncated_high = change_vs_baseline_with_interval(
                    base["sums"], acc["sums"], acc["counts"])
            twin = per.get(m.paired_with().name) if m.paired_with() else None
            if twin and not twin["note"]:
                paired = change_vs_baseline_with_interval(twin["sums"], acc["sums"], acc["counts"])
                if m.mismatched:
                    r.vs_matched, r.vs_matched_low, r.vs_matched_high = paired
                else:
                    r.vs_fill, r.vs_fill_low, r.vs_fill_high = paired
            if compressed and base and full and not (base["note"] or full["note"]):
                r.gain_fraction, r.gain_low, r.gain_high = gain_fraction_with_interval(
                    base["sums"], full["sums"], acc["sums"], acc["counts"])
            if key is not None:
                _key_figures(r, m, per, key)
            results.append(r)
    bar.close()
    return results


def _key_masks(per: dict, alpha: float) -> list[torch.Tensor] | None:
    """Per block, the key tokens: full attention's log-probability above truncation's by more than alpha
    (None where either could not run)."""
    full, base = per["full"], per["truncated"]
    if full["note"] or base["note"]:
        return None
    return [(f - t) > alpha for f, t in zip(full["lps"], base["lps"])]


def _key_sums(lps: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[list[float], list[int]]:
    return [-lp[m].sum().item() for lp, m in zip(lps, masks)], [int(m.sum()) for m in masks]


def _key_figures(r: PplResult, method: Method, per: dict, masks: list[torch.Tensor] | None):
    """Fill r's key-token figures: perplexity, share of full attention's gain, and the mismatched control
    against the right slots, each paired over the same blocks."""
    if masks is None:
        return
    sums, counts = _key_sums(per[method.name]["lps"], masks)
    r.key_tokens = int(sum(counts))
    if not r.key_tokens:
        return
    r.key_ppl, r.key_ppl_low, r.key_ppl_high = perplexity_with_interval(sums, counts)
    if method.compressed:
        base, _ = _key_sums(per["truncated"]["lps"], masks)
        full, _ = _key_sums(per["full"]["lps"], masks)
        r.key_gain_fraction, r.key_gain_low, r.key_gain_high = gain_fraction_with_interval(base, full, sums, counts)
        twin = method.paired_with()
        if method.mismatched and twin is not None and not per[twin.name]["note"]:
            right, _ = _key_sums(per[twin.name]["lps"], masks)
            r.key_vs_matched, r.key_vs_matched_low, r.key_vs_matched_high = change_vs_baseline_with_interval(
                right, sums, counts)


def _score_method(model, method: Method, tok, other, blocks, W, cache, fill_window=None):
    """Yield (log-probabilities of the block's tokens, k, llm_positions) for each target block."""
    L = tok.numel()
    if method.kind == "full":
        if L > model.max_positions:
            raise ContextError(f"{L} tokens exceed the base model's {model.max_positions} positions")
        s0 = blocks[0][0]
        lp, _ = model.score(tok, L - s0, window=L, raw_tail=L - 1)  # window=L: nothing compressed
        for s, e in blocks:
            yield lp[s - s0 : e - s0], None, L
        return
    for s, e in blocks:
        b = e - s
        if method.kind == "truncated":
            ids = tok[max(0, s - (W - b)) : e]
            lp, plan = model.score(ids, b, window=W, raw_tail=b)
        else:
            lp, plan = model.score(tok[:e], b, k=method.k, raw_tail=b, window=W, cache=cache,
                                   compact_ids=other if method.mismatched else None, fill_window=fill_window,
                                   append_stable=method.stable)
        yield lp, plan.k, plan.llm_length


def format_table(results: list[PplResult]) -> str:
    lengths = sorted({r.length for r in results})
    methods = list(dict.fromkeys(r.method for r in results))
    cell = {(r.method, r.length): r for r in results}
    w = 24
    lines = ["perplexity [95% bootstrap interval over blocks] by total tokens (context + scored)",
             f"{'method':<20}" + "".join(f"{L:>{w}}" for L in lengths)]
    for m in methods:
        row = f"{m:<20}"
        for L in lengths:
            r = cell.get((m, L))
            if r is None or r.ppl is None:
                row += f"{'does not fit':>{w}}"
            elif math.isnan(r.ci_low):
                row += f"{r.ppl:>{w}.2f}"
            else:
                row += f"{f'{r.ppl:.2f} [{r.ci_low:.2f},{r.ci_high:.2f}]':>{w}}"
        lines.append(row)
    scored = {r.length: r.n_tokens for r in results if r.ppl is not None}
    lines.append("scored tokens per cell: " + ", ".join(f"{L}: {n}" for L, n in sorted(scored.items())))
    key = {r.length: r.key_tokens for r in results if r.key_tokens}
    if key:
        lines.append("of them key tokens: " + ", ".join(f"{L}: {n}" for L, n in sorted(key.items())))
    for (attr, low, high), heading, fmt in (
            (("gain_fraction", "gain_low", "gain_high"),
             "share of full attention's gain over truncated that each method recovers", ".0%"),
            (("vs_truncated", "vs_truncated_low", "vs_truncated_high"),
             "perplexity change against truncated (below 0: better)", "+.1%"),
            (("vs_matched", "vs_matched_low", "vs_matched_high"),
             "the control: perplexity change of a wrong document's slots against the right one's "
             "(above 0: the slots carry content)", "+.1%"),
            (("vs_fill", "vs_fill_low", "vs_fill_high"),
             "the append-stable rule: perplexity change against the same method laid out by window filling "
             "(above 0: the stable layout costs quality)", "+.1%"),
            (("key_ppl", "key_ppl_low", "key_ppl_high"),
             "key tokens (full attention's log-probability above truncation's by more than the threshold): "
             "perplexity", ".2f"),
            (("key_gain_fraction", "key_gain_low", "key_gain_high"),
             "key tokens: share of full attention's gain over truncated", ".0%"),
            (("key_vs_matched", "key_vs_matched_low", "key_vs_matched_high"),
             "key tokens, the control: a wrong document's slots against the right one's (above 0: content)",
             "+.1%")):
        measured = [r for r in results if getattr(r, attr) is not None]
        if not measured:
            continue
        lines += ["", f"{heading} [95% paired bootstrap interval]",
                  f"{'method':<20}" + "".join(f"{L:>{w}}" for L in lengths)]
        for m in dict.fromkeys(r.method for r in measured):
            row = f"{m:<20}"
            for L in lengths:
                r = cell.get((m, L))
                v = None if r is None else getattr(r, attr)
                if v is None:
                    row += f"{'-':>{w}}"
                else:
                    row += f"{f'{v:{fmt}} [{getattr(r, low):{fmt}},{getattr(r, high):{fmt}}]':>{w}}"
            lines.append(row)
    return "\n".join(lines)


def write_json(results, path, meta: dict):
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=2)


def _yerr(rs, value="ppl", low="ci_low", high="ci_high", scale=1.0):
    """Asymmetric error bars of `value` from its bootstrap interval (none where it is undefined)."""
    def ok(x):
        return x is not None and not math.isnan(x)

    # max(0, .): a percentile interval need not contain the point estimate, and matplotlib refuses negative bars
    return [[scale * max(0.0, getattr(r, value) - getattr(r, low)) if ok(getattr(r, low)) else 0 for r in rs],
            [scale * max(0.0, getattr(r, high) - getattr(r, value)) if ok(getattr(r, high)) else 0 for r in rs]]


def plot(results: list[PplResult], path: str, title: str = ""):
    """Perplexity by context length (one row per method when there is one length) and a paired
    panel: at one length the share of full attention's gain each compressed method recovers,
    over several lengths (full attention ends at the base's range) the change against truncation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in results if r.ppl is not None]
    methods = list(dict.fromkeys(r.method for r in scored))
    lengths = sorted({r.length for r in scored})
    gains = [r for r in scored if r.gain_fraction is not None]
    changes = [r for r in scored if r.vs_truncated is not None]
    paired = ((_plot_share, gains) if len(lengths) == 1 and gains else (_plot_change, changes) if changes
              else None)  # (how to draw the second panel, what to draw)
    colour = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in both panels
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(12 if paired else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    if len(lengths) == 1:  # stacked points at one x hide each other: one row per method instead
        for i, r in enumerate(scored):
            ax.errorbar([r.ppl], [i], xerr=_yerr([r]), fmt="o", capsize=3, color=colour[r.method])
        ax.set_yticks(range(len(scored)), [r.method for r in scored])
        ax.invert_yaxis()
        ax.set_xlabel(f"perplexity of the scored tokens (total {lengths[0]} tokens, 95% interval)")
    else:
        for m in methods:
            rs = [r for r in scored if r.method == m]
            style = "--" if Method.parse(m).mismatched else "-"
            ax.errorbar([r.length for r in rs], [r.ppl for r in rs], yerr=_yerr(rs), fmt=style + "o", capsize=3,
                        label=m, markersize=4, color=colour[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total tokens (context + scored)")
        ax.set_ylabel("perplexity of the scored tokens")
        ax.legend(fontsize=8)
    ax.set_title(title or "perplexity by context length")
    ax.grid(alpha=0.3)
    if paired:
        draw, cells = paired
        draw(axes[0][1], cells, colour)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_share(ax, gains: list[PplResult], colour: dict):
    xs = np.arange(len(gains))
    key = [r for r in gains if r.key_gain_fraction is not None]
    width = 0.4 if key else 0.6
    err = _yerr(gains, "gain_fraction", "gain_low", "gain_high", scale=100)
    ax.bar(xs - (width / 2 if key else 0), [100 * r.gain_fraction for r in gains], width, yerr=err, capsize=3,
           color=[colour[r.method] for r in gains], label="all scored tokens" if key else None)
    if key:  # beside each method its share on key tokens, hatched
        err = _yerr(key, "key_gain_fraction", "key_gain_low", "key_gain_high", scale=100)
        ax.bar([x + width / 2 for x, r in zip(xs, gains) if r.key_gain_fraction is not None],
               [100 * r.key_gain_fraction for r in key], width, yerr=err, capsize=3, hatch="//", alpha=0.6,
               color=[colour[r.method] for r in key], label="key tokens")
    ax.set_xticks(xs, [r.method for r in gains], rotation=20)
    ax.axhline(0, color="black", lw=1, ls="--", label="truncated (0%)")
    ax.axhline(100, color="gray", lw=1, ls=":", label="full attention (100%)")
    ax.set_ylabel("share of full attention's gain over truncation (%)")
    ax.set_title("what the compact slots recover (95% paired interval)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def _plot_change(ax, changes: list[PplResult], colour: dict):
    for m in dict.fromkeys(r.method for r in changes):
        rs = [r for r in changes if r.method == m]
        err = _yerr(rs, "vs_truncated", "vs_truncated_low", "vs_truncated_high", scale=100)
        ax.errorbar([r.length for r in rs], [100 * r.vs_truncated for r in rs], yerr=err, capsize=3, markersize=4,
                    fmt=("--" if Method.parse(m).mismatched else "-") + "o", label=m, color=colour[m])
    ax.axhline(0, color="black", lw=1, ls="--", label="truncated")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("total tokens (context + scored)")
    ax.set_ylabel("perplexity change against truncation (%)")
    ax.set_title("below 0: better than truncation (95% paired interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
