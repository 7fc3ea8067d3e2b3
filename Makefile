# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip takes these two from the local disk here; naming them first keeps any
# later resolution from pulling a multi-GB CUDA build from the network.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $@

demo: install
	$(BIN)/cosed demo

test: install
	$(BIN)/python -m pytest tests

# The inner loop: everything but the end-to-end runs on real (tiny) models and Ray clusters (-m slow).
# A few minutes; `make test` stays the check that counts.
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow" -x -q

bench: install
	$(BIN)/python ray_jobs/bench_engine.py

clean:
	rm -rf out .pytest_cache
