"""A training stretch on a GPU lent for minutes (scripts/device_train.sh runs each step).

The lent machine has torch and transformers but not vLLM, `gguf` or this package's other
dependencies, reaches no network, and takes what travels with a call: the working tree plus
carried files, 64 MiB in all (the tracked tree alone is ~57.5 MiB: the shipped embedder is
54 MiB of it), so what the stretch needs beyond the tree is staged over several calls:

    pack     (here)    the base GGUF, the `gguf` package, the training texts and a manifest in one
                       bundle, cut into parts that each fit beside the tree in one call
    receive  (device)  each call's part, checked against the manifest, kept where the next call finds it
    train    (device)  the bundle checked and unpacked; the checkpoint built from the GGUF as
                       `extemb build` builds it here (its LLM's digest must equal this machine's);
                       the shipped lineage trained until the call's deadline; the moving average in
                       bf16, cut into shards small enough to come back, with the log and a summary
    collect  (here)    the shards joined and checked into a run directory that `extemb export --run`
                       and `extemb compare` read (the lent machine's optimiser state stays there)

Every step checks digests: a part, a bundle or a shard that is not what was sent fails by name.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["shakespeare", "bibles", "python-docs", "fiction", "handbooks"]  # the lineage's training sources
# The lineage's settings on a GPU (docs/training.md's stretch, at a batch a GPU keeps busy): 8 samples per
# step at the CPU stretches' 1e-4 for one sample, by the square-root rule; the moving average over ~200
# steps; no checkpointing (SmolLM2's activations at 4096 tokens fit any GPU: recomputing costs time);
# a seed of its own (other windows than the CPU runs'). Flags in the objective override these.
LINEAGE_FLAGS = ["--sample-len", "4096", "--chunk-len", "512", "--k-ladder", "16,32", "--accum", "8",
                 "--lr", "1e-4", "--lr-batch", "1", "--warmup", "20", "--ema", "0.995", "--bf16", "--no-grad-ckpt",
                 "--seed", "28"]
LIMIT_BYTES = 64 * 2**20  # what travels with one call, working tree included
BACK_FILE_BYTES = 16 * 2**20  # one file that comes back
BACK_FILES = 8
LLM_FILE = "model.safetensors"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- cutting files into parts and joining them --------------------------------------------------
def split(path: Path, out_dir: Path, size: int, prefix: str) -> list[dict]:
    """Cut `path` into files of at most `size` bytes: [{name, bytes, sha256}] in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(size), b"")):
            name = f"{prefix}-{i:02d}"
            (out_dir / name).write_bytes(block)
            parts.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    return parts


