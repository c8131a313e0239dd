# The two set-up commands of the README. Both create .venv and install the project on first use.
#   make run   - run the default catalog end to end (Prefect ephemeral, MLflow sqlite, DVC local remote)
#   make test  - run the test suite (offline, CPU)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: run test install clean-run

run: $(STAMP)
	$(BIN)/conceptflow run --catalog catalog.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info[:2] == (3, 11), 'conceptflow needs Python 3.11, found ' + sys.version"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@$(BIN)/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), 'torch moved: ' + torch.__version__; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	rm -f $(VENV)/.installed-*
	touch $@

clean-run:
	rm -rf data/concepts data/adapters data/fused data/generated data/metrics data/report mlruns.db mlartifacts .prefect .cache/checkpoints .dvc-remote dvc.lock
