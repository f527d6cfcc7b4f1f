#!/usr/bin/env bash
# A training stretch on a GPU lent for minutes (issue 28): the shipped lineage trained on the GPU
# for what is left of one call (~8 minutes), its moving average brought back in shards, and
# `extemb compare` here deciding, as docs/training.md says. The steps, where each runs:
#
#   here    bash scripts/device_train.sh plan      pack the bundle (GGUF, gguf package, texts) into
#                                                  parts that fit beside the working tree, and print
#                                                  the device calls to make, in order
#   device  bash scripts/device_train.sh receive   one call per part but the last (carry that part)
#   device  OBJECTIVE="--key-weight 0" bash scripts/device_train.sh train
#                                                  the last part, then unpack, build, train, shard into $OUT
#   here    bash scripts/device_train.sh collect DIR [RUN]   DIR: where the call's files came back
#   here    bash scripts/device_train.sh dry-run [DIR]       all of it on this CPU, a few steps (the test)
#
# The limits it is cut to: a call runs <= 10 minutes, carries <= 64 MiB with the working tree
# (tracked ~57.5 MiB, so each part is what is left), brings back <= 8 files of <= 16 MiB, and a
# warm machine keeps what earlier calls left for ~30 s between calls: make the calls back to back.
# OBJECTIVE: extra `extemb train` flags (default --key-weight 0: language modelling only, the
# objective the CPU comparison kept); MINUTES: training at most (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=runs/device-stretch/stage
KEEP=/tmp/extemb-stretch/parts
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
stretch() { PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 "$PY" -m extemb_vllm.train.device_stretch "$@"; }

case "${1:-}" in
plan)
    # ASIDE=1: the receive calls are made with the shipped weights (54 MiB of the 57.5 MiB tree) moved
    # out of the tree, so each carries ~59 MiB of the bundle: 2 calls instead of 19; the train call,
    # with the weights back, carries no part
    stretch pack --stage "$STAGE" ${ROOM_MIB:+--room-mib "$ROOM_MIB"} ${ASIDE:+--weights-aside}
    "$PY" - "$STAGE" <<'EOF'
import json, sys
stage = sys.argv[1]
plan = json.load(open(f"{stage}/parts.json"))
parts = [p["name"] for p in plan["parts"]]
print(f"{len(parts)} parts of <= {plan['room_bytes'] / 2**20:.2f} MiB ({plan['bundle_bytes'] / 2**20:.1f} MiB in all); "
      f"device calls, back to back (a machine idle 30 s is given back and the parts with it):")
train = 'OBJECTIVE="--key-weight 0" MINUTES=8 bash scripts/device_train.sh train'
weights = "extemb_vllm/weights/smollm2-135m-embedder.safetensors"
if plan.get("weights_aside"):
    print(f"  here: mv {weights} /tmp/   (out of the tree for the receive calls)")
for i, name in enumerate(parts):
    last = i == len(parts) - 1 and not plan.get("weights_aside")
    carry = [f"{stage}/parts.json", f"{stage}/parts/{name}"]
    cmd = train if last else "bash scripts/device_train.sh receive"
    print(f'  run(command={cmd!r}, carry={json.dumps(carry)}, timeout_s={600 if last else 120})')
if plan.get("weights_aside"):
    print(f"  here: mv /tmp/{weights.rsplit('/', 1)[1]} {weights}   (back: the train call carries the lineage's start)")
    print(f'  run(command={train!r}, carry={json.dumps([f"{stage}/parts.json"])}, timeout_s=600)')
print("then here: bash scripts/device_train.sh collect <files_at> runs/gpu-stretch")
EOF
    ;;
receive)
    stretch receive --stage "$STAGE" --keep "$KEEP"
    ;;
train)
    stretch receive --stage "$STAGE" --keep "$KEEP"
    command -v nvidia-smi >/dev/null && nvidia-smi -L || true
    stretch train --keep "$KEEP" --back "${OUT:?OUT: the folder whose files come back}" \
        --minutes "${MINUTES:-8}" --objective="${OBJECTIVE:---key-weight 0}" ${DEADLINE_S:+--deadline-s "$DEADLINE_S"}
    ;;
collect)
    stretch collect "${2:?collect DIR: the folder where the device call files came back}" --run "${3:-runs/gpu-stretch}"
    echo "next: extemb export --run ${3:-runs/gpu-stretch} --ema --out ${3:-runs/gpu-stretch}/candidate.safetensors" \
        "and extemb compare (docs/training.md, step 4)"
    ;;
dry-run)
    # This CPU plays the lent machine: parts of 24 MiB, each received in a call of its own (a fresh
    # stage holding only that part), then the train step on the CPU, a few 1024-token steps, collected.
    DIR=${2:-runs/device-stretch/dry-run}
    rm -rf "$DIR" && mkdir -p "$DIR"
    stretch pack --stage "$DIR/stage" --room-mib "${ROOM_MIB:-24}" --xz-preset 1 \
        --sources ${SOURCES:-shakespeare}
    for part in $("$PY" -c "import json,sys; print(' '.join(p['name'] for p in json.load(open(sys.argv[1]))['parts']))" \
                  "$DIR/stage/parts.json"); do
        rm -rf "$DIR/call" && mkdir -p "$DIR/call/parts"
        cp "$DIR/stage/parts.json" "$DIR/call/" && cp "$DIR/stage/parts/$part" "$DIR/call/parts/"
        stretch receive --stage "$DIR/call" --keep "$DIR/keep"
    done
    stretch train --keep "$DIR/keep" --work "$DIR/work" --back "$DIR/back" --device cpu --steps 2 --minutes 1 \
        --objective="${OBJECTIVE:---key-weight 0} --accum 1 --sample-len 1024"
    stretch collect "$DIR/back" --run "$DIR/run"
    ;;
*)
    sed -n '2,21p' "$0"
    exit 2
    ;;
esac
