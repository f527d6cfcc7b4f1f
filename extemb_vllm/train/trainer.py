"""`extemb train`: train the embedder with the two-stream objective; the LLM stays frozen.

One command on CPU and CUDA (bf16 autocast and gradient checkpointing of the embedder's and the
frozen LLM's layers on CUDA, fp32 on CPU unless --bf16: worth it only on CPUs with bf16
instructions, AVX-512-BF16/AMX), gradient accumulation, checkpoints with --resume, a JSON-lines
log, a loss-curve PNG and held-out evaluation every N steps, and optionally an exponential
moving average of the embedder's weights (--ema), evaluated and saved beside the live ones:
with one sample per update the live weights jitter. The instruction-tuning stage is the same
command on another data path, started from the first stage's embedder (--init-embedder).

The loop below is the same whoever runs it: one process, a torchrun rank or a Ray Train worker
(`distributed.Team`, train/ray_train.py); what a step does is train/step.py, what a text
sample's loss is `TextObjective`. Rank 0 keeps the books (log, evaluation, checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..machine import machine
from ..model.checkpoint import load_embedder_weights, load_model, save_embedder_weights
from . import distributed
from .config import TrainConfig
from .data import WindowSampler, split_documents, tokenize_cached
from .distributed import Team
from .key_tokens import GainCache, frozen_logprobs, key_weights
from .recall import RecallMaker
from .step import SampleStream, Step, compute_plan
from .two_stream import compact_slots, teacher_topk, two_stream_forward

EMA_WEIGHTS = "embedder-ema.safetensors"  # the moving average of the weights, beside embedder.safetensors
INIT_RECORD = "initialised-from.json"  # the record of the --init-embedder weights, taken when the run starts


def parent_record(init_embedder: str | None) -> dict | None:
    """The record of the weights a run starts from (--init-embedder), if they have one that
    still matches them; None for a run from the base's own layers."""
    if not init_embedder:
        return None
    path = Path(init_embedder)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    rec_path = path.with_suffix(".json")
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else None
    if rec is None or rec.get("sha256") != sha:
        return {"weights": str(path), "sha256": sha, "note": "no record of these weights"}
    return rec


def seeds_drawn(record: dict | None, data: list[str], sample_len: int) -> dict[int, int]:
    """How many samples the runs behind a weights record (it and its `initialised_from` chain) drew
    from each seed on this data at this sample length: a run with the same seed draws the same
    windows again, from the first."""
    drawn: dict[int, int] = {}
    while record and "train_config" in record:
        tc = record["train_config"]
        if list(tc.get("data", [])) == list(data) and tc.get("sample_len") == sample_len:
            seed = tc.get("seed", 0)
            drawn[seed] = max(drawn.get(seed, 0), record.get("samples", 0))
        record = record.get("initialised_from")
    return drawn


