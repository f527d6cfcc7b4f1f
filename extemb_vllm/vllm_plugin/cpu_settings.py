"""The CPU settings vLLM's CPU guide documents, chosen for ExtEmb models and said in one log line.

- dtype: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX on x86, BF16 on Arm),
  float32 where it does not. vLLM's "auto" picks bfloat16 on every x86 CPU; on one without native
  bf16 that ran about 2x slower than float32 (docs/benchmarks.md, section 10). A dtype given with
  --dtype is kept, except that a 16-bit one on such a CPU becomes float32 (vLLM's "auto" cannot be
  told from an explicit choice once it is resolved); EXTEMB_KEEP_DTYPE=1 keeps it.
- chunked prefill off: a prompt is pre-filled in one engine step. With it on, vLLM 0.32.0's CPU
  engine stops on any seeded request whose prompt takes more than one step (its model runner
  rewinds the sampler's generator with `set_offset`, which a CPU generator refuses: "CPU Generator
  does not use offset"), and `vllm serve` on CPU steps 2048 tokens at a time, less than the
  window. The step budget becomes the window (an ExtEmb prompt never exceeds it).
- tcmalloc: vLLM asks for it in LD_PRELOAD; the README's serving command preloads the system's
  (scripts/setup.sh installs Debian's libtcmalloc-minimal4 where it can). This only reports.
"""

from __future__ import annotations

import glob
import logging
import os
from functools import lru_cache

import torch

log = logging.getLogger("vllm.extemb.cpu")  # under vLLM's logger: printed as vLLM prints its own
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX512-BF16, AMX); Arm (FEAT_BF16)
TCMALLOC_GLOBS = ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                  "/usr/lib/*/libtcmalloc.so.4")


@lru_cache(maxsize=1)
def native_bf16_flags() -> tuple[str, ...]:
    """This CPU's flags that give it native bf16 arithmetic (empty: none, or not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return bf16_flags(f.read())
    except OSError:
        return ()


def bf16_flags(cpuinfo: str) -> tuple[str, ...]:
    """The native-bf16 flags in the text of /proc/cpuinfo ("flags" on x86, "Features" on Arm)."""
    flags = {word for line in cpuinfo.splitlines() if line.lower().startswith(("flags", "features"))
             for word in line.split()}
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)


def serving_dtype() -> torch.dtype:
    """What this CPU serves best: bfloat16 with native bf16, else float32."""
    return torch.bfloat16 if native_bf16_flags() else torch.float32


def installed_tcmalloc() -> str | None:
    for pattern in TCMALLOC_GLOBS:
        if found := sorted(glob.glob(pattern)):
            return found[0]
    return None


def preloaded_tcmalloc() -> str | None:
    return next((p for p in os.environ.get("LD_PRELOAD", "").split(":") if "libtcmalloc" in p), None)


def settle_dtype(model_config) -> None:
    """vLLM's model-config hook, on CPU: a 16-bit dtype on a CPU without native bf16 becomes
    float32; then one line says what was chosen."""
    flags, given = native_bf16_flags(), _name(model_config.dtype)
    if model_config.dtype in (torch.bfloat16, torch.float16) and not flags and not os.environ.get("EXTEMB_KEEP_DTYPE"):
        model_config.dtype = torch.float32
        why = (f"float32, not {given}: this CPU has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS[:2])}), and "
               f"16-bit floats run about 2x slower there; EXTEMB_KEEP_DTYPE=1 keeps {given}")
    elif flags:
        why = f"{given} (this CPU has native bf16: {', '.join(flags)})"
    else:
        why = f"{given} (this CPU has no native bf16)"
    log.info("ExtEmb CPU settings: dtype %s; %s", why, tcmalloc_line())


def prefill_in_one_step(vllm_config) -> None:
    """vLLM's config hook, on CPU: no chunked prefill, and a step budget (tokens and encoder inputs) of at
    least the window, so every prompt is pre-filled in one step (see the module's docstring)."""
    sched, window = vllm_config.scheduler_config, vllm_config.model_config.max_model_len
    if not sched.enable_chunked_prefill and sched.max_num_batched_tokens >= window:
        return
    sched.enable_chunked_prefill = False
    sched.max_num_batched_tokens = max(sched.max_num_batched_tokens, window)
    sched.max_num_encoder_input_tokens = max(sched.max_num_encoder_input_tokens, sched.max_num_batched_tokens)
    sched.encoder_cache_size = max(sched.encoder_cache_size, sched.max_num_batched_tokens)
    log.info("ExtEmb CPU settings: chunked prefill off, %d tokens a step: each prompt (at most the %d-position "
             "window) is pre-filled in one step (a seeded request pre-filled in several stops vLLM 0.32.0's CPU "
             "engine)", sched.max_num_batched_tokens, window)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tcmalloc_line() -> str:
    if path := preloaded_tcmalloc():
        return f"tcmalloc preloaded ({path})"
    if path := installed_tcmalloc():
        return f"tcmalloc installed but not preloaded: start with LD_PRELOAD={path} (the README's command does)"
    return "tcmalloc not installed (scripts/setup.sh installs libtcmalloc-minimal4 where it can)"
