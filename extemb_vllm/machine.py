"""The machine: the device work runs on by default, and one line that says what a figure was
measured on (benchmarks, training logs)."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"


def default_device(name: str | None = None):
    """The given device, else the engine's kind of default: CUDA where there is one, else the CPU."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
