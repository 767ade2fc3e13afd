# The two commands a newcomer needs: `make demo` and `make test` (both set up first).
PY := .venv/bin/python
export MALLOC_MMAP_THRESHOLD_ := 1073741824
export MALLOC_TRIM_THRESHOLD_ := 4294967296

.PHONY: setup test test-fast demo serve web bench clean

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

# Serve on loopback until Ctrl-C: `make serve CHECKPOINT=checkpoints/X.pt` first exports the
# checkpoint into REPOSITORY (models NAME_score and NAME_sample, NAME = the architecture unless
# given); `make serve` alone serves REPOSITORY as it is. `make serve REPLICAS=N`: N tritonserver
# replicas (free ports) behind nginx, the gRPC load balancer, on GRPC_PORT (python -m pixelrnn.server.cluster).
# CLUSTER_FLAGS: more of its flags, e.g. "--tls-cert DIR/server.pem --tls-key DIR/server.key --token-file DIR/token".
REPOSITORY ?= model_repository
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
serve: setup
ifdef CHECKPOINT
	$(PY) export/build_engine.py --checkpoint $(CHECKPOINT) --repository $(REPOSITORY) $(if $(NAME),--name $(NAME))
endif
ifdef REPLICAS
	$(PY) -m pixelrnn.server.cluster --replicas $(REPLICAS) --repository $(REPOSITORY) --port $(GRPC_PORT) $(CLUSTER_FLAGS)
else
	$(PY) -m pixelrnn.server --repository $(REPOSITORY) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT)
endif

# The live web page (web/): `make web` serves REPOSITORY (CHECKPOINT: exported into it first, as
# `make serve` does) on tritonserver plus the page's gateway at http://localhost:$(WEB_PORT)/.
WEB_PORT ?= 8080
web: setup
ifdef CHECKPOINT
	$(PY) export/build_engine.py --checkpoint $(CHECKPOINT) --repository $(REPOSITORY) $(if $(NAME),--name $(NAME))
endif
	REPOSITORY=$(REPOSITORY) GRPC_PORT=$(GRPC_PORT) HTTP_PORT=$(HTTP_PORT) METRICS_PORT=$(METRICS_PORT) WEB_PORT=$(WEB_PORT) bash scripts/web.sh

# docs/measurements.md from bench/results/*.json (python -m bench.report; tests/test_docs.py checks it).
.PHONY: docs
docs:
	$(if $(wildcard $(PY)),$(PY),python3) -m bench.report
