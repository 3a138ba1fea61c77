# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_WHEEL := $(VENV)/.llama-wheel
LLAMA_REQ := $(shell sed -n "s/^llama-cpp-python\[server\]/llama-cpp-python/p" requirements.txt)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF

.PHONY: run test bench venv clean-venv

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# llama.cpp is built for a portable x86-64 (AVX2/FMA), never -march=native: the native build on our machines (a
	# CPU with AMX) segfaulted on every prompt of more than one token. No wheel cache, so an old native build is never
	# reused. Without the multimodal library (LLAVA_BUILD=OFF, 140 objects instead of 193): the chat is text only.
	# Its compile (about 3.5 minutes, both cores) runs as a wheel build beside the rest of the install (about 2.5
	# minutes of fetching and unpacking, mostly one core), which it never touches; the wheel is installed after.
	# torch goes first, pinned: this takes the local CPU wheel; any other spec pulls CUDA packages.
	rm -rf $(LLAMA_WHEEL) && mkdir -p $(LLAMA_WHEEL)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(LLAMA_WHEEL) \
	    "$(LLAMA_REQ)" > $(LLAMA_WHEEL)/build.log 2>&1 & build=$$!; \
	grep -v '^llama-cpp-python' requirements.txt > $(LLAMA_WHEEL)/rest.txt \
	  && $(BIN)/pip install -q torch==2.13.0 && $(BIN)/pip install -q -r $(LLAMA_WHEEL)/rest.txt; rest=$$?; \
	wait $$build || { echo "llama-cpp-python failed to build:"; tail -40 $(LLAMA_WHEEL)/build.log; exit 1; }; \
	exit $$rest
	$(BIN)/pip install -q "$$(ls $(LLAMA_WHEEL)/llama_cpp_python-*.whl)[server]"
	$(BIN)/pip install -q -r requirements.txt
	rm -rf $(LLAMA_WHEEL)
	touch $(STAMP)

venv: $(STAMP)

# Streamlit's server-wide upload cap (MiB) must let through what KB_UPLOAD_MAX_BYTES (env or secrets.toml) allows,
# rounded up, and never drop below its default of 200, which the snapshot import (Collections page) relies on. The
# Sources uploader states and enforces KB_UPLOAD_MAX_BYTES itself (its own max_upload_size). With unusable settings
# the cap stays at 200 and every page shows the settings error.
UPLOAD_MB = $(BIN)/python -c 'import math; from core.settings import load_settings; print(max(200, math.ceil(load_settings().upload_max_bytes / 2**20)))' 2>/dev/null || echo 200

run: $(STAMP)
	$(BIN)/streamlit run Home.py --server.maxUploadSize "$$($(UPLOAD_MB))"

# Two workers, each with its own session fixtures (models loaded once per worker); a test file stays on one worker,
# so module fixtures (the crash-safety clean run) are built once. TEST_WORKERS=0 runs it in one process. The fifteen
# slowest tests are listed at the end, so a CI log shows where the suite's time went.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean-venv:
	rm -rf $(VENV)
