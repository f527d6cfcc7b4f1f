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


def test_retired_patches_are_not_applied():
    """0002/0003 are done by the middleware now: vLLM's files carry them no more."""
    site = sysconfig.get_paths()["purelib"]
    for patch in sorted((ROOT / "patches" / "retired").glob("*.patch")):
        r = subprocess.run(["patch", "-d", site, "-p1", "-R", "-f", "--dry-run"], stdin=open(patch),
                           capture_output=True, text=True)
        assert r.returncode != 0, f"{patch.name} is still applied to the installed vLLM"
