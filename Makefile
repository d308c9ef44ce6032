# Every target installs what it needs: a fresh machine runs `make demo` or `make test` as is.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= out
NTHREADS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test unit bench bench-neon bench-cluster install deps system-deps lint e2e clean wheelhouse wheelhouse-deps FORCE

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
	$(PIP) install -q "torch==2.13.0" "transformers>=5,<6" "pytest>=8" numpy tokenizers "jinja2>=3.1" safetensors tqdm starlette uvicorn prometheus-client openai httpx -r ansible/requirements.txt "ansible-lint==26.10.1" "pytest-testinfra>=10" "pytest-xdist>=3.6" "playwright==1.65.2"
	touch $@

deps: $(VENV)/.deps

install: deps
	$(PIP) install -q --no-build-isolation --no-deps .

# The cross toolchain and user-mode qemu run the NEON kernel tests on this x86 machine (llvm-19's
# llvm-mca reads their hot loops for make bench-neon; iproute2's ip and tc make bench-cluster's
# network); nft checks the firewall role's table, and sshd (started by the test on a loopback port
# only: policy-rc.d keeps the package from starting the system's) checks ansible.cfg's host key
# rule; Playwright drives Debian's chromium through the web pages (never `playwright install`: no
# browser download).
system-deps:
	@if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null \
	    || ! command -v llvm-mca-19 >/dev/null || ! command -v tc >/dev/null || ! command -v cmake >/dev/null \
	    || ! test -x /usr/sbin/nft || ! test -x /usr/sbin/sshd || ! command -v chromium >/dev/null; then \
	  own=; if [ ! -e /usr/sbin/policy-rc.d ]; then own=1; printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; \
	    chmod 755 /usr/sbin/policy-rc.d; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    cmake g++ g++-aarch64-linux-gnu qemu-user llvm-19 iproute2 nftables openssh-server chromium >/dev/null; \
	  rc=$$?; if [ -n "$$own" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi

# A small random-weight Qwen3-MoE with the real Qwen3 tokenizer: generate, convert, run.
demo: install
	$(PY) -m dllama.testing.checkpoint $(OUT)/demo/hf --preset tiny --arch qwen3_moe --seed 1
	$(VENV)/bin/dllama convert $(OUT)/demo/hf -o $(OUT)/demo/model-q40.m --weights q40
	$(VENV)/bin/dllama inference --model $(OUT)/demo/model-q40.m --tokenizer $(OUT)/demo/hf \
	  --prompt "Hello, world! 안녕하세요. def main():" --steps 32 --buffer-float-type q80 \
	  --nthreads $(NTHREADS) --max-seq-len 4096 --temperature 0

# Everything: the unit and integration tests, then the appliance end to end on 4 VMs (root; under
# software emulation ~30 min with the images and a booted snapshot cached, ~20 more the first time).
# The wheelhouse compiles from the start, while pip installs the rest and then while the unit tests
# run, under the lock its compile trees take in the tests (tests/build_lock.py): the unit tests'
# wheelhouse waits for it and then finds the trees warm, and so does the e2e's. The VM images (the
# arm64 one: ~16 min cold, mostly one core's work under qemu-user) are built while the unit tests
# run (three at a time on the 2 cores, one file per worker, the longest files first: pytest-xdist,
# tests/conftest.py). Their logs follow the tests (the wheelhouse's when it failed).
WHEELHOUSE_LOCK = $(dir $(WHEELHOUSE_BUILD)).$(notdir $(WHEELHOUSE_BUILD)).lock
test: system-deps $(VENV)/.build-deps
	@mkdir -p $(OUT) $(dir $(WHEELHOUSE_BUILD))
	flock $(WHEELHOUSE_LOCK) $(MAKE) --no-print-directory wheelhouse >$(OUT)/wheelhouse.log 2>&1 & wheelhouse=$$!; \
	$(MAKE) --no-print-directory install || { kill $$wheelhouse; exit 1; }; \
	$(PY) tests/vm/run_e2e.py --images-only >$(OUT)/e2e-images.log 2>&1 & images=$$!; \
	$(PY) -m pytest -q -n 3 --dist loadfile --durations=15 tests; unit=$$?; \
	wait $$wheelhouse; wheels=$$?; [ $$wheels -eq 0 ] || cat $(OUT)/wheelhouse.log; \
	wait $$images; built=$$?; cat $(OUT)/e2e-images.log; \
	[ $$unit -eq 0 ] && [ $$wheels -eq 0 ] && [ $$built -eq 0 ]
	$(PY) tests/vm/run_e2e.py $(E2E_ARGS)

# The tests that need no VMs (a few minutes).
unit: system-deps install
	$(PY) -m pytest -q -n 3 --dist loadfile tests

bench: install
	$(PY) tests/bench.py --nthreads $(NTHREADS)

# The NEON kernel's hot loops as a Pi 5 core would run them, by static analysis: cross-compiled
# to assembly and read by llvm-mca (Neoverse N1 and Cortex-A76 models); no board, no timing.
bench-neon: system-deps
	$(PYTHON) tests/bench_neon.py

# The cluster's sync over an emulated Pi 5 network (network namespaces, tc-shaped 1 Gbit/s links;
# needs root), then the Pi 5 projection from it and bench-neon's readings. Kept in README.
bench-cluster: system-deps install
	$(PY) tests/bench_cluster.py

# The engine for nodes with no internet: one directory and one archive per node kind,
# ARCH-cpXY, the architecture as `uname -m` (and Ansible's ansible_facts.architecture) names it
# and the node's Python (Debian and Raspberry Pi OS bookworm: 3.11, trixie: 3.13):
#
#   out/wheelhouse/x86_64-cp311/   x86_64-cp311.tar    (the archive holds the directory's files)
#   out/wheelhouse/x86_64-cp313/   x86_64-cp313.tar
#   out/wheelhouse/aarch64-cp311/  aarch64-cp311.tar
#   out/wheelhouse/aarch64-cp313/  aarch64-cp313.tar
#
# each holding our wheel for it (dllama_cluster-VERSION-cpXY-cpXY-manylinux_2_36_ARCH.whl), the
# dependencies' manylinux wheels for that Python and architecture (glibc up to bookworm's 2.36)
# and uv's wheel (the installer the engine role runs on the node); the role unpacks the one that
# matches a node, so nodes never compile and never reach a package index. Our wheels are built
# here: the package from scikit-build-core (pure Python, no CMake run), the native core by
# packaging/build-extension for each kind (aarch64 cross-compiled with Debian's
# g++-aarch64-linux-gnu, NEON kernels included) against the headers of Debian's own Python of that
# release (packaging/python-headers: downloaded once into $(WHEELHOUSE_BUILD) with a private apt
# configuration, nothing installed), libstdc++ linked in; packaging/assemble-wheel.py puts them
# together, tagged with the newest glibc the extension needs (2.36, this Debian's). The same
# sources give byte-identical wheels and archives (SOURCE_DATE_EPOCH, no paths of this machine in
# the binaries, sorted entries), so a node reinstalls only when the engine really changed. The
# compile trees stay in $(WHEELHOUSE_BUILD): a rebuild compiles only what changed. On an arm64
# controller the x86_64 wheels are the cross-compiled ones (g++-x86-64-linux-gnu).
#
# Building on the node is opt-in, for kinds with no wheel here: `make wheelhouse
# WHEELHOUSE_SOURCE="aarch64-cp312"` adds ARCH-cpXY-source/ and .tar with our source
# distribution, the build requirements and the dependencies (as binary wheels, so PyPI must have
# them for that kind), used by the role only where the inventory sets engine_build_from_source.
WHEELHOUSE ?= $(OUT)/wheelhouse
WHEELHOUSE_BUILD ?= build/wheelhouse
WHEELHOUSE_HEADERS ?= $(WHEELHOUSE_BUILD)/python-headers
WHEELHOUSE_ARCHS ?= x86_64 aarch64
WHEELHOUSE_PYTHONS ?= 3.11 3.13
WHEELHOUSE_SOURCE ?=
WHEELHOUSE_KINDS := $(foreach a,$(WHEELHOUSE_ARCHS),$(foreach p,$(WHEELHOUSE_PYTHONS),$(a)-cp$(subst .,,$(p))))
MANYLINUX_PLATFORMS = $(foreach v,$(shell seq 17 36),--platform manylinux_2_$(v)_$(1))
BUILD_REQUIREMENTS := scikit-build-core pybind11 cmake ninja
# The same sources give the same archives (nodes reinstall only when the wheelhouse changed):
# every timestamp is that of the last commit of what goes into the wheels.
SOURCE_DATE_EPOCH := $(or $(shell git log -1 --format=%ct -- pyproject.toml README.md engine native packaging 2>/dev/null),315532800)

# Rebuilt only when what goes into it changed (the wheels' metadata carries the README), or
# when it is asked for other node kinds.
WHEELHOUSE_INPUTS := pyproject.toml README.md Makefile $(shell find engine native packaging -type f -not -name '*.pyc' 2>/dev/null)
WHEELHOUSE_CONFIG := $(WHEELHOUSE_KINDS) source: $(WHEELHOUSE_SOURCE)

# One node kind's dependencies and uv, as binary wheels (no package is built here or on the node),
# plus $(4), then its archive: $(call wheelhouse_fill,DIR,ARCH,X.Y,EXTRA)
wheelhouse_fill = $(PIP) download -q --dest $(1) --only-binary=:all: --implementation cp \
	  --python-version $(3) $(call MANYLINUX_PLATFORMS,$(2)) -r $(WHEELHOUSE)/requirements.txt uv $(4) \
	  && tar -C $(1) --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=a+rX,u+w,go-w \
	    -cf $(1).tar .

wheelhouse: $(WHEELHOUSE)/.built

# The compilers for the kinds' architectures (g++-aarch64-linux-gnu on this x86 machine) and what
# fetches Debian's headers; cmake and ninja come from PyPI into the venv.
wheelhouse-deps:
	@missing=; for arch in $(WHEELHOUSE_ARCHS); do \
	  if [ $$arch = "$$(uname -m)" ]; then cxx=g++ pkg=g++; \
	  else cxx=$$arch-linux-gnu-g++ pkg=g++-$$(echo $$arch | tr _ -)-linux-gnu; fi; \
	  command -v $$cxx >/dev/null || missing="$$missing $$pkg"; done; \
	command -v dpkg-deb >/dev/null && [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] \
	  || missing="$$missing dpkg debian-archive-keyring"; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

# The kinds asked for, remembered: asking for others rebuilds.
$(WHEELHOUSE)/.config: FORCE
	@mkdir -p $(@D) && echo '$(WHEELHOUSE_CONFIG)' | cmp -s - $@ || echo '$(WHEELHOUSE_CONFIG)' > $@

$(WHEELHOUSE)/.built: $(VENV)/.build-deps $(WHEELHOUSE_INPUTS) $(WHEELHOUSE)/.config | wheelhouse-deps
	find $(WHEELHOUSE) -mindepth 1 -maxdepth 1 ! -name .config -exec rm -rf {} +
	mkdir -p $(WHEELHOUSE)/dist
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
	  > $(WHEELHOUSE)/requirements.txt
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(PIP) wheel -q --no-build-isolation --no-deps \
	  --config-settings=wheel.cmake=false --config-settings=build-dir=$(WHEELHOUSE_BUILD)/pure \
	  --wheel-dir $(WHEELHOUSE)/dist .
	set -e; for kind in $(WHEELHOUSE_KINDS); do \
	  arch=$${kind%-cp*}; xy=$${kind##*-cp}; python=$${xy%$${xy#?}}.$${xy#?}; \
	  echo "$$kind: compiling"; \
	  include=$$(packaging/python-headers $$arch $$python $(WHEELHOUSE_HEADERS)/$$kind); \
	  extension=$$(PATH="$(abspath $(VENV))/bin:$$PATH" PYTHON=$(PY) \
	    packaging/build-extension $$arch $$python $$include $(WHEELHOUSE_BUILD)/$$kind); \
	  SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(PY) packaging/assemble-wheel.py \
	    $(WHEELHOUSE)/dist/*-py3-none-any.whl $$extension cp$$xy $(WHEELHOUSE)/$$kind >/dev/null; \
	  $(call wheelhouse_fill,$(WHEELHOUSE)/$$kind,$$arch,$$python); \
	done
	set -e; if [ -n "$(WHEELHOUSE_SOURCE)" ]; then \
	  SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
	    $(PY) -c "from scikit_build_core.build import build_sdist; build_sdist('$(WHEELHOUSE)/dist')" >/dev/null; fi; \
	for kind in $(WHEELHOUSE_SOURCE); do \
	  arch=$${kind%-cp*}; xy=$${kind##*-cp}; python=$${xy%$${xy#?}}.$${xy#?}; \
	  mkdir -p $(WHEELHOUSE)/$$kind-source && cp $(WHEELHOUSE)/dist/*.tar.gz $(WHEELHOUSE)/$$kind-source/; \
	  $(call wheelhouse_fill,$(WHEELHOUSE)/$$kind-source,$$arch,$$python,$(BUILD_REQUIREMENTS)); \
	done
	@for kind in $(WHEELHOUSE_KINDS) $(addsuffix -source,$(WHEELHOUSE_SOURCE)); do \
	  echo "$(WHEELHOUSE)/$$kind.tar:"; ls $(WHEELHOUSE)/$$kind | sed 's/^/  /'; done
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
