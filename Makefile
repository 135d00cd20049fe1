# llmdesk: `make run` starts the main job, `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmdesk-installed
# llama.cpp is built from source by pip (about 7 minutes on 2 cores; pip caches the wheel after)
export CMAKE_ARGS ?= -DGGML_NATIVE=ON

.PHONY: install run test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# re-run the install only when the project's requirements change
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/llmdesk chat $(if $(MODEL),-m $(MODEL))

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build src/*.egg-info
