# Two set-up commands (README): `make serve` and `make test`. Everything else is a step they share.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= build/model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: install perf-analyzer serve test export

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,quality]"
	# The CLIP BPE vocabulary ships in this wheel; --no-deps keeps its torchvision pin off our torch.
	$(BIN)/pip install -q --no-deps clip-anytorch==2.6.0
	touch $@

install: $(VENV)/.installed

# perf_analyzer for the SLO harness. Its stamp exists only after a successful install, so a failure warns
# (one line: what failed) and is retried by the next `make test`; until then the tests that need it skip,
# naming it. The script's full output is in $(VENV)/perf_analyzer.log.
$(VENV)/.perf_analyzer: perf/install_perf_analyzer.sh $(VENV)/.installed
	@if bash perf/install_perf_analyzer.sh $(VENV) >$(VENV)/perf_analyzer.log 2>&1; then touch $@; else \
	  echo "warning: perf_analyzer is not installed: $$(tail -n 1 $(VENV)/perf_analyzer.log); tests that need it skip; the next make test retries (log: $(VENV)/perf_analyzer.log)" >&2; fi

perf-analyzer: $(VENV)/.perf_analyzer

export: install
	$(BIN)/python -m triffusion.export build --registry registry.example.yaml --family tiny --baselines --out $(REPO)

serve: export
	$(BIN)/triffusion serve --repo $(REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: install $(VENV)/.perf_analyzer
	$(BIN)/python -m pytest -q
