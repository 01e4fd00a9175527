# Two set-up commands (README): `make serve` and `make test`. Everything else is a step they share.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= build/model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: install serve test export

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,quality]"
	# The CLIP BPE vocabulary ships in this wheel; --no-deps keeps its torchvision pin off our torch.
	$(BIN)/pip install -q --no-deps clip-anytorch==2.6.0
	# perf_analyzer for the SLO harness (tests skip its smoke run, naming it, where this cannot install it).
	-bash perf/install_perf_analyzer.sh $(VENV)
	touch $@

install: $(VENV)/.installed

export: install
	$(BIN)/python -m triffusion.export build --preset tiny --unet-variant tiny-lite --cascade tiny-lite --baselines --out $(REPO)

serve: export
	$(BIN)/triffusion serve --repo $(REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: install
	$(BIN)/python -m pytest -q
