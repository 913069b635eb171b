# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both do all the set-up on a fresh machine first.
PYTHON ?= python3
# torch is installed only when it is missing. The default is the CPU wheel that the CI machines
# keep on disk; on a GPU workstation run `make setup TORCH_SPEC=torch` (or install torch first).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[train,dev]"

demo: setup
	protoedge demo

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	protoedge bench fewshot && protoedge bench export && protoedge bench runtime && protoedge bench daemon
