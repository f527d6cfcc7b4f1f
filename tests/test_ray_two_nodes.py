"""Many nodes, tested on one machine (issue 28): a Ray head and a second Ray node started here as
examples/ray/README.md starts them on several machines (token authentication, the head's token
handed to the node), the Ray app with its embedder pool pinned to one node and its LLM replica to
the other answering an over-long request, and Ray Train's workers spread over both nodes: one of
them killed mid-run, replaced, the run continued from its last checkpoint, and the same command
again resuming the finished run.

What one machine cannot show: the network between machines (here loopback, no bandwidth or
latency of a real link, and Ray's object transfers stay on one host), GPUs (the workers use gloo on
CPUs; nccl and --gpu are not exercised), and storage that nodes share over a network (both nodes
see the same local disk, which stands in for NFS or s3://).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_TEXT
from .ray_nodes import TwoNodes

pytestmark = pytest.mark.engine  # Ray runtimes, a vLLM engine and Ray Train workers

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    cluster = TwoNodes(tmp_path_factory.mktemp("two-nodes"), head={"cpus": 3, "resources": {"embedder": 1}},
                       node={"cpus": 3, "resources": {"llm": 1}})
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _driver(code: str, env: dict) -> object:
    """Run a few lines as a Ray driver on the cluster; their last printed line, parsed as JSON."""
    out = subprocess.run([sys.executable, "-c", "import json, ray\nray.init(log_to_driver=False)\n" + code],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_second_node_joins_only_with_the_heads_token(nodes):
    assert "InvalidAuthToken" in nodes.refused  # what a new user saw, following the old instructions
    alive = _driver("print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))", nodes.client_env())
    assert sorted(k for r in alive for k in r if k in ("embedder", "llm")) == ["embedder", "llm"]
    assert len(alive) == 2


def test_app_with_pools_pinned_apart_answers_an_over_long_request(nodes, tiny_checkpoint, tmp_path):
    import httpx

    from extemb_vllm.bench.servers import free_port, ray_app_config, wait_until

    port = free_port()
    config = ray_app_config(tiny_checkpoint, port, tmp_path, embedder_replicas=1,
                            engine_kwargs={"max_model_len": 64, "max_num_batched_tokens": 512, "block_size": 32})
    cfg = yaml.safe_load(config.read_text())
    pools = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    pools["EmbedderWorker"]["ray_actor_options"]["resources"] = {"embedder": 1}  # as the README's multi-node config
    pools["LLMWorker"]["ray_actor_options"]["resources"] = {"llm": 1}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = nodes.client_env()
    deploy = subprocess.run([str(BIN / "serve"), "run", "--non-blocking", str(config)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(base + "/v1/models", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout_s=400, every_s=2)
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        prompt = [(i * 37) % 290 + 5 for i in range(200)]  # 200 tokens against a 64-position window
        r = httpx.post(base + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4,
                                                        "temperature": 0}, timeout=300)
        assert r.status_code == 200, r.text
        body = r.json()
        # the positions the LLM read (a usage extension where the app reports one): compressed into the window
        read = body["usage"].get("extemb", {}).get("prompt_positions", body["usage"]["prompt_tokens"])
        assert body["usage"]["completion_tokens"] >= 1 and read <= 64 - 4
        # where the replicas run: the embedder on the node with `embedder`, the LLM on the one with `llm`
        placed = _driver("from ray._private import state\n"
                         "nodes = {n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}\n"
                         "pools = {}\n"
                         "for a in state.actors().values():\n"
                         "    name = a.get('ActorClassName', '')\n"
                         "    if a['State'] == 'ALIVE' and name.endswith(('EmbedderWorker', 'LLMWorker')):\n"
                         "        pools[name.rsplit(':', 1)[-1]] = sorted(nodes[a['Address']['NodeID']])\n"
                         "print(json.dumps(pools))", env)
        assert "embedder" in placed["EmbedderWorker"] and "llm" not in placed["EmbedderWorker"]
        assert "llm" in placed["LLMWorker"] and "embedder" not in placed["LLMWorker"]
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y"], env=env, cwd=ROOT, capture_output=True, timeout=120)


def _train(nodes, tmp_path: Path, tiny_checkpoint, steps: int) -> subprocess.Popen:
    texts = tmp_path / "texts"
    if not texts.exists():
        texts.mkdir()
        for i, name in enumerate("abcdef"):
            (texts / f"{name}.txt").write_text(TINY_TEXT[i * 97 :] + TINY_TEXT[: i * 97])
    cmd = [str(BIN / "extemb"), "train", "--model", str(tiny_checkpoint), "--data", str(texts),
           "--out", str(tmp_path / "out" / "tiny-run"), "--ray-storage", str(tmp_path / "storage"),
           "--ray-workers", "2", "--ray-placement", "STRICT_SPREAD", "--sample-len", "48", "--chunk-len", "12",
           "--k-ladder", "2,4", "--accum", "1", "--steps", str(steps), "--save-every", "10", "--eval-samples", "0",
           "--ema", "0.5", "--cache-dir", str(tmp_path / "cache")]
    log = open(tmp_path / f"train-{steps}.log", "w")
    return subprocess.Popen(cmd, env=nodes.client_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _registered(storage: Path) -> str | None:
    """The last checkpoint Ray Train's controller registered (its snapshot in the run's storage)."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def _sessions(log: Path) -> list[dict]:
    return [r for r in map(json.loads, open(log)) if r["kind"] == "session"]


def test_ray_train_over_two_nodes_survives_a_killed_worker_and_resumes(nodes, tiny_checkpoint, tmp_path):
    import psutil

    run = _train(nodes, tmp_path, tiny_checkpoint, steps=60)
    storage = tmp_path / "storage" / "tiny-run"
    victim = None
    deadline = time.time() + 300
    while victim is None and run.poll() is None and time.time() < deadline:
        latest = _registered(storage)  # a checkpoint Ray Train has taken in (not only written)
        if latest and int(latest.split("-")[1]) >= 10:
            ranks = _sessions(storage / latest / "log.jsonl")[-1]["ranks"]
            victim = next(m for m in ranks if m["rank"] == 1)
            assert victim["pid"] in {p.pid for p in nodes.processes()}  # a worker of this cluster, nothing else
            psutil.Process(victim["pid"]).send_signal(signal.SIGKILL)
            killed_after = int(latest.split("-")[1])
        time.sleep(0.1)
    assert victim is not None, (tmp_path / "train-60.log").read_text()[-3000:]
    assert run.wait(timeout=400) == 0, (tmp_path / "train-60.log").read_text()[-4000:]

    out = tmp_path / "out" / "tiny-run"
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 61))  # each step once
    first, again = _sessions(out / "log.jsonl")
    assert first["step"] == 0 and again["step"] >= killed_after and again["step"] % 10 == 0
    assert victim["pid"] not in {m["pid"] for m in again["ranks"]}  # a new worker took its place
    for s in (first, again):
        assert (s["runner"], s["world"], s["backend"]) == ("ray train", 2, "gloo")
        assert len({m["node"] for m in s["ranks"]}) == 2  # one worker on each node

    # the same command again, under the same name: Ray Train hands back the last checkpoint
    more = _train(nodes, tmp_path, tiny_checkpoint, steps=70)
    assert more.wait(timeout=400) == 0, (tmp_path / "train-70.log").read_text()[-4000:]
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 71))
    assert [s["step"] for s in _sessions(out / "log.jsonl")][-1] == 60
