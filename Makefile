# Two commands on a fresh clone: `make serve` and `make test`. Each bootstraps .venv from
# pyproject.toml first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test check bench bench-models loadtest simulate grpc-protos prometheus-rules grafana-dashboard clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

# The gateway on $(HOST):$(PORT) with one worker per demo model (the demo repository is
# built on first use); Ctrl-C drains and stops everything.
serve: $(INSTALLED)
	$(BIN)/bazaar serve --host $(HOST) --port $(PORT)

# Set-up outside the checkout, once: the real Kubernetes control plane the tests run against
# (tests/controlplane/build.sh: about 10 minutes on 2 cores the first time, then nothing),
# checkov, MLServer and PyTriton (Triton's server) in venvs of their own (their pins conflict
# with ours; about 6 minutes each the first time); promtool from Debian's prometheus package.
test: $(INSTALLED)
	bash tests/controlplane/build.sh
	bash tests/deploy/checkov.sh
	bash tests/deploy/promtool.sh
	bash tests/upstreams/mlserver.sh
	bash tests/upstreams/triton.sh
	$(BIN)/python -m pytest

# Throughput and latency against raw ONNX Runtime and two reference servers (BENCHMARKS.md).
bench: $(INSTALLED)
	$(BIN)/bazaar bench

# Many small models: memory, time to ready, cold starts and Zipf throughput by layout
# (BENCHMARKS.md, issue 15).
bench-models: $(INSTALLED)
	$(BIN)/python -m loadtests.manymodels

# A Locust run against `make serve` (another terminal): verdict, report and plot in results/.
loadtest: $(INSTALLED)
	$(BIN)/bazaar loadtest --host http://$(HOST):$(PORT) --scenario steady --duration 30s

# The autoscaling benchmark: bazaar's policy against HPA, KEDA, Knative and Ray on nine traces,
# with the goal table (docs/autoscaling.md); again through Prometheus with a 15 s lag, and with
# a 60 s cold start.
simulate: $(INSTALLED)
	$(BIN)/bazaar simulate --out results/simulate/direct
	$(BIN)/bazaar simulate --metrics prometheus --lag-s 15 --out results/simulate/prometheus-lag-15
	$(BIN)/bazaar simulate --cold-start-s 60 --out results/simulate/cold-start-60

check: $(INSTALLED)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy protocol cluster models gateway autoscaler loadtests bazaar

# Regenerate protocol/grpc/*_pb2*.py from Triton's .proto files there, and
# autoscaler/keda/*_pb2*.py from KEDA's (grpcio-tools, pinned in the dev extra); each
# generate.sh says what it edits after protoc.
grpc-protos: $(INSTALLED)
	PATH=$(abspath $(BIN)):$$PATH bash protocol/grpc/generate.sh
	PATH=$(abspath $(BIN)):$$PATH bash autoscaler/keda/generate.sh

# The PrometheusRule of deploy/components/prometheus-operator/, from deploy/prometheus/rules.yaml.
prometheus-rules: $(INSTALLED)
	$(BIN)/python deploy/prometheus/prometheusrule.py

# deploy/grafana-dashboard.json, from the panels in deploy/dashboard.py.
grafana-dashboard: $(INSTALLED)
	$(BIN)/python deploy/dashboard.py

clean:
	rm -rf $(VENV) .bazaar .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
