# The two commands of the README. Both run tools/setup.sh first (idempotent: a second run takes seconds).
.PHONY: demo test

# A long streamed generation on the default model; the status lines show the cache staying at 256 cells.
demo:
	./tools/setup.sh
	.venv/bin/pymemory generate "Chapter 1. The lighthouse keeper had not spoken to anyone in years, until" \
		--n-sink 4 --window 252 --max-tokens 20000 --ignore-eos --temperature 0.8 --status-every 10

# The test suite (fetches the three test models and the Austen texts on first run). PYTHONFAULTHANDLER: a crash,
# even at interpreter exit, prints every thread's Python stack; --durations lists the slowest tests.
test:
	./tools/setup.sh --dev
	PYTHONFAULTHANDLER=1 .venv/bin/python -m pytest -q --durations=25