def join(parts: list[dict], src_dir: Path, out: Path, whole_sha256: str) -> Path:
    """The parts, each checked, joined into `out`, which must have the whole file's digest."""
    missing = [p["name"] for p in parts if not (src_dir / p["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"parts missing from {src_dir}: {missing}")
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as f:
        for p in parts:
            block = (src_dir / p["name"]).read_bytes()
            if hashlib.sha256(block).hexdigest() != p["sha256"]:
                raise ValueError(f"part {p['name']} in {src_dir} is not the one sent (digest differs)")
            f.write(block)
    if sha256(tmp) != whole_sha256:
        tmp.unlink()
        raise ValueError(f"{out.name}: the joined parts do not give the file that was cut")
    tmp.replace(out)
    return out


# -- the frozen LLM's identity ------------------------------------------------------------------
def llm_digest(checkpoint: Path) -> str:
    """A digest of the frozen LLM's weights in a built checkpoint (token table, layers, final norm;
    names and bytes): the device's build of the GGUF must give this machine's LLM exactly."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(Path(checkpoint) / LLM_FILE), "pt") as f:
        for name in sorted(k for k in f.keys() if not k.startswith("lm_head.")):  # tied to the table
            h.update(name.encode())
            h.update(f.get_tensor(name).float().numpy().tobytes())
    return h.hexdigest()


def tree_bytes(root: Path = ROOT) -> int:
    """What a call carries without being asked: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


# -- here: pack ---------------------------------------------------------------------------------
def pack(stage: Path, room: int, gguf: Path, checkpoint: Path, sources: list[str], data_root: Path,
         xz_preset: int = 9) -> dict:
    """The bundle (GGUF, the gguf package, texts, manifest) cut into parts of `room` bytes in `stage`."""
    import gguf as gguf_package

    from ..model.checkpoint import SHIPPED_EMBEDDER

    if room < 2**20:
        raise ValueError(f"{room} bytes of room per call: the working tree leaves less than 1 MiB to carry; "
                         "ignore or remove untracked files, or carry less")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    texts = [data_root / s / "train" for s in sources]
    for t in texts:
        if not t.is_dir():
            raise FileNotFoundError(f"{t} is missing: prepare the texts with `extemb data`")
    manifest = {
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "gguf": gguf.name, "gguf_sha256": sha256(gguf),
        "llm_digest": llm_digest(checkpoint),  # what the device's build must give
        "shipped_embedder_sha256": sha256(SHIPPED_EMBEDDER),  # the lineage's start, in the tree
        "sources": sources,
    }
    bundle = stage / "bundle.tar"
    with tarfile.open(bundle, "w") as tar:
        tar.add(gguf, arcname=f"gguf/{gguf.name}")  # already quantised: xz saves ~7% of it for a minute's CPU
        tar.addfile(*_member("py.tar.xz", _xz_package(Path(gguf_package.__file__).parent, xz_preset)))
        tar.addfile(*_member("texts.tar.xz", _xz_texts(texts, data_root, xz_preset)))
        tar.addfile(*_member("manifest.json", json.dumps(manifest, indent=2).encode()))
    parts = split(bundle, stage / "parts", room, "part")
    plan = {"bundle_sha256": sha256(bundle), "bundle_bytes": bundle.stat().st_size, "room_bytes": room,
            "parts": parts, **manifest}
    bundle.unlink()
    (stage / "parts.json").write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def _member(name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def _xz_package(package: Path, preset: int) -> bytes:
    """A pure-Python package and its dist-info (transformers reads the version from the metadata)."""
    from importlib.metadata import distribution

    dist = distribution(package.name)
    info = Path(dist.locate_file("")) / f"{dist.metadata['Name']}-{dist.version}.dist-info"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=preset) as tar:
        for path in (package, info):
            tar.add(path, arcname=path.name, filter=lambda t: None if "__pycache__" in t.name else t)
    return buf.getvalue()


def _xz_texts(folders: list[Path], root: Path, preset: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=preset) as tar:
        for folder in folders:
            tar.add(folder, arcname=str(folder.relative_to(root)))
    return buf.getvalue()


# -- device: receive, train ---------------------------------------------------------------------
def receive(stage: Path, keep: Path) -> dict:
    """Move this call's parts (in the repository copy's `stage`) to `keep`, checked; say what is still missing."""
    plan = json.loads((stage / "parts.json").read_text())
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(stage / "parts.json", keep / "parts.json")
    for p in plan["parts"]:
        src = stage / "parts" / p["name"]
        if src.is_file():
            if sha256(src) != p["sha256"]:
                raise ValueError(f"{src} is not the part that was packed (digest differs)")
            shutil.copy(src, keep / p["name"])
    held = [p["name"] for p in plan["parts"] if (keep / p["name"]).is_file()]
    missing = [p["name"] for p in plan["parts"] if p["name"] not in held]
    return {"held": held, "missing": missing}


def unpack(keep: Path, work: Path) -> dict:
    """The bundle from the parts in `keep`, checked and unpacked into `work`: its manifest."""
    plan = json.loads((keep / "parts.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    bundle = join(plan["parts"], keep, work / "bundle.tar", plan["bundle_sha256"])
    with tarfile.open(bundle) as tar:
        tar.extractall(work, filter="data")
    bundle.unlink()
    for name in ("py.tar.xz", "texts.tar.xz"):
        with tarfile.open(work / name) as tar:
            tar.extractall(work / name.split(".")[0], filter="data")
    manifest = json.loads((work / "manifest.json").read_text())
    if sha256(work / "gguf" / manifest["gguf"]) != manifest["gguf_sha256"]:
        raise ValueError("the GGUF in the bundle is not the one packed")
    return manifest


def build(work: Path, manifest: dict) -> Path:
    """The checkpoint from the GGUF, as `extemb build` makes it, with the gguf package from the bundle;
    its frozen LLM must be this machine's (the digest packed with it)."""
    sys.path.insert(0, str(work / "py"))  # the bundle's `gguf` (the lent machine has none)
    import gguf
    from importlib.metadata import distribution

    from ..model.checkpoint import build_checkpoint

    # the package and the metadata transformers checks its version by must both be the bundle's
    if Path(gguf.__file__).parents[1] != work / "py" or Path(distribution("gguf").locate_file("")) != work / "py":
        raise ImportError(f"gguf comes from {gguf.__file__}, not from the bundle's {work / 'py'}")

    out = build_checkpoint(work / "extemb-llama2", source=work / "gguf" / manifest["gguf"])
    got = llm_digest(out)
    if got != manifest["llm_digest"]:
        raise ValueError(f"the GGUF built here gives another frozen LLM ({got[:12]} against "
                         f"{manifest['llm_digest'][:12]} where it was packed): a transformers or gguf version "
                         "that dequantises differently")
    return out


def stretch_config(checkpoint: Path, texts: Path, sources: list[str], out: Path, minutes: float, extra: list[str],
                   steps: int, device: str | None):
    """`extemb train` of the shipped lineage (LINEAGE_FLAGS), then the objective's flags (`extra`, which win),
    read by `extemb train`'s own parser."""
    from ..cli import build_parser
    from ..model.checkpoint import SHIPPED_EMBEDDER
    from .config import TrainConfig

    argv = ["train", "--model", str(checkpoint), "--data", *[str(texts / s / "train") for s in sources],
            "--init-embedder", str(SHIPPED_EMBEDDER), "--out", str(out), *LINEAGE_FLAGS, "--steps", str(steps),
            "--minutes", str(minutes), "--eval-samples", "0", "--save-every", "1000000000",
            "--cache-dir", str(out.parent / "cache"), *(["--device", device] if device else []), *extra]
    args = build_parser().parse_args(argv)
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})


def shard_back(run: Path, back: Path, summary: dict) -> list[str]:
    """The moving average in bf16 cut into shards that come back (<= 16 MiB each), the log, a summary."""
    import torch
    from safetensors.torch import load_file, save_file

    from .trainer import EMA_WEIGHTS

    back.mkdir(parents=True, exist_ok=True)
    ema = run / EMA_WEIGHTS
    if not ema.exists():
        raise FileNotFoundError(f"{ema}: the run kept no moving average (train with --ema)")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(ema)).items()}
    whole = run / "ema-bf16.safetensors"
    save_file(tensors, str(whole), metadata={"format": "pt", "embedder_layers": str(summary["embedder_layers"])})
    shards = split(whole, back, BACK_FILE_BYTES - 2**20, "ema-bf16")
    with open(run / "log.jsonl", "rb") as f:
        (back / "log.jsonl.gz").write_bytes(gzip.compress(f.read()))
    state = torch.load(run / "train-state.pt", weights_only=True)
    record = {**summary, "ema_sha256": sha256(whole), "ema_shards": shards,
              "step": int(state["step"]), "samples": int(state["samples"]),
              "ema_updates": int(state.get("ema_updates", 0)), "busy_minutes": float(state.get("busy_minutes", 0))}
    (back / "stretch.json").write_text(json.dumps(record, indent=2) + "\n")
    names = sorted(p.name for p in back.iterdir())
    big = [n for n in names if (back / n).stat().st_size > BACK_FILE_BYTES]
    if len(names) > BACK_FILES or big or sum((back / n).stat().st_size for n in names) > 64 * 2**20:
        raise ValueError(f"what comes back is over the limits: {names}, too big: {big}")
    return names


def train_on_device(keep: Path, work: Path, back: Path, deadline_s: float, minutes: float, extra: list[str],
                    steps: int = 10**9, device: str | None = None) -> dict:
    """Everything a lent machine does in one call, ending with what comes back in `back` by `deadline_s`
    (seconds after this call started: the call's limit less the time to write what comes back)."""
    import torch

    from .trainer import train

    t0 = time.monotonic()
    manifest = unpack(keep, work)
    checkpoint = build(work, manifest)
    staged_s = time.monotonic() - t0
    # the steps stop by the deadline: what is left of it, less a minute for loading and writing back
    budget = min(minutes, max(0.1, (deadline_s - staged_s - 60) / 60))
    cfg = stretch_config(checkpoint, work / "texts", manifest["sources"], work / "run", budget, extra, steps, device)
    t1 = time.monotonic()
    run = train(cfg)
    trained_s = time.monotonic() - t1
    recs = [json.loads(line) for line in open(run / "log.jsonl")]
    steps_rec = [r for r in recs if r["kind"] == "train"]
    seconds = sum(r["step_seconds"] for r in steps_rec)
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "staging_s": staged_s, "train_call_s": trained_s,
               "steps_seconds": seconds, "samples_per_s": steps_rec[-1]["samples"] / seconds if seconds else None,
               "tokens_per_s": steps_rec[-1]["samples"] * cfg.sample_len / seconds if seconds else None,
               "objective": extra, "minutes_budget": budget, "embedder_layers": _layers(checkpoint),
               "manifest": manifest, "train_config": json.loads((run / "train-config.json").read_text())}
    shard_back(run, back, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("manifest", "train_config")}, indent=2))
    return summary


