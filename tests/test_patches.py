"""Every patch in patches/ is applied to the installed vLLM, which is the pinned version."""

import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "patches").glob("*.patch"))


def test_installed_vllm_is_the_pinned_version():
    import vllm

    pins = [line for line in (ROOT / "pyproject.toml").read_text().splitlines() if "vllm" in line and "==" in line]
    assert pins and all(f"=={vllm.__version__}" in line for line in pins), (vllm.__version__, pins)


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_is_applied(patch):
    site = sysconfig.get_paths()["purelib"]
    # reverse dry-run succeeds only where every hunk of the patch is in place
    r = subprocess.run(["patch", "-d", site, "-p1", "-R", "-f", "--dry-run"], stdin=open(patch), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_vllm_cli_starts():
    import sys

    r = subprocess.run([str(Path(sys.executable).parent / "vllm"), "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    import vllm

    assert r.stdout.strip().endswith(vllm.__version__)


def test_unknown_request_fields_are_refused():
    """0003: a misspelt top-level option is a 400 (pydantic error naming it), not silently ignored;
    known fields and extra fields of nested objects are unaffected."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    with pytest.raises(ValidationError, match="max_token"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_token": 5})
    with pytest.raises(ValidationError, match="mm_processor_kwarg"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "mm_processor_kwarg": {"k": 8}})
    ok = CompletionRequest.model_validate({"model": "m", "prompt": "x", "mm_processor_kwargs": {"k": 8}})
    assert ok.mm_processor_kwargs == {"k": 8}  # an extra vLLM reads (getattr) on completions
    ok = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x", "name": "a"}],
                                               "max_tokens": 3, "mm_processor_kwargs": {"k": 8}})
    assert ok.max_tokens == 3
