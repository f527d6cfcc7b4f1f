# The two README commands. Each one sets up ./.venv first (idempotent, fast when done).
.PHONY: demo test setup

setup:
	@bash scripts/setup.sh

# Main job on the embedded default: prepare texts, build ./extemb-llama2 (reused
# when up to date), continue a long held-out document through the reference model.
demo: setup
	@.venv/bin/extemb data >/dev/null
	@.venv/bin/extemb build
	@.venv/bin/extemb demo

# The whole test suite, slow tests included (they use the real SmolLM2 default).
test: setup
	@.venv/bin/python -m pytest
