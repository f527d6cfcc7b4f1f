#!/usr/bin/env bash
# The README's first command: serve the embedded default with vLLM (the README's serving command),
# send it a document longer than the base model's context through the OpenAI client, send the same
# request to plain vLLM serving the same base model, then keep serving (Ctrl-C stops).
# DEMO_EXIT=1 stops the server after the requests (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8000}
PLAIN_PORT=${PLAIN_PORT:-$((PORT + 1))}
py=.venv/bin/python
# the README's serving command as written there (read from it: one copy), on loopback and $PORT
serve=$($py -c "from extemb_vllm.bench.servers import readme_serve_command; print(readme_serve_command())")
PATH="$PWD/.venv/bin:$PATH" bash -c "exec env $serve --host 127.0.0.1 --port $PORT" >serve.log 2>&1 &
server=$!
# plain vLLM on the same base weights (the checkpoint without its embedder), only to show what it
# does with the same request: eager, as it has nothing to run
plain_dir=$($py -c "from extemb_vllm.bench.engines import plain_llama_dir; print(plain_llama_dir('extemb-llama2'))")
PATH="$PWD/.venv/bin:$PATH" VLLM_CPU_NUM_OF_RESERVED_CPU=0 vllm serve "$plain_dir" --served-model-name smollm2-plain \
    --kv-cache-memory-bytes 1G --enforce-eager --host 127.0.0.1 --port "$PLAIN_PORT" >serve-plain.log 2>&1 &
plain=$!
trap 'kill $server $plain 2>/dev/null || true' EXIT
echo "[demo] starting vllm serve --model extemb-llama2 on 127.0.0.1:$PORT (log: serve.log), and plain vLLM on"
echo "[demo] the same base model on 127.0.0.1:$PLAIN_PORT (log: serve-plain.log); the first start takes a minute or two"
for port in "$PORT" "$PLAIN_PORT"; do
    for _ in $(seq 1 300); do
        if curl -sf "127.0.0.1:$port/v1/models" >/dev/null; then break; fi
        kill -0 $server 2>/dev/null || { tail -40 serve.log; exit 1; }
        kill -0 $plain 2>/dev/null || { tail -40 serve-plain.log; exit 1; }
        sleep 2
    done
done
# every distinct settings line (dtype and tcmalloc; on CPU also the prefill step), in the order logged
grep -ho "ExtEmb CPU settings: .*" serve.log | awk '!seen[$0]++' | sed 's/^/[demo] /'
echo
$py scripts/demo_client.py --base-url "http://127.0.0.1:$PORT/v1" --plain-url "http://127.0.0.1:$PLAIN_PORT/v1"
kill $plain 2>/dev/null || true
if [[ ${DEMO_EXIT:-0} == 1 ]]; then exit 0; fi
echo
echo "[demo] still serving on http://127.0.0.1:$PORT/v1 (any OpenAI client; /metrics for Prometheus); Ctrl-C to stop"
wait $server
