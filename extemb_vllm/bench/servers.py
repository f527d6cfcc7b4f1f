"""The two servers the serving benchmarks drive, each started as users start it and torn down
with everything it spawned: `vllm serve --model <ckpt>` (the in-engine plug-in) and the Ray
app (`serve run` of a config like examples/ray/extemb.yaml). Both speak the OpenAI API on
loopback; `memory_bytes()` is the resident memory of the server's whole process tree (the
API server, engine core, Ray's raylet and every replica)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = ROOT / "examples" / "ray" / "extemb.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_text(base_url: str) -> str:
    return urllib.request.urlopen(base_url + "/metrics", timeout=10).read().decode()


def metric(base_url: str, name: str, text: str | None = None) -> float:
    """A gauge or counter from a server's Prometheus /metrics (or from `text`, one scrape of it),
    summed over its labels; 0 where the server has no such series."""
    text = metrics_text(base_url) if text is None else text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def has_metric(base_url: str, name: str) -> bool:
    return re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ", metrics_text(base_url), re.M) is not None


def server_settings(log: Path) -> str | None:
    """What the plug-in chose at start-up (dtype, tcmalloc): its "ExtEmb CPU settings: dtype" log line
    (the prefill-step line is logged beside it, in either order)."""
    found = re.findall(r"ExtEmb CPU settings: (dtype .*)", Path(log).read_text(errors="replace"))
    return found[-1].strip() if found else None


def wait_until(pred, timeout_s: float = 60, every_s: float = 0.5) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(every_s)
    return pred()


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Server:
    """A server subprocess in its own session (so teardown reaches all it spawned)."""

    name = "server"

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None, startup_s: float = 600,
                 cwd: Path = ROOT):
        self.cmd, self.port, self.log, self.startup_s, self.cwd = cmd, port, Path(log), startup_s, cwd
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
        self.env.update(HF_HUB_OFFLINE="1", **(env or {}))
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + self.startup_s
        while not self.ready():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not come up (log {self.log}):\n{self.log.read_text()[-3000:]}")
            time.sleep(2)
        return self

    def ready(self) -> bool:
        try:
            urllib.request.urlopen(self.base_url + "/v1/models", timeout=2)
            return True
        except urllib.error.HTTPError as e:  # up, but wants a key: that is ready too
            return e.code == 401
        except OSError:
            return False

    def memory_bytes(self) -> int:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
        return total

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            tree = self.processes()  # Ray starts some processes in sessions of their own
            os.killpg(self.proc.pid, signal.SIGINT)  # both servers shut down cleanly on Ctrl-C
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            for p in tree:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log_file.close()

    def processes(self) -> list:
        """The server process and everything it spawned (Ray's raylet, replicas, engine cores)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def __exit__(self, *exc):
        self.stop()
        return False


def readme_serve_line(model_dir: Path | str, readme: Path = ROOT / "README.md") -> str:
    """The README's serving command with another model: its environment (tcmalloc, the metrics
    directory, ...) and flags as written there (the README says why for each), so the benchmarks
    start what users are shown. A bash command line: the README's `$(...)` are bash's."""
    command = readme_serve_command(readme)
    if " --model extemb-llama2 " not in f"{command} ":
        raise ValueError(f"the README's serving command does not name --model extemb-llama2: {command}")
    return f"{command} ".replace(" --model extemb-llama2 ", f" --model {shlex.quote(str(model_dir))} ", 1).strip()


class VllmServer(Server):
    """`vllm serve` as the README starts it. `dtype` and `eager` depart from it (tests that compare
    with a float32 reference); left out, the server runs as users run it."""

    name = "vllm serve"

    def __init__(self, model_dir: Path, log: Path, port: int | None = None, dtype: str | None = None,
                 eager: bool = False, api_key: str | None = None, extra_args: tuple[str, ...] = (),
                 env: dict | None = None):
        port = port or free_port()
        args = ["--host", "127.0.0.1", "--port", str(port), *(["--dtype", dtype] if dtype else []),
                *(["--enforce-eager"] if eager else []), *(["--api-key", api_key] if api_key else []), *extra_args]
        line = f"exec env {readme_serve_line(model_dir)} {shlex.join(args)}"
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"  # this environment's `vllm`
        super().__init__(["bash", "-c", line], port, log, env={"PATH": path, **(env or {})})
        self.model = str(model_dir)


def ray_app_config(model_dir: Path, port: int, workdir: Path, embedder_replicas: int | None = None,
                   api_keys: list[str] | None = None, engine_kwargs: dict | None = None) -> Path:
    """examples/ray/extemb.yaml with this run's model, port and store directories."""
    cfg = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"].update(model_dir=str(model_dir), store_dir=str(workdir / "chunks"),
                       contexts_dir=str(workdir / "contexts"))
    if api_keys:
        app["args"]["api_keys"] = list(api_keys)
    if engine_kwargs:
        app["args"]["engine_kwargs"] = {**app["args"].get("engine_kwargs", {}), **engine_kwargs}
    if embedder_replicas:
        next(d for d in app["deployments"] if d["name"] == "EmbedderWorker")["num_replicas"] = embedder_replicas
    path = workdir / "serve-config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class RayAppServer(Server):
    name = "Ray app (serve run)"

    def __init__(self, model_dir: Path, workdir: Path, port: int | None = None, **config_kw):
        port = port or free_port()
        config = ray_app_config(model_dir, port, Path(workdir), **config_kw)
        # `serve run` starts a private local Ray runtime for this server, torn down with it; its
        # processes preload tcmalloc where installed, as the README's command does for `vllm serve`
        from ..vllm_plugin.cpu_settings import installed_tcmalloc

        tcmalloc = {"LD_PRELOAD": path} if (path := installed_tcmalloc()) else {}
        super().__init__([_bin("serve"), "run", str(config)], port, Path(workdir) / "serve.log",
                         env={"RAY_USAGE_STATS_ENABLED": "0", **tcmalloc})
        self.model = Path(model_dir).name


def readme_serve_command(readme: Path = ROOT / "README.md") -> str:
    """The `vllm serve` command of the README's "Serving" section, as written (continuation
    lines joined): the tests and the thread measurement run exactly what users are shown."""
    section = readme.read_text().split("\n## Serving", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    command = block.replace("\\\n", " ")
    lines = [line.strip() for line in command.splitlines() if "vllm serve" in line]
    if len(lines) != 1:
        raise ValueError(f"expected one `vllm serve` line in the README's Serving block, found {lines}")
    return " ".join(lines[0].split())
