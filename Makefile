# The two commands a newcomer needs: `make demo` and `make test` (both set up first).
PY := .venv/bin/python
export MALLOC_MMAP_THRESHOLD_ := 1073741824
export MALLOC_TRIM_THRESHOLD_ := 4294967296

.PHONY: setup test test-fast demo serve bench clean

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

# Unit tests only (no real Triton server, no multi-process runs).
test-fast: setup
	$(PY) -m pytest -q -m "not triton and not slow and not reliability"

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf .venv .triton .pytest_cache runs
