# Every target installs what it needs: a fresh machine runs `make demo` or `make test` as is.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= out
NTHREADS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test unit bench install deps system-deps lint e2e clean wheelhouse

# The Python environment. Build tools first (the package is built without isolation, so the
# native core's build directory is reused between runs): all `make wheelhouse` needs, so an
# operator's controller gets no torch.
$(VENV)/.build-deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
	touch $@

# Then the package's own dependencies and what the tests use.
$(VENV)/.deps: $(VENV)/.build-deps pyproject.toml ansible/requirements.txt
	$(PIP) install -q "torch==2.13.0" "transformers>=5,<6" "pytest>=8" numpy tokenizers "jinja2>=3.1" safetensors tqdm starlette uvicorn prometheus-client openai httpx -r ansible/requirements.txt "ansible-lint==26.10.1" "pytest-testinfra>=10" "pytest-xdist>=3.6"
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

# Everything: the unit and integration tests, then the appliance end to end on VMs (root; 12-14
# min cold under software emulation, 8 with the image and a booted snapshot cached).
test: unit
	$(PY) tests/vm/run_e2e.py $(E2E_ARGS)

# The tests that need no VMs (a few minutes).
unit: system-deps install
	$(PY) -m pytest -q tests

bench: install
	$(PY) tests/bench.py --nthreads $(NTHREADS)

# The engine for nodes with no internet: for each node architecture, the dependencies' wheels
# (manylinux, CPython $(WHEELHOUSE_PYTHON) as on Debian bookworm), uv (the installer the engine role
# runs on the node), our source distribution, and our wheel for this machine's architecture when
# this Python matches; ARCH.tar is what the engine role unpacks on a node (byte-identical when
# nothing changed, so a second run sends nothing).
WHEELHOUSE ?= $(OUT)/wheelhouse
WHEELHOUSE_ARCHS ?= x86_64 aarch64
WHEELHOUSE_PYTHON ?= 3.11
HOST_ARCH := $(shell uname -m)
MANYLINUX_PLATFORMS = $(foreach v,$(shell seq 17 36),--platform manylinux_2_$(v)_$(1))
BUILD_REQUIREMENTS := scikit-build-core pybind11 cmake ninja
# The same sources give the same archives (nodes reinstall only when the wheelhouse changed).
SOURCE_DATE_EPOCH := $(shell git log -1 --format=%ct 2>/dev/null || echo 315532800)

# Rebuilt only when what goes into it changed (the sdist carries the README).
WHEELHOUSE_INPUTS := pyproject.toml README.md Makefile $(shell find engine native -type f -not -name '*.pyc' 2>/dev/null)

wheelhouse: $(WHEELHOUSE)/.built

$(WHEELHOUSE)/.built: $(VENV)/.build-deps $(WHEELHOUSE_INPUTS)
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)/dist
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
	  > $(WHEELHOUSE)/requirements.txt
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
	  $(PY) -c "from scikit_build_core.build import build_sdist; build_sdist('$(WHEELHOUSE)/dist')"
	if [ "$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$(WHEELHOUSE_PYTHON)" ]; then \
	  SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
	    $(PIP) wheel -q --no-build-isolation --no-deps --wheel-dir $(WHEELHOUSE)/dist . ; fi
	set -e; for arch in $(WHEELHOUSE_ARCHS); do \
	  mkdir -p $(WHEELHOUSE)/$$arch; \
	  cp $(WHEELHOUSE)/dist/*.tar.gz $(WHEELHOUSE)/$$arch/; \
	  extra="$(BUILD_REQUIREMENTS)"; \
	  if [ $$arch = $(HOST_ARCH) ] && ls $(WHEELHOUSE)/dist/*.whl >/dev/null 2>&1; then \
	    cp $(WHEELHOUSE)/dist/*.whl $(WHEELHOUSE)/$$arch/; extra=; fi; \
	  $(PIP) download -q --dest $(WHEELHOUSE)/$$arch --only-binary=:all: --implementation cp \
	    --python-version $(WHEELHOUSE_PYTHON) $(call MANYLINUX_PLATFORMS,$$arch) \
	    -r $(WHEELHOUSE)/requirements.txt uv $$extra; \
	  tar -C $(WHEELHOUSE)/$$arch --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
	    -cf $(WHEELHOUSE)/$$arch.tar .; \
	done
	@for arch in $(WHEELHOUSE_ARCHS); do echo "$(WHEELHOUSE)/$$arch:"; ls $(WHEELHOUSE)/$$arch | sed 's/^/  /'; done
	touch $@

# The appliance's playbooks and roles: ansible-lint's strictest profile (it runs yamllint too).
lint: deps
	$(VENV)/bin/ansible-lint --offline --profile production site.yml ansible/health.yml ansible/preflight.yml ansible/requirements.yml roles

# The appliance end to end: three Debian VMs (software emulation; `E2E_ARGS=--kvm` on KVM hosts)
# in a network namespace, provisioned by site.yml and checked by tests/infra. Needs root. The
# base image and a booted snapshot are cached in ${DLLAMA_VM_CACHE:-~/.cache/dllama-vm}.
E2E_ARGS ?=
e2e: install
	$(PY) tests/vm/run_e2e.py $(E2E_ARGS)

clean:
	rm -rf build $(OUT) $(VENV)
