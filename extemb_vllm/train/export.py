"""Ship a training run's embedder: bf16 safetensors plus a JSON record beside it.

The record says what the weights are (digest, size, base model, ExtEmb settings) and
how they came to be (the run's command settings, steps, samples and tokens seen, the
machines it ran on, its held-out losses, and the record of the weights it started from
when it continued earlier ones), so a shipped file can always be traced back to its runs. `extemb build` picks up the file at `SHIPPED_EMBEDDER` for the embedded
default; `--out` elsewhere exports for any other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.checkpoint import BUILD_INFO, DEFAULT_GGUF_FILE, SHIPPED_EMBEDDER
from .trainer import EMA_WEIGHTS, INIT_RECORD, parent_record

MAX_SHIPPED_BYTES = 64 * 2**20  # what the package may carry


def export_embedder(run_dir: str | Path, out: str | Path | None = None, note: str = "", ema: bool = False) -> Path:
    """`ema`: ship the run's moving average of the weights (`extemb train --ema`) instead of the live ones."""
    run_dir, out = Path(run_dir), Path(out) if out else SHIPPED_EMBEDDER
    shipping = out.resolve() == SHIPPED_EMBEDDER.resolve()  # into the package, as the default's embedder
    cfg = json.loads((run_dir / "train-config.json").read_text())
    info = json.loads((Path(cfg["model"]) / BUILD_INFO).read_text())
    model_cfg = json.loads((Path(cfg["model"]) / "config.json").read_text())
    if shipping and Path(info["source"]).name != DEFAULT_GGUF_FILE:
        raise ValueError(f"{run_dir} trained the embedder of {info['source']}, not of the embedded default "
                         f"({DEFAULT_GGUF_FILE}): export it with --out elsewhere")
    # the weights are those of the last checkpoint; the log may run a little past it
    state = torch.load(run_dir / "train-state.pt", weights_only=True)
    step = int(state["step"])
    weights = run_dir / (EMA_WEIGHTS if ema else "embedder.safetensors")
    if ema and not weights.exists():
        raise FileNotFoundError(f"{run_dir} keeps no moving average of its weights (train it with --ema)")
    log = [r for r in map(json.loads, open(run_dir / "log.jsonl")) if r["step"] <= step]
    trained = [r for r in log if r["kind"] == "train"]
    if not trained:
        raise ValueError(f"{run_dir} has no training step yet")
    evals = [r for r in log if r["kind"] == "eval"]
    # taken when the run started (a run that continued the shipped weights replaces them on
    # export); runs older than that record are read from the file itself, before writing
    init = run_dir / INIT_RECORD
    parent = json.loads(init.read_text()) if init.exists() else parent_record(cfg.get("init_embedder"))

    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k).to(torch.bfloat16).contiguous() for k in f.keys()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**metadata, "trained_steps": str(step)})
    size = tmp.stat().st_size
    if shipping and size > MAX_SHIPPED_BYTES:
        tmp.unlink()
        raise ValueError(f"{size / 2**20:.1f} MiB is over the package's {MAX_SHIPPED_BYTES / 2**20:.0f} MiB")
    tmp.replace(out)

    record = {
        "weights": out.name,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "bytes": size,
        "dtype": "bfloat16",
        "parameters": sum(v.numel() for v in tensors.values()),
        "base_model": Path(info["source"]).name,
        "extemb": model_cfg.get("extemb"),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run": str(run_dir),
        "train_config": cfg,
        "steps": step,
        # which weights of the run these are: the live ones, or their moving average
        "averaged": {"decay": cfg.get("ema"), "updates": int(state.get("ema_updates", 0))} if ema else None,
        "samples": trained[-1]["samples"],
        # CPU time per thread of the run's steps up to these weights (--cpu-minutes), where the run kept it
        "cpu_minutes": state.get("busy_minutes"),
        "training_tokens": trained[-1]["samples"] * cfg["sample_len"],
        # with the runs these weights continued (`initialised_from`)
        "samples_total": trained[-1]["samples"] + (parent or {}).get("samples_total", (parent or {}).get("samples", 0)),
        "k_seen": {str(k): sum(r["ks"].count(k) for r in trained) for k in cfg["k_ladder"]},
        "sessions": [{k: r.get(k) for k in ("step", "samples", "machine", "device", "started_at", "config")}
                     for r in log if r["kind"] == "session"],
        "heldout_reference": next((r for r in log if r["kind"] == "reference"), None),
        "heldout_eval_first": evals[0] if evals else None,
        "heldout_eval_last": evals[-1] if evals else None,
        "initialised_from": parent,
        "note": note,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return out