def _layers(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["extemb"]["embedder_layers"]


# -- here: collect ------------------------------------------------------------------------------
def collect(back: Path, run: Path, model: str = "extemb-llama2") -> Path:
    """The shards joined and checked into a run directory: the moving average (bf16), the log, the config
    (this machine's paths), the parent record and the step count. `extemb export --run RUN --ema` and
    `extemb compare` read it; it has no optimiser state (that stays on the lent machine), so a further
    stretch starts from its weights (--init-embedder), not --resume."""
    import torch

    from ..model.checkpoint import SHIPPED_EMBEDDER
    from .trainer import EMA_WEIGHTS, INIT_RECORD, parent_record

    record = json.loads((back / "stretch.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    join(record["ema_shards"], back, run / EMA_WEIGHTS, record["ema_sha256"])
    (run / "log.jsonl").write_bytes(gzip.decompress((back / "log.jsonl.gz").read_bytes()))
    cfg = dict(record["train_config"])
    cfg.update(model=model, out=str(run), init_embedder=str(SHIPPED_EMBEDDER.relative_to(ROOT)),
               data=[f"data/{s}/train" for s in SOURCES], cache_dir="data/cache")
    (run / "train-config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if sha256(SHIPPED_EMBEDDER) != record["manifest"]["shipped_embedder_sha256"]:
        print(f"[extemb] note: {SHIPPED_EMBEDDER.name} changed since the stretch was packed; the record names "
              "the weights it started from by their digest", file=sys.stderr)
    (run / INIT_RECORD).write_text(json.dumps(parent_record(str(SHIPPED_EMBEDDER)), indent=2) + "\n")
    torch.save({"step": record["step"], "samples": record["samples"], "ema_updates": record["ema_updates"],
                "busy_minutes": record["busy_minutes"], "brought_back": True}, run / "train-state.pt")
    (run / "stretch.json").write_text(json.dumps(record, indent=2) + "\n")
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: the bundle cut into parts that fit beside the working tree")
    p.add_argument("--stage", default="runs/device-stretch/stage")
    p.add_argument("--room-mib", type=float, default=0,
                   help="bytes per part (default: 64 MiB less the working tree, less 1 MiB)")
    p.add_argument("--checkpoint", default="extemb-llama2", help="the built default whose LLM the device must match")
    p.add_argument("--data-root", default="data")
    p.add_argument("--sources", nargs="+", default=SOURCES)
    p.add_argument("--xz-preset", type=int, default=9)
    p.add_argument("--weights-aside", action="store_true",
                   help="size the parts for calls made with the shipped weights moved out of the tree (the "
                        "receive calls); the train call then carries the weights and no part")
    p = sub.add_parser("receive", help="device: keep this call's parts")
    p.add_argument("--stage", default="runs/device-stretch/stage")
    p.add_argument("--keep", default="/tmp/extemb-stretch/parts")
    p = sub.add_parser("train", help="device: unpack, build, train until the deadline, shard what comes back")
    p.add_argument("--keep", default="/tmp/extemb-stretch/parts")
    p.add_argument("--work", default="/tmp/extemb-stretch/work")
    p.add_argument("--back", default=os.environ.get("OUT", "runs/device-stretch/back"))
    p.add_argument("--deadline-s", type=float, default=570, help="seconds after the start by which all is written")
    p.add_argument("--minutes", type=float, default=8.0, help="of training at most")
    p.add_argument("--steps", type=int, default=10**9, help="a cap on the steps (the dry run: a few)")
    p.add_argument("--device", help="default: CUDA where there is a GPU")
    p.add_argument("--objective", default="--key-weight 0",
                   help="extra `extemb train` flags: the objective and its settings (the lead's choice)")
    p = sub.add_parser("collect", help="here: the shards that came back, joined into a run directory")
    p.add_argument("back")
    p.add_argument("--run", default="runs/gpu-stretch")
    p.add_argument("--model", default="extemb-llama2")
    args = ap.parse_args(argv)

    if args.cmd == "pack":
        from ..model.checkpoint import default_gguf_path

        from ..model.checkpoint import SHIPPED_EMBEDDER

        aside = SHIPPED_EMBEDDER.stat().st_size if args.weights_aside else 0
        room = int(args.room_mib * 2**20) or LIMIT_BYTES - (tree_bytes() - aside) - 2**20
        plan = pack(Path(args.stage), room, default_gguf_path(), Path(args.checkpoint), args.sources,
                    Path(args.data_root), args.xz_preset)
        plan["weights_aside"] = bool(aside)
        (Path(args.stage) / "parts.json").write_text(json.dumps(plan, indent=2) + "\n")
        print(json.dumps({"parts": len(plan["parts"]), "bundle_mib": round(plan["bundle_bytes"] / 2**20, 1),
                          "room_mib": round(room / 2**20, 2), "stage": args.stage}))
    elif args.cmd == "receive":
        print(json.dumps(receive(Path(args.stage), Path(args.keep))))
    elif args.cmd == "train":
        train_on_device(Path(args.keep), Path(args.work), Path(args.back), args.deadline_s, args.minutes,
                        args.objective.split(), args.steps, args.device)
    elif args.cmd == "collect":
        print(collect(Path(args.back), Path(args.run), args.model))


if __name__ == "__main__":
    main()
