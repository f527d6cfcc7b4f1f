"""`extemb bench load`: many concurrent OpenAI clients against `vllm serve --model
extemb-llama2` and against the Ray app, bounded in time and count, loopback only.

The mix: long prompts (held-out text past the window, so the old part is compressed)
and short ones, completions and chat, streaming and not, and streams the client hangs up
on after a few chunks. Reported per server: requests sent / completed / cancelled by the
client / failed by cause, latency and TTFT percentiles, requests still unfinished on the
server after the run (a hung-up stream must be aborted and its KV blocks freed), and the
server's memory over time (the whole process tree), with its growth after warm-up.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

from ..machine import machine
from . import catalogue
from .clients import RequestSpec, drive, long_prompts, outcomes_json, summarize
from .servers import RayAppServer, VllmServer, metric, wait_until

SERVERS = ("vllm-serve", "ray-app")
SHORT = ["Write one sentence about the sea.", "Name three colours.", "What is two plus two?",
         "Say hello in French.", "Give a synonym for quick."]


def workload(long: list[str], n: int, seed: int = 0, long_share: float = 0.3, stream_share: float = 0.5,
             chat_share: float = 0.3, cancel_share: float = 0.15, gen: int = 16):
    """n request specs, drawn with fixed shares (same seed = same mix for every server)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        is_long = rng.random() < long_share
        prompt = long[i % len(long)] if is_long else SHORT[i % len(SHORT)]
        stream = bool(rng.random() < stream_share)
        cancel = 2 if stream and rng.random() < cancel_share / stream_share else None
        yield RequestSpec("long" if is_long else "short", prompt, gen, stream=stream,
                          chat=bool(rng.random() < chat_share), cancel_after=cancel)


class MemorySampler:
    """The server's process-tree memory every `interval_s`, in a thread."""

    def __init__(self, server, interval_s: float = 1.0):
        self.server, self.interval_s = server, interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def __enter__(self):
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while True:
            self.samples.append((time.perf_counter() - self.t0, self.server.memory_bytes()))
            if self._stop.wait(self.interval_s):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def unfinished_requests(base_url: str) -> float:
    """Requests the server still holds: running + waiting (`vllm serve`), or what the Ray
    ingress reports for its LLM replica."""
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "extemb:llm_unfinished_requests")
    return sum(metric(base_url, name) for name in names)


def memory_growth(samples: list[tuple[float, int]], warmup_share: float = 0.3) -> dict:
    """Memory at the end of warm-up (the first `warmup_share` of the run) against the highest
    and the last sample after it."""
    if len(samples) < 3:
        return {"after_warmup_bytes": None, "max_after_bytes": None, "growth_bytes": None}
    t_end = samples[-1][0]
    after = [m for t, m in samples if t >= warmup_share * t_end]
    return {"after_warmup_bytes": after[0], "max_after_bytes": max(after), "last_bytes": after[-1],
            "growth_bytes": max(after) - after[0], "growth_share": (max(after) - after[0]) / after[0]}


def kill_process(server, name: str) -> dict:
    """SIGKILL the first process of the server's tree whose command line contains `name` (a
    Ray replica is `ray::ServeReplica:<app>:<deployment>`): a crash, as the OOM killer does."""
    for p in server.processes()[1:]:
        try:
            if name in " ".join(p.cmdline()):
                p.kill()
                return {"process": name, "pid": p.pid}
        except psutil.Error:
            continue
    raise RuntimeError(f"no process matching {name!r} under {server.name}")


def run_one(server, specs, clients: int, duration_s: float, faults: list[tuple[float, str]] = ()) -> dict:
    """faults: (seconds into the run, process name) pairs, killed at those times."""
    injected = []

    def inject():
        for at, name in faults:
            time.sleep(max(0.0, at - (time.perf_counter() - t0)))
            injected.append({"at_s": time.perf_counter() - t0, **kill_process(server, name)})

    with MemorySampler(server) as mem:
        t0 = time.perf_counter()
        killer = threading.Thread(target=inject, daemon=True)
        killer.start()
        outcomes = asyncio.run(drive(server.base_url, server.model, specs, clients, duration_s=duration_s))
        wall = time.perf_counter() - t0
        killer.join(timeout=1)
        time.sleep(3)  # let aborts of hung-up streams land
    res = summarize(outcomes, wall)
    res["faults"] = injected
    if faults:  # a killed replica is back only once the app serves again; its metrics with it
        res["served_after"] = wait_until(lambda: _serves(server), timeout_s=300, every_s=5)
    res["unfinished_on_server_after"] = unfinished_requests(server.base_url)
    res["memory"] = memory_growth(mem.samples)
    res["memory_samples"] = mem.samples
    res["outcomes"] = outcomes_json(outcomes)
    return res


# the Ray app's fault phase: an embedder replica, then the LLM replica, crash under load
RAY_FAULTS = ((0.25, "ServeReplica:extemb:EmbedderWorker"), (0.5, "ServeReplica:extemb:LLMWorker"))


