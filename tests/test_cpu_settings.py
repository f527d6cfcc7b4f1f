"""The CPU settings the plug-in picks for `vllm serve` (fast: no engine)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from extemb_vllm.vllm_plugin import cpu_settings

AMX = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX2 = "flags\t\t: fpu sse2 avx2 fma\n"


@pytest.fixture
def cpu(monkeypatch):
    """Make the plug-in see a CPU with these /proc/cpuinfo flags."""

    def use(flags_line: str):
        flags = cpu_settings.bf16_flags("processor\t: 0\n" + flags_line)
        monkeypatch.setattr(cpu_settings, "native_bf16_flags", lambda: flags)

    return use


def test_native_bf16_is_read_from_the_cpu_flags(cpu):
    assert cpu_settings.bf16_flags("Features\t: fp asimd bf16 i8mm\n") == ("bf16",)  # Arm
    cpu(AMX)
    assert cpu_settings.native_bf16_flags() == ("avx512_bf16", "amx_bf16")
    assert cpu_settings.serving_dtype() == torch.bfloat16
    cpu(AVX2)
    assert cpu_settings.native_bf16_flags() == () and cpu_settings.serving_dtype() == torch.float32


@pytest.mark.parametrize("flags, given, keep, served, said", [
    (AMX, torch.bfloat16, False, torch.bfloat16, "dtype bfloat16 (this CPU has native bf16: avx512_bf16, amx_bf16)"),
    (AMX, torch.float32, False, torch.float32, "dtype float32 (this CPU has native bf16"),
    (AVX2, torch.bfloat16, False, torch.float32, "dtype float32, not bfloat16: this CPU has no native bf16"),
    (AVX2, torch.float16, False, torch.float32, "dtype float32, not float16"),
    (AVX2, torch.bfloat16, True, torch.bfloat16, "dtype bfloat16 (this CPU has no native bf16)"),
    (AVX2, torch.float32, False, torch.float32, "dtype float32 (this CPU has no native bf16)"),
])
def test_dtype_settled_and_said_in_one_line(cpu, monkeypatch, caplog, flags, given, keep, served, said):
    cpu(flags)
    if keep:
        monkeypatch.setenv("EXTEMB_KEEP_DTYPE", "1")
    else:
        monkeypatch.delenv("EXTEMB_KEEP_DTYPE", raising=False)
    config = SimpleNamespace(dtype=given)
    with caplog.at_level(logging.INFO, logger="vllm.extemb.cpu"):
        cpu_settings.settle_dtype(config)
    assert config.dtype == served
    (line,) = [r.getMessage() for r in caplog.records if "ExtEmb CPU settings" in r.getMessage()]
    assert said in line and "tcmalloc" in line


def test_tcmalloc_said_as_it_is(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:/x/libgomp.so")
    assert cpu_settings.tcmalloc_line() == "tcmalloc preloaded (/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)"
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setattr(cpu_settings, "installed_tcmalloc", lambda: "/usr/lib/x/libtcmalloc_minimal.so.4")
    assert "start with LD_PRELOAD=/usr/lib/x/libtcmalloc_minimal.so.4" in cpu_settings.tcmalloc_line()
    monkeypatch.setattr(cpu_settings, "installed_tcmalloc", lambda: None)
    assert "not installed (scripts/setup.sh installs libtcmalloc-minimal4" in cpu_settings.tcmalloc_line()
