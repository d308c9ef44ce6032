# Every target installs what it needs: a fresh machine runs `make demo` or `make test` as is.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= out
NTHREADS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test bench install deps system-deps lint e2e clean

# The Python environment: build tools first (the package is built without isolation, so the
# native core's build directory is reused between runs), then the package's own dependencies.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	$(PIP) install -q "torch==2.13.0" "transformers>=5,<6" "pytest>=8" numpy tokenizers "jinja2>=3.1" safetensors tqdm
	touch $@

deps: $(VENV)/.deps

install: deps
	$(PIP) install -q --no-build-isolation --no-deps .

# The cross toolchain and user-mode qemu run the NEON kernel tests on this x86 machine.
system-deps:
	@if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null \
	    || ! command -v cmake >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    cmake g++ g++-aarch64-linux-gnu qemu-user >/dev/null; \
	fi

# A small random-weight Qwen3-MoE with the real Qwen3 tokenizer: generate, convert, run.
demo: install
	$(PY) -m dllama.testing.checkpoint $(OUT)/demo/hf --preset tiny --arch qwen3_moe --seed 1
	$(VENV)/bin/dllama convert $(OUT)/demo/hf -o $(OUT)/demo/model-q40.m --weights q40
	$(VENV)/bin/dllama inference --model $(OUT)/demo/model-q40.m --tokenizer $(OUT)/demo/hf \
	  --prompt "Hello, world! 안녕하세요. def main():" --steps 32 --buffer-float-type q80 \
	  --nthreads $(NTHREADS) --max-seq-len 4096 --temperature 0

test: system-deps install
	$(PY) -m pytest -q tests

bench: install
	$(PY) tests/bench.py --nthreads $(NTHREADS)

clean:
	rm -rf build $(OUT) $(VENV)