def train(cfg: TrainConfig, resume: bool = False, team: Team | None = None, run_dir: str | Path | None = None) -> Path:
    """Train the embedder; `team` says who runs the steps (default: a torchrun rank when torchrun started
    this process, else this process alone), `run_dir` where this process keeps the run (default cfg.out)."""
    team = team or distributed.from_environment(cfg.device)
    out = Path(run_dir or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    compute = compute_plan(cfg, team.device)
    device, bf16 = compute.device, compute.bf16
    if bf16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # measured on an AVX2-only EPYC: a bf16 matmul ran 4x slower than fp32 (emulated)
        print(f"[extemb] warning: --bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}) "
              "is emulated and several times slower than fp32; drop --bf16 on this machine")
    if cfg.sample_len % cfg.chunk_len or cfg.sample_len // cfg.chunk_len < 2:
        raise ValueError(f"--sample-len {cfg.sample_len} must be >= 2 chunks of --chunk-len {cfg.chunk_len}")

    # The frozen LLM in bf16 under autocast (its compute dtype); the trained embedder in fp32.
    model, tok = load_model(cfg.model, dtype=torch.bfloat16 if bf16 else torch.float32, device=device)
    model.embedder.float()
    if cfg.init_embedder:
        load_embedder_weights(model.embedder, cfg.init_embedder)
    if compute.checkpoint:  # the frozen LLM's layers: two_stream_forward(checkpoint=True)
        model.embedder.body.gradient_checkpointing_enable()
    model.embedder.train()

    with team.rank0_first():  # rank 0 fills the token cache, the others read it
        docs = tokenize_cached(cfg.data, tok, cfg.cache_dir)
        held = tokenize_cached(cfg.heldout, tok, cfg.cache_dir) if cfg.heldout else None
    train_docs, held_docs = split_documents(docs, held)
    stream = SampleStream(cfg, train_docs, tok)
    eval_set = WindowSampler(held_docs, cfg.sample_len).fixed(cfg.eval_samples) if held_docs else []
    if cfg.recall and eval_set:  # held-out recall: the same texts with facts planted (fixed seed)
        held_maker = RecallMaker(tok, cfg.chunk_len, seed=4321)
        eval_recall = [held_maker.make(ids) for ids in eval_set]
    else:
        eval_recall = []

    gains = GainCache(cfg.cache_dir, model, cfg.chunk_len, model.llm.dtype) \
        if cfg.key_weight or cfg.content_margin else None
    objective = TextObjective(cfg, gains, checkpoint=compute.checkpoint)
    stepper = Step(cfg, model, objective, team, compute)  # AdamW, its schedule, the moving average (rank 0)
    step = samples = 0
    busy_minutes = 0.0  # CPU time per thread of the steps so far (the --cpu-minutes budget)
    wall_minutes = 0.0  # wall time of the steps this session (the --minutes budget)
    state_file = out / "train-state.pt"
    if resume and state_file.exists():
        load_embedder_weights(model.embedder, out / "embedder.safetensors")
        state = torch.load(state_file, weights_only=True)  # our own file: tensors and numbers only
        if "optimizer" not in state:
            raise ValueError(f"{state_file} holds no optimiser state (a run brought back from a lent GPU): "
                             "start a new run from its weights with --init-embedder")
        stepper.opt.load_state_dict(state["optimizer"])
        stepper.sched.load_state_dict(state["scheduler"])
        stepper.follow_lr()
        step = int(state["step"])
        stream.restore(json.loads((out / "rng.json").read_text()))
        samples = _rewind_log(out / "log.jsonl", step, state.get("samples")) if team.chief \
            else int(state.get("samples", 0))
        busy_minutes = float(state.get("busy_minutes", 0.0))
        if stepper.ema is not None and (out / EMA_WEIGHTS).exists():  # else the average starts here
            load_embedder_weights(stepper.ema.module, out / EMA_WEIGHTS)
            stepper.ema.n_averaged.fill_(int(state.get("ema_updates", 1)))
        print(f"[extemb] rank {team.rank}: resumed {out} at step {step} ({samples} samples)")
    members = team.members()

    log = None
    if team.chief:  # rank 0 keeps the books: the log, the evaluations, the checkpoints
        if not resume:
            (out / "log.jsonl").unlink(missing_ok=True)
        if step == 0:  # recorded now: exporting this run may later overwrite the file it started from
            parent = parent_record(cfg.init_embedder)
            (out / INIT_RECORD).write_text(json.dumps(parent, indent=2) + "\n")
            drawn = seeds_drawn(parent, cfg.data, cfg.sample_len)
            if cfg.seed in drawn:
                print(f"[extemb] warning: the --init-embedder weights already trained on the first {drawn[cfg.seed]} "
                      f"windows of --seed {cfg.seed} on this data; this run draws them again. Seeds their lineage "
                      f"used: {sorted(drawn)}; pass another --seed for new windows")
        (out / "train-config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        log = open(out / "log.jsonl", "a")
        # where and how each stretch of the run ran (a run resumes across sessions and machines,
        # and settings such as --accum or the number of ranks may change between stretches)
        _log(log, {"step": step, "samples": samples, "kind": "session", "machine": machine(),
                   "device": str(device), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": asdict(cfg),
                   "runner": team.runner, "world": team.world, "backend": team.backend, "ranks": members,
                   "global_batch": stepper.global_batch, "lr": stepper.lr,
                   "compute": {**asdict(compute), "device": str(device)}})
        print(f"[extemb] {team.runner}: {team.world} rank(s) x {cfg.accum} samples = global batch "
              f"{stepper.global_batch}; lr {stepper.lr:.3g} (--lr {cfg.lr:g} at a batch of "
              f"{cfg.lr_batch or cfg.accum}, square-root rule)")
        if step == 0 and eval_set:
            refs = reference_losses(model, eval_set, cfg.chunk_len, bf16)
            _log(log, {"step": 0, "samples": 0, "kind": "reference", **refs})
            _log(log, {"step": 0, "samples": 0, "kind": "eval",
                       **_evaluate_both(model, stepper.ema, eval_set, eval_recall, cfg, bf16)})

    bar = tqdm(total=cfg.steps, initial=step, desc="training embedder", unit="step", disable=not team.chief)
    while step < cfg.steps and not _over_budget(cfg, busy_minutes, wall_minutes):
        t0, cpu0 = time.perf_counter(), time.process_time()
        draws = [stream.draw() for _ in range(stepper.global_batch)]  # every rank draws the whole step
        losses, grad_norm = stepper.run(team.share(draws))
        losses = team.gather(losses)  # every sample's loss, in the stream's order
        samples += stepper.global_batch
        step += 1
        # the process's CPU time per thread: what the step cost the machine, without the time a
        # SIGSTOP pause (another job on the cores) adds to its wall time; the slowest rank's
        busy = team.slowest((time.process_time() - cpu0) / torch.get_num_threads())
        dt = team.slowest(time.perf_counter() - t0)
        busy_minutes += busy / 60
        wall_minutes += dt / 60
        last = step == cfg.steps or _over_budget(cfg, busy_minutes, wall_minutes)
        if team.chief:
            rec = {"step": step, "samples": samples, "kind": "train", "loss": float(np.mean(losses)),
                   "ks": [d.k for d in draws], "sample_kinds": [d.kind for d in draws], "grad_norm": grad_norm,
                   "lr": stepper.sched.get_last_lr()[0], "global_batch": stepper.global_batch,
                   "tokens_per_s": stepper.global_batch * cfg.sample_len / dt, "step_seconds": dt,
                   "busy_seconds": busy, "busy_minutes": busy_minutes}
            if gains is not None:  # rank 0's own cache lookups
                rec.update(gain_cache_hits=gains.hits, gain_cache_misses=gains.misses)
            _log(log, rec)
            bar.update()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if eval_set and (step % cfg.eval_every == 0 or last):
                ev = _evaluate_both(model, stepper.ema, eval_set, eval_recall, cfg, bf16)
                _log(log, {"step": step, "samples": samples, "kind": "eval", **ev})
                bar.write(f"step {step}: held-out loss " + "; ".join(
                    f"{name} " + ", ".join(f"k={k} {v:.4f}" for k, v in ev[key].items())
                    for name, key in (("live", "loss_by_k"), ("ema", "ema_loss_by_k")) if key in ev))
        if step % cfg.save_every == 0 or last:
            if team.chief:
                _save(model, stepper.opt, stepper.sched, step, samples, stream.rngs(), out, stepper.ema,
                      busy_minutes)
                plot_curves(out / "log.jsonl", out / "loss.png")
            team.checkpointed(out, {"step": step, "samples": samples, "loss": float(np.mean(losses))})
    bar.close()
    if log is not None:
        log.close()
    team.close()
    return out


def _over_budget(cfg: TrainConfig, busy_minutes: float, wall_minutes: float) -> bool:
    return bool((cfg.cpu_minutes and busy_minutes >= cfg.cpu_minutes) or (cfg.minutes and wall_minutes >= cfg.minutes))


class TextObjective:
    """The loss of a text sample: the two-stream LM loss, optionally weighted toward key tokens
    (`key_weight`), distilled (`distill`), and with the content margin against the previous text
    sample's slots (`content_margin`); rows cut to `raw_rows`. One place for what a step optimises,
    whoever runs the step."""

    def __init__(self, cfg: TrainConfig, gains: GainCache | None, checkpoint: bool = False):
        self.cfg, self.gains, self.checkpoint = cfg, gains, checkpoint  # checkpoint: the frozen LLM's layers
        self.previous: torch.Tensor | None = None  # the last text sample: the content margin's wrong document

    def loss(self, model, ids: torch.Tensor, k: int) -> torch.Tensor:
        cfg, c = self.cfg, self.cfg.chunk_len
        rows = cfg.raw_rows or None
        gain = self.gains.gains(model, ids) if self.gains is not None else None
        weight = None
        if cfg.key_weight:
            weight = torch.ones(ids.numel(), device=ids.device)
            weight[c:] = key_weights(gain, cfg.key_weight, cfg.key_cap)
        hinge = None
        if cfg.content_margin and self.previous is not None:
            with torch.no_grad():  # the wrong document's slots: a baseline, no gradient through them
                wrong = compact_slots(model, self.previous, k, c)
                _, wrong_lp, lay = two_stream_forward(model, ids, k, c, return_logprobs=True, row_len=rows,
                                                      compact=wrong)
            where = gain[lay.target_at - c].clamp(0.0, cfg.key_cap)  # the margin where long context helps
            hinge = (wrong_lp + cfg.margin, cfg.content_margin * where / where.sum().clamp_min(1e-6))
        self.previous = ids
        teacher = teacher_topk(model, ids, c, cfg.distill_top) if cfg.distill else None
        return two_stream_forward(model, ids, k, c, teacher=teacher, distill=cfg.distill, token_weight=weight,
                                  row_len=rows, hinge=hinge, checkpoint=self.checkpoint)


def _save(model, opt, sched, step, samples, rngs: dict, out: Path, ema=None, busy_minutes: float = 0.0):
    # write-then-rename: an interrupted save never leaves a half-written checkpoint
    def tmp(name: str) -> Path:
        stem, ext = name.split(".", 1)
        return out / f"{stem}.tmp.{ext}"

    names = ["embedder.safetensors", "train-state.pt", "rng.json"]
    save_embedder_weights(model.embedder, tmp("embedder.safetensors"))
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "samples": samples,
             "busy_minutes": busy_minutes}
    if ema is not None:
        save_embedder_weights(ema.module, tmp(EMA_WEIGHTS))
        state["ema_updates"] = int(ema.n_averaged)
        names.append(EMA_WEIGHTS)
    torch.save(state, tmp("train-state.pt"))
    tmp("rng.json").write_text(json.dumps({name: rng.bit_generator.state for name, rng in rngs.items()}))
    for name in names:
        tmp(name).replace(out / name)


def _rewind_log(path: Path, step: int, samples: int | None) -> int:
    """Resuming at a checkpoint: drop the log's records of steps after it (they are redone),
    and return the samples seen up to it (--accum may change between stretches of a run)."""
    recs = [json.loads(line) for line in open(path)] if path.exists() else []
    kept = [r for r in recs if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if samples is None:  # a checkpoint from before the count was saved: the log has it
        samples = next((r["samples"] for r in reversed(kept) if r["kind"] == "train"), 0)
    return int(samples)


def _log(f, rec):
    f.write(json.dumps(rec) + "\n")
    f.flush()


def _is_context_target(t: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Targets that depend on earlier chunks: chunks 1.., without each chunk's first token
    (which the no-context reference cannot predict), so every reference scores the same tokens."""
    return (t >= chunk_len) & (t % chunk_len != 0)


@contextmanager
def _embedder_swapped(model, embedder):
    live, model.embedder = model.embedder, embedder
    try:
        yield
    finally:
        model.embedder = live


def _evaluate_both(model, ema, samples, recall_samples, cfg: TrainConfig, bf16: bool) -> dict:
    """The eval record: the live weights' held-out losses (and recall answer losses), and the moving
    average's if there is one. Per-sample losses are kept so two records can be compared paired."""
    rec = {}
    for prefix, embedder in [("", None)] + ([("ema_", ema.module)] if ema is not None else []):
        with _embedder_swapped(model, embedder or model.embedder):
            per_sample = evaluate(model, samples, cfg.eval_ks, cfg.chunk_len, bf16)
            rec[f"{prefix}loss_by_k"] = {k: float(np.mean(v)) for k, v in per_sample.items()}
            rec[f"{prefix}per_sample"] = per_sample
            if recall_samples:
                answers = evaluate(model, [r.ids for r in recall_samples], cfg.eval_ks, cfg.chunk_len, bf16,
                                   targets=[r.answer for r in recall_samples])
                rec[f"{prefix}recall_loss_by_k"] = {k: float(np.mean(v)) for k, v in answers.items()}
    return rec


@torch.no_grad()
def evaluate(model, samples, ks, chunk_len: int, bf16: bool, targets: list[torch.Tensor] | None = None) -> dict:
    """{k: [held-out loss of each sample]} of the two-stream pass: the mean over the tokens of chunks 1..
    (see _is_context_target), or over the tokens each `targets` mask (like the sample) marks."""
    was = model.embedder.training
    model.embedder.eval()
    res = {}
    for k in ks:
        vals = []
        for i, ids in enumerate(samples):
            ids = ids.to(model.device)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                _, lp, lay = two_stream_forward(model, ids, k, chunk_len, return_logprobs=True)
            scored = _is_context_target(lay.target_at, chunk_len) if targets is None \
                else targets[i].to(ids.device)[lay.target_at]
            vals.append(-lp[scored].mean().item())
        res[str(k)] = vals
    model.embedder.train(was)
    return res


@torch.no_grad()
def reference_losses(model, samples, chunk_len: int, bf16: bool, per_sample: bool = False) -> dict:
    """The same held-out targets with full raw context and with no context (each chunk alone)."""
    full, none = [], []
    for ids in samples:
        ids = ids.to(model.device)
        scored = _is_context_target(torch.arange(chunk_len, ids.numel(), device=ids.device), chunk_len)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            lp_full, lp_alone = frozen_logprobs(model, ids, chunk_len)
        full.append(-lp_full[scored].mean().item())
        none.append(-lp_alone[scored].mean().item())
    res = {"full_context": float(np.mean(full)), "no_context": float(np.mean(none))}
    if per_sample:
        res.update(full_context_per_sample=full, no_context_per_sample=none)
    return res


def plot_curves(log_path: Path, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(log_path)]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    refs = next((r for r in recs if r["kind"] == "reference"), None)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        x = [r["samples"] for r in train]
        y = [r["loss"] for r in train]
        a.plot(x, y, alpha=0.3, label="train (per step)")
        w = max(1, len(y) // 20)
        a.plot(x[w - 1 :], np.convolve(y, np.ones(w) / w, mode="valid"), label=f"train (mean of {w})")
    a.set_xlabel("samples seen")
    a.set_ylabel("two-stream loss (all tokens, k sampled)")
    a.legend()
    a.grid(alpha=0.3)
    for i, k in enumerate(sorted({k for r in evals for k in r["loss_by_k"]}, key=int)):
        b.plot([r["samples"] for r in evals], [r["loss_by_k"][k] for r in evals], "o-", color=f"C{i}",
               label=f"held-out, k={k}")
        avg = [r for r in evals if "ema_loss_by_k" in r]
        if avg:
            b.plot([r["samples"] for r in avg], [r["ema_loss_by_k"][k] for r in avg], "s--", color=f"C{i}",
                   markersize=3, label=f"held-out, k={k}, weights' moving average")
    if refs:
        b.axhline(refs["full_context"], color="g", ls="--", label="full raw context")
        b.axhline(refs["no_context"], color="r", ls="--", label="no context")
    # where a stretch of the run resumed, with the settings it ran under (they may change)
    for r in recs:
        if r["kind"] == "session" and r["samples"] > 0 and "config" in r:
            for ax in (a, b):
                ax.axvline(r["samples"], color="grey", ls=":", lw=1)
            a.annotate(f"resumed: accum {r['config']['accum']}, lr {r['config']['lr']:g}", (r["samples"], 1.0),
                       xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points", fontsize=7)
    b.set_xlabel("samples seen")
    b.set_ylabel("held-out loss (chunks after the first)")
    if b.lines:  # a run without held-out evaluation (--eval-samples 0) leaves this panel empty
        b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