def run(model_dir: Path, servers: list[str], clients: int, duration_s: float, max_requests: int,
        long_tokens: int, outdir: Path, faults: bool = True) -> dict:
    long = long_prompts(model_dir, 8, long_tokens)
    res = {"machine": machine(), "model": str(model_dir), "command": " ".join(sys.argv), "servers": {},
           "settings": dict(clients=clients, duration_s=duration_s, max_requests=max_requests,
                            long_tokens=long_tokens)}
    # the same engine settings as the Ray app's LLM replica (examples/ray/extemb.yaml; eager; the
    # plug-in's dtype for this CPU; tcmalloc preloaded where installed, servers.py)
    make = {"vllm-serve": lambda: VllmServer(model_dir, outdir / "vllm-serve.log",
                                             eager=True, extra_args=("--max-num-seqs", "16")),
            "ray-app": lambda: RayAppServer(model_dir, outdir / "ray-app")}
    for name in servers:
        print(f"[bench load] {name}: {clients} clients, at most {duration_s:g} s / {max_requests} requests",
              file=sys.stderr)
        with make[name]() as server:
            res["servers"][name] = run_one(server, workload(long, max_requests), clients, duration_s)
            _print(res["servers"][name])
            res["servers"][name]["bad_inputs"] = catalogue.answers_json(
                catalogue.run(server.base_url, server.model, catalogue.catalogue(long[0], _max_len(server)), name))
            if faults and name == "ray-app":
                print("[bench load] ray-app with faults: " + ", ".join(f"{n} at {f:.0%}" for f, n in RAY_FAULTS),
                      file=sys.stderr)
                res["faults"] = run_one(server, workload(long, max_requests, seed=1), clients, duration_s,
                                        faults=[(f * duration_s, n) for f, n in RAY_FAULTS])
                _print(res["faults"])
    return res


def _print(s: dict):
    print(f"  {s['completed']} completed, {s['cancelled_by_client']} hung up, {s['failed']} failed "
          f"{s['failed_by_cause'] or ''}", file=sys.stderr)


def _max_len(server) -> int:
    import json

    return json.loads(urllib.request.urlopen(server.base_url + "/v1/models").read())["data"][0]["max_model_len"]


def _serves(server) -> bool:
    import httpx

    try:
        r = httpx.post(server.base_url + "/v1/completions",
                       json={"model": server.model, "prompt": "Hi", "max_tokens": 2}, timeout=120)
    except httpx.HTTPError:  # e.g. held past the timeout while a replica restarts: not yet
        return False
    return r.status_code == 200


def format_table(res: dict) -> str:
    lines = ["server | sent | completed | hung up by client | failed (by cause) | p50 / p99 latency s | "
             "unfinished after | memory after warm-up -> max, MiB",
             "---|---|---|---|---|---|---|---"]
    for name, s in res["servers"].items():
        m = s["memory"]
        mem = (f"{m['after_warmup_bytes'] / 2**20:.0f} -> {m['max_after_bytes'] / 2**20:.0f}"
               if m["after_warmup_bytes"] else "n/a")
        lines.append(f"{name} | {s['sent']} | {s['completed']} | {s['cancelled_by_client']} | "
                     f"{s['failed']} {s['failed_by_cause'] or ''} | {s['latency_p50_s']:.1f} / "
                     f"{s['latency_p99_s']:.1f} | {s['unfinished_on_server_after']:g} | {mem}")
    if "faults" in res:
        f = res["faults"]
        lines += ["", "Ray app under the same load, replicas killed (SIGKILL) mid-run:", ""]
        lines += [f"- {x['process']} (pid {x['pid']}) at {x['at_s']:.0f} s" for x in f["faults"]]
        lines.append(f"- sent {f['sent']}: completed {f['completed']}, hung up by client {f['cancelled_by_client']}, "
                     f"failed {f['failed']} {f['failed_by_cause'] or ''}; served again afterwards: {f['served_after']}")
    for name, s in res["servers"].items():
        if "bad_inputs" in s:
            lines += ["", f"Bad inputs against {name}:", "", "input | expected | got | message | next request",
                      "---|---|---|---|---"]
            lines += [f"{a['name']} | {a['expected']} | {a['status']}{'' if a['ok'] else ' (UNEXPECTED)'} | "
                      f"{' '.join(a['message'].split())[:90].replace('|', '/')} | "
                      f"{'ok' if a['next_request_ok'] else 'FAILED'}"
                      for a in s["bad_inputs"]]
    return "\n".join(lines)


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in res["servers"].items():
        t, m = zip(*s["memory_samples"]) if s["memory_samples"] else ((), ())
        a.plot(t, [x / 2**30 for x in m], label=name)
        lat = sorted(o["latency_s"] for o in s["outcomes"] if o["status"] == "ok")
        b.plot(lat, np.linspace(0, 1, len(lat)), label=name)
    a.set(xlabel="seconds into the load test", ylabel="server memory, GiB (process tree RSS)", title="memory")
    b.set(xlabel="latency, s", ylabel="share of completed requests", title="latency CDF")
    a.legend()
    b.legend()
    fig.suptitle(res["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
