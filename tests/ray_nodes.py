"""A Ray cluster of two nodes on this machine, started as examples/ray/README.md tells users to start
one on several machines: token authentication, the head's token handed to the second node.

Each node has its own home directory (no ~/.ray/auth_token shared through a common home, as on
two machines), its own temporary directory and resources; the processes are found by those
directories and stopped by their ids, never by name (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from extemb_vllm.bench.servers import free_port

BIN = Path(sys.executable).parent


class TwoNodes:
    def __init__(self, root: Path, head: dict, node: dict):
        self.root, self.head_spec, self.node_spec = Path(root), head, node
        # Ray's sockets live under its temporary directory: a short path (AF_UNIX paths are <= 107 bytes)
        self.ray_root = Path(tempfile.mkdtemp(prefix="extemb-2n-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token_file = self.root / "head-home" / ".ray" / "auth_token"
        self.refused = ""  # what `ray start` on the second node said without the token

    def _env(self, home: str, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(self.root / home), RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def _start(self, home: str, args: list[str], spec: dict, env: dict, timeout: float = 120):
        cmd = [str(BIN / "ray"), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(spec["cpus"]),
               "--resources", json.dumps(spec["resources"]), "--temp-dir", str(self.ray_root / home),
               "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    def start(self):
        (self.root / "head-home").mkdir(parents=True)
        (self.root / "node-home").mkdir(parents=True)
        # the head: a token of its own, and token mode said explicitly (README)
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self._env("head-home"),
                       capture_output=True, check=True, timeout=60)
        head = self._start("head-home", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                         "--ray-client-server-port", str(free_port())],
                           self.head_spec, self._env("head-home", RAY_AUTH_MODE="token"))
        if head.returncode:
            raise RuntimeError(f"ray start --head failed:\n{head.stdout[-2000:]}{head.stderr[-2000:]}")
        # the second node as a new user would start it (no token): refused; a short connect window
        bare = self._start("node-home", ["--address", self.address], self.node_spec,
                           self._env("node-home", RAY_gcs_server_port_wait_time_s="2"))
        self.refused = bare.stdout + bare.stderr if bare.returncode else ""
        # with the head's token (copied to the node; here an environment variable) and token mode
        node = self._start("node-home", ["--address", self.address], self.node_spec, self.client_env("node-home"))
        if node.returncode:
            raise RuntimeError(f"ray start --address failed:\n{node.stdout[-2000:]}{node.stderr[-2000:]}")
        return self

    def client_env(self, home: str = "node-home") -> dict:
        """What a driver on any node needs (serve run, extemb train --ray-workers): the address, token mode
        and the head's token."""
        return self._env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token_file.read_text().strip(),
                         RAY_ADDRESS=self.address)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those whose command line names one of its directories, and their
        children (workers rename themselves `ray::...`)."""
        marks = (str(self.ray_root / "head-home"), str(self.ray_root / "node-home"))
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != os.getpid() and any(m in a for a in p.info["cmdline"] or [] for m in marks):
                    found[p.pid] = p
                    found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
        return list(found.values())

    def stop(self):
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.ray_root, ignore_errors=True)
