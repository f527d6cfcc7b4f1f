"""What every benchmark shares: the plain-Llama view of a checkpoint, engines started
and stopped one at a time in this process, and a peak memory sampler."""

from __future__ import annotations

import gc
import json
import os
import threading
from pathlib import Path


def plain_llama_dir(model_dir: Path) -> Path:
    """A plain Llama view of a checkpoint: same base weights (linked), no embedder."""
    model_dir = Path(model_dir)
    out = model_dir.parent / f"{model_dir.name}.plain-llama"
    out.mkdir(exist_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("extemb", "max_seq_len", "advertised_max_model_len"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in model_dir.iterdir():
        if f.name in ("config.json", "embedder.safetensors", "build-info.json"):
            continue
        link = out / f.name
        if link.is_symlink():  # re-point: the checkpoint may have been rebuilt or moved
            link.unlink()
        link.symlink_to(f.resolve())
    return out


def make_engine(model, max_model_len=None, dtype="float32", eager=False, **kw):
    """A vLLM engine with the settings every benchmark shares (seeded, stats on for TTFT); compiled
    unless `eager`, as `vllm serve` runs without --enforce-eager."""
    # The engine runs in this process (no engine-core subprocess): its memory is ours to sample,
    # and engines can be started one after the other. Set here, not at import: importing a
    # benchmark module changes nothing for its importer.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("EXTEMB_KEEP_DTYPE", "1")  # the dtype given is what every engine runs (plug-in or not)
    from vllm import LLM

    return LLM(model=str(model), max_model_len=max_model_len, enforce_eager=eager, dtype=dtype, seed=0,
               disable_log_stats=False, **kw)


def serving_settings(dtype: str | None, eager: bool) -> dict:
    """The settings a benchmark's engines run with, both sides alike: dtype None is what `vllm serve`
    of the plug-in picks on this machine (bfloat16 on a CPU with native bf16, else float32; GPUs
    bfloat16), eager or compiled, and the tcmalloc this process was started with."""
    import torch

    from ..vllm_plugin.cpu_settings import preloaded_tcmalloc, serving_dtype

    if dtype is None:
        dtype = str(serving_dtype() if not torch.cuda.is_available() else torch.bfloat16).removeprefix("torch.")
    return {"dtype": dtype, "eager": eager, "tcmalloc": preloaded_tcmalloc()}


def describe(settings: dict) -> str:
    return (f"{settings['dtype']}, {'eager' if settings['eager'] else 'compiled'}, "
            f"{'tcmalloc preloaded' if settings['tcmalloc'] else 'no tcmalloc'}")


def preload_tcmalloc(wanted: bool = True) -> None:
    """Run this command again with tcmalloc preloaded (or not, wanted=False) when it was not
    started so, as the README's serving command runs vLLM: an engine in this process allocates
    with what the process started with. Does nothing where tcmalloc is not installed."""
    import sys

    from ..vllm_plugin.cpu_settings import installed_tcmalloc, preloaded_tcmalloc

    path, preloaded = installed_tcmalloc(), preloaded_tcmalloc()
    if path is None or bool(preloaded) == wanted:
        return
    others = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and "libtcmalloc" not in p]
    env = dict(os.environ, LD_PRELOAD=":".join([path, *others] if wanted else others))
    print(f"[bench] running again with LD_PRELOAD={env['LD_PRELOAD'] or '(empty)'}"
          f" ({'tcmalloc, as the README' if wanted else 'no tcmalloc, unlike the README'}'s serving command)",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def shutdown():
    """Free the engine's distributed state. The caller must have dropped its last reference to
    the engine first (`del llm`): an engine collected later would tear down its successor's."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()



class PeakMemory:
    """Peak memory while the block runs: device memory on CUDA, resident set size on CPU.

        with PeakMemory() as m: ...
        m.peak_bytes
    """

    def __init__(self, interval_s: float = 0.05):
        import torch

        self.cuda = torch.cuda.is_available()
        self.interval_s = interval_s
        self.peak_bytes = 0

    def _rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _watch(self):
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_bytes = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())
        return False
