#!/usr/bin/env bash
# The README's first command: serve the embedded default with vLLM, show one
# over-long request through the OpenAI client, then keep serving (Ctrl-C stops).
# DEMO_EXIT=1 stops the server after the request (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8000}
# the README's serving command as written there (read from it: one copy), on loopback and $PORT
serve=$(.venv/bin/python -c "from extemb_vllm.bench.servers import readme_serve_command; print(readme_serve_command())")
PATH="$PWD/.venv/bin:$PATH" bash -c "exec env $serve --host 127.0.0.1 --port $PORT" >serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
echo "[demo] starting vllm serve --model extemb-llama2 on 127.0.0.1:$PORT (log: serve.log)"
for _ in $(seq 1 150); do
    if curl -sf "127.0.0.1:$PORT/v1/models" >/dev/null; then break; fi
    kill -0 $server 2>/dev/null || { tail -40 serve.log; exit 1; }
    sleep 2
done
.venv/bin/python examples/openai_client.py --base-url "http://127.0.0.1:$PORT/v1"
if [[ ${DEMO_EXIT:-0} == 1 ]]; then exit 0; fi
echo "[demo] still serving on http://127.0.0.1:$PORT/v1 (any OpenAI client); Ctrl-C to stop"
wait $server
