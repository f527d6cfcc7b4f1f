# The two README commands. Each one sets up ./.venv first (idempotent, fast when done).
.PHONY: demo serve reference-demo test test-fast setup

setup:
	@bash scripts/setup.sh

# Main job on the embedded default: prepare texts, build ./extemb-llama2 (reused
# when up to date), start `vllm serve --model extemb-llama2` (the README's command) and
# plain vLLM on the same base, send both a document longer than the base model's context
# through the OpenAI client, and keep serving the first (scripts/serve_demo.sh).
demo: setup
	@.venv/bin/extemb data >/dev/null
	@.venv/bin/extemb build
	@bash scripts/serve_demo.sh

# The same document continued by the plain-transformers reference model.
reference-demo: setup
	@.venv/bin/extemb data >/dev/null
	@.venv/bin/extemb build
	@.venv/bin/extemb demo

# The whole test suite, slow tests included (they use the real SmolLM2 default).
test: setup
	@.venv/bin/python -m pytest

# Daily work: the unit tests, no real engine, Ray runtime or server (a few minutes); CI runs `make test`.
test-fast: setup
	@.venv/bin/python -m pytest -m "not slow and not engine" -q
