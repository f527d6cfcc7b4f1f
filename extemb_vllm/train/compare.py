"""`extemb compare`: a cheap paired held-out figure for two or more embedders (ship or not).

Every embedder is scored with the two-stream pass on the same fixed held-out samples
at the same k (the trainer's eval, more samples), and each is compared with the first
(the shipped one) per sample, so the interval is of the difference, not of two noisy
levels. The share of the way from no context to full raw context puts the losses on
one scale. Minutes on two CPU cores where `extemb eval ppl` at 8K takes an hour.

Beside the whole text, the same figures on key tokens (where the frozen LLM itself gains
from the whole window over the token's own chunk: what the slots have to carry) and, with
the mismatched control, the paired change when each window reads another window's slots:
whole-text loss dilutes both into the many tokens no context helps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model.checkpoint import load_embedder_weights, load_model
from .data import WindowSampler, tokenize_cached
from .key_tokens import frozen_logprobs
from .recall import RecallMaker
from .trainer import evaluate
from .two_stream import compact_slots, two_stream_forward


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """(mean of b - a, low, high): percentile bootstrap over the paired samples (those where both are defined)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    d = d[np.isfinite(d)]
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.quantile(d[idx].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


@torch.no_grad()
def _logprobs(model, samples, k: int, chunk_len: int, bf16: bool, wrong: list | None = None) -> list[torch.Tensor]:
    """Per sample, the two-stream log-probabilities of the tokens of chunks 1.. (in order); with `wrong`,
    reading the slots of those samples' chunks instead of their own (the mismatched control)."""
    out = []
    for i, ids in enumerate(samples):
        ids = ids.to(model.device)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            compact = None if wrong is None else compact_slots(model, wrong[i].to(model.device), k, chunk_len)
            _, lp, _ = two_stream_forward(model, ids, k, chunk_len, return_logprobs=True, compact=compact)
        out.append(lp.float().cpu())
    return out


def _mean_loss(lps: list[torch.Tensor], masks: list[torch.Tensor]) -> list[float]:
    """Per sample, the mean negative log-probability over the masked tokens (nan where none is)."""
    return [float(-lp[m].mean()) if m.any() else float("nan") for lp, m in zip(lps, masks)]


def compare_embedders(model_dir: str, embedders: list[str], texts: list[str], n_samples: int = 16,
                      sample_len: int = 4096, chunk_len: int = 512, ks=(8, 16, 32), bf16: bool | None = None,
                      cache_dir: str = "data/cache", recall: bool = False, key_alpha: float | None = 0.5,
                      mismatched: bool = False) -> dict:
    """{"references": {...}, "embedders": {path: {k: [loss per sample]}}, "vs_first": {path: {k: (d, lo, hi)}}};
    with `key_alpha`, the same over each window's key tokens ("key": the tokens whose log-probability the
    frozen LLM raises by more than key_alpha nats when it reads the whole window instead of the token's own
    chunk); with `mismatched`, every embedder also read through the slots of another window (the next
    one's) and the paired change of that control against the right slots ("content", above 0: the slots
    carry the document); with `recall`, the answers of facts planted in the same windows ("recall_*")."""
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() if bf16 is None else bf16
    model, tok = load_model(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.embedder.float()
    # `texts` are held-out texts (e.g. data/*/heldout): the same fixed windows for every embedder
    samples = WindowSampler(tokenize_cached(texts, tok, cache_dir), sample_len).fixed(n_samples)
    wrong = samples[1:] + samples[:1] if mismatched else None
    full, alone = [], []
    for ids in samples:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            f, a = frozen_logprobs(model, ids.to(model.device), chunk_len)
        full.append(f.float().cpu())
        alone.append(a.float().cpu())
    t = torch.arange(chunk_len, sample_len)
    text_mask = [t % chunk_len != 0] * n_samples  # chunks 1.., without each chunk's first token
    groups = {"text": text_mask}
    if key_alpha is not None:
        groups["key"] = [(f - a > key_alpha) & m for f, a, m in zip(full, alone, text_mask)]
    res = {"meta": dict(model=str(model_dir), texts=list(texts), samples=n_samples, sample_len=sample_len,
                        chunk_len=chunk_len, ks=list(ks), bf16=bf16, recall=recall, key_alpha=key_alpha,
                        mismatched=mismatched, sha256={str(p): _sha256(p) for p in embedders})}
    for g, masks in groups.items():
        prefix = "" if g == "text" else "key_"
        res[f"{prefix}references"] = {"full_context_per_sample": _mean_loss(full, masks),
                                      "no_context_per_sample": _mean_loss(alone, masks),
                                      "tokens_per_sample": [int(m.sum()) for m in masks]}
        for name in ("full_context", "no_context"):
            res[f"{prefix}references"][name] = float(np.nanmean(res[f"{prefix}references"][f"{name}_per_sample"]))
        res.update({f"{prefix}embedders": {}, f"{prefix}vs_first": {}, f"{prefix}share_of_gap": {}})
        if mismatched:
            res.update({f"{prefix}mismatched": {}, f"{prefix}content": {}})
    planted = [RecallMaker(tok, chunk_len, seed=4321).make(ids) for ids in samples] if recall else []
    if recall:
        res.update(recall_embedders={}, recall_vs_first={})
    for path in tqdm(embedders, desc="embedders", unit="embedder"):
        load_embedder_weights(model.embedder, path)
        for k in ks:
            lps = _logprobs(model, samples, k, chunk_len, bf16)
            lps_wrong = _logprobs(model, samples, k, chunk_len, bf16, wrong=wrong) if mismatched else None
            for g, masks in groups.items():
                prefix = "" if g == "text" else "key_"
                res[f"{prefix}embedders"].setdefault(path, {})[str(k)] = _mean_loss(lps, masks)
                if mismatched:
                    res[f"{prefix}mismatched"].setdefault(path, {})[str(k)] = _mean_loss(lps_wrong, masks)
        if recall:
            res["recall_embedders"][path] = evaluate(model, [p.ids for p in planted], ks, chunk_len, bf16,
                                                     targets=[p.answer for p in planted])
    for prefix in [""] + (["key_"] if key_alpha is not None else []) + (["recall_"] if recall else []):
        by_path = res[f"{prefix}embedders"]
        first = by_path[embedders[0]]
        for path, by_k in by_path.items():
            if path != embedders[0]:
                res[f"{prefix}vs_first"][path] = {k: paired_difference(first[k], v) for k, v in by_k.items()}
            if prefix != "recall_":
                refs = res[f"{prefix}references"]
                none, full_ = np.nanmean(refs["no_context_per_sample"]), np.nanmean(refs["full_context_per_sample"])
                res[f"{prefix}share_of_gap"][path] = {k: float((none - np.nanmean(v)) / (none - full_))
                                                      for k, v in by_k.items()}
                if mismatched:  # the wrong window's slots against the right ones: above 0 = content
                    res[f"{prefix}content"][path] = {k: paired_difference(v, res[f"{prefix}mismatched"][path][k])
                                                     for k, v in by_k.items()}
    return res


def format_comparison(res: dict) -> str:
    embedders = list(res["embedders"])
    ks = list(res["embedders"][embedders[0]])
    r = res["references"]
    lines = [f"held-out two-stream loss, {res['meta']['samples']} samples of {res['meta']['sample_len']} tokens "
             f"(no context {r['no_context']:.4f}, full raw context {r['full_context']:.4f}); "
             "[paired difference from the first embedder, 95% bootstrap over samples; below 0 = better]"]
    tables = [("text", "")]
    if "key_embedders" in res:
        kr = res["key_references"]
        tables.append((f"key tokens (the frozen LLM gains > {res['meta']['key_alpha']} nats from the whole window "
                       f"over the token's own chunk: {sum(kr['tokens_per_sample'])} of "
                       f"{sum(res['references']['tokens_per_sample'])} tokens; no context {kr['no_context']:.4f}, "
                       f"full {kr['full_context']:.4f})", "key_"))
    if res["meta"].get("recall"):
        tables.append(("recall answers (facts planted in the same windows)", "recall_"))
    for title, prefix in tables:
        lines.append(f"-- {title}")
        for path in embedders:
            lines.append(f"  {path}")
            for k in ks:
                cell = f"    k={k:<3} {np.nanmean(res[prefix + 'embedders'][path][k]):.4f}"
                if prefix + "share_of_gap" in res:
                    cell += f" ({res[prefix + 'share_of_gap'][path][k]:.0%} of the way from no context to full)"
                if path in res[prefix + "vs_first"]:
                    d, lo, hi = res[prefix + "vs_first"][path][k]
                    cell += f"  {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                if path in res.get(prefix + "content", {}):
                    d, lo, hi = res[prefix + "content"][path][k]
                    cell += f"  wrong window's slots {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                lines.append(cell)
    return "\n".join(lines)


def write_json(res: dict, path: str):
    Path(path).write_text(json.dumps(res, indent=2) + "\n")


def run_curves(run_dir: str | Path, weights: str = "ema") -> dict:
    """A run's held-out curve from its log: (samples, CPU-minutes of training, loss by k) per evaluation,
    for the moving average ("ema") or the live weights ("live"). CPU-minutes count the steps' own
    time, not the evaluations': their CPU time per thread where the log has it (a run paused with
    SIGSTOP does not count the pause), else their wall time; step 0 (no average yet) is the
    starting weights."""
    recs = [json.loads(line) for line in open(Path(run_dir) / "log.jsonl")]
    key = "ema_loss_by_k" if weights == "ema" else "loss_by_k"
    minutes, elapsed, sample_len = {0: 0.0}, 0.0, None
    for r in recs:
        if r["kind"] == "session":
            sample_len = r["config"]["sample_len"]
        elif r["kind"] == "train":  # older logs: wall time, or from the sample tokens and their rate
            wall = r.get("step_seconds", len(r["ks"]) * sample_len / r["tokens_per_s"])
            elapsed += r.get("busy_seconds", wall) / 60
            minutes[r["samples"]] = elapsed
    points = [(r["samples"], minutes[r["samples"]], r.get(key) or r["loss_by_k"]) for r in recs if r["kind"] == "eval"]
    ref = next((r for r in recs if r["kind"] == "reference"), None)
    return {"name": Path(run_dir).name, "points": points, "reference": ref}


def format_runs(curves: list[dict]) -> str:
    ks = list(curves[0]["points"][0][2])
    lines = [f"{'run':<24}{'samples':>8}{'CPU min':>9}" + "".join(f"{'k=' + k:>9}" for k in ks)]
    for c in curves:
        for samples, minutes, by_k in c["points"]:
            lines.append(f"{c['name']:<24}{samples:>8}{minutes:>9.1f}" + "".join(f"{by_k[k]:>9.4f}" for k in ks))
    return "\n".join(lines)


def plot_runs(curves: list[dict], png: str | Path, title: str = ""):
    """Held-out loss by k against samples (top row) and against CPU-minutes (bottom row), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(curves[0]["points"][0][2])
    fig, axes = plt.subplots(2, len(ks), figsize=(4.2 * len(ks), 7), squeeze=False)
    for col, k in enumerate(ks):
        for i, c in enumerate(curves):
            for row, x in enumerate(([p[0] for p in c["points"]], [p[1] for p in c["points"]])):
                axes[row][col].plot(x, [p[2][k] for p in c["points"]], "o-", color=f"C{i}", label=c["name"])
        ref = curves[0]["reference"]
        for row, xlabel in enumerate(("samples seen", "CPU-minutes of training")):
            ax = axes[row][col]
            if ref:
                ax.axhline(ref["full_context"], color="g", ls="--", lw=1, label="full raw context")
            ax.set_title(f"k={k}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out loss (chunks after the first)")
            ax.grid(alpha=0.3)
    _save(fig, axes, png, title or "fixed-budget comparison, held-out loss of the weights' moving average")


def arms_table(results: list[dict]) -> list[dict]:
    """One row per candidate of one or more `compare_embedders` results (the same baseline and windows):
    its run, CPU-minutes and samples (from the export record beside the weights), and its paired
    differences from the baseline on the whole text, on key tokens and on planted answers (with --recall),
    and its content control.

    A candidate that continued another candidate's weights (a new run from them: `initialised_from` in its
    record) counts the CPU-minutes of both, and its `lineage` names both runs, so it continues that arm's
    line in the plot."""
    rows = []
    for res in results:
        first = list(res["embedders"])[0]  # the digest when compared (the file may since have been replaced)
        baseline = res["meta"].get("sha256", {}).get(first) or _sha256(first)
        for path in list(res["embedders"])[1:]:
            rec_path = Path(path).with_suffix(".json")
            record = json.loads(rec_path.read_text()) if rec_path.exists() else {}
            lineage, minutes, rec = [], 0.0, record
            while rec and rec.get("sha256") != baseline:  # back to the weights the comparison started from
                own = rec.get("cpu_minutes") or _cpu_minutes_at(rec)
                minutes = None if own is None or minutes is None else minutes + own
                lineage.insert(0, Path(rec.get("run", path)).name)
                rec = rec.get("initialised_from") or {}
            row = {"weights": path, "run": Path(record.get("run", path)).name, "lineage": lineage or [Path(path).name],
                   "cpu_minutes": minutes if lineage else None, "samples": record.get("samples")}
            for prefix in ("", "key_", "recall_"):
                for k, v in res.get(prefix + "vs_first", {}).get(path, {}).items():
                    row[f"{prefix}vs_shipped_k{k}"] = v
                for k, v in res.get(prefix + "content", {}).get(path, {}).items():
                    row[f"{prefix}content_k{k}"] = v
            rows.append(row)
    return rows


def _sha256(path: str) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).exists() else None


def _cpu_minutes_at(rec: dict) -> float | None:
    """For records exported before they carried it: the run's logged CPU-minutes at the record's step."""
    log = Path(rec.get("run", "")) / "log.jsonl"
    if not log.exists():
        return None
    at = [r.get("busy_minutes") for r in map(json.loads, open(log)) if r["kind"] == "train" and r["step"] == rec["steps"]]
    return at[-1] if at else None


def format_arms(rows: list[dict]) -> str:
    present = {c for r in rows for c in r if "_k" in c}
    cols = [c for prefix in ("vs_shipped_k", "key_vs_shipped_k", "content_k", "key_content_k", "recall_vs_shipped_k")
            for c in sorted((c for c in present if c.startswith(prefix) and c[len(prefix):].isdigit()),
                            key=lambda c: int(c.rsplit("_k", 1)[1]))]
    lines = [f"{'run':<26}{'CPU min':>8}{'samples':>8}" + "".join(f"{c:>28}" for c in cols)]
    for r in sorted(rows, key=lambda r: (r["lineage"], r["cpu_minutes"] or 0)):
        minutes = f"{r['cpu_minutes']:.1f}" if r["cpu_minutes"] is not None else "-"
        cells = "".join(f"{f'{r[c][0]:+.4f} [{r[c][1]:+.4f},{r[c][2]:+.4f}]':>28}" if c in r else f"{'-':>28}"
                        for c in cols)
        lines.append(f"{' > '.join(r['lineage']):<26}{minutes:>8}{r['samples'] or '-':>8}" + cells)
    return "\n".join(lines)


def plot_arms(rows: list[dict], png: str | Path, title: str = ""):
    """Per k, the paired difference from the shipped weights against CPU-minutes, one line per arm: on the
    whole text, on key tokens, and the content control on key tokens (a wrong window's slots against the
    right one's: higher is more content)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({c.split("_k")[-1] for r in rows for c in r if c.startswith("vs_shipped_k")}, key=int)
    panels = [("vs_shipped_k", "whole text: loss - shipped's"), ("key_vs_shipped_k", "key tokens: loss - shipped's"),
              ("key_content_k", "key tokens: wrong window's slots - right's")]
    panels = [p for p in panels if any(f"{p[0]}{k}" in r for r in rows for k in ks)]
    fig, axes = plt.subplots(len(panels), len(ks), figsize=(5 * len(ks), 3.3 * len(panels)), squeeze=False)
    # one line per lineage that no other continues; a continuation's line starts with its parent's points
    lineages = sorted({tuple(r["lineage"]) for r in rows})
    lines = [a for a in lineages if not any(b != a and b[:len(a)] == a for b in lineages)]
    most = max((r["cpu_minutes"] for r in rows if r["cpu_minutes"] is not None), default=1.0)
    for (key, label), ax_row in zip(panels, axes):
        for k, ax in zip(ks, ax_row):
            for i, line in enumerate(lines):
                pts = sorted((r["cpu_minutes"], r[f"{key}{k}"]) for r in rows if tuple(r["lineage"]) == line[:len(
                    r["lineage"])] and f"{key}{k}" in r and r["cpu_minutes"] is not None)
                if not pts:
                    continue
                x = [p[0] for p in pts]
                y = [p[1][0] for p in pts]
                err = [[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]]
                ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=f"C{i}", label=" > ".join(line), markersize=4)
            ax.axhline(0, color="black", lw=1, ls="--")
            ax.set_title(f"k={k}: {label}", fontsize=9)
            ax.set_xlabel("CPU-minutes of training (per thread)")
            ax.set_xlim(0, most * 1.08)  # the shipped weights sit at (0, 0): every panel on the same axis
            ax.grid(alpha=0.3)
    _save(fig, axes, png, title or "arms at equal CPU-minutes, paired against the shipped weights (95% intervals)")


def _save(fig, axes, png, title: str):
    import matplotlib.pyplot as plt

    # every line in one legend: a line may be missing from the first panel (an arm without that k)
    named = {}
    for ax in (a for row in axes for a in row):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            named.setdefault(label, handle)
    axes[0][0].legend(named.values(), named.keys(), fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
