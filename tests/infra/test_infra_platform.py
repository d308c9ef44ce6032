"""Every node runs the engine built for it: the wheel for its architecture and Python (Debian /
Raspberry Pi OS bookworm: 3.11, trixie: 3.13) with the kernel set of its CPU, and nothing to
compile with."""

import pytest
from infra_hosts import hosts

testinfra_hosts = hosts("cluster")

# The kernel set the engine picks at start-up from the CPU (native/kernels_select.cpp): the VMs'
# x86 CPUs have AVX2; the arm64 VM's `-cpu max`, like a Pi 5's Cortex-A76, has NEON with dotprod.
KERNELS = {"x86_64": "avx2", "aarch64": "neon"}
PYTHON = {"bookworm": "3.11", "trixie": "3.13"}


def test_engine_runs_the_kernels_of_the_nodes_cpu(host):
    name = host.check_output("/opt/dllama/bin/python -c 'import dllama._core as c; print(c.kernel_name())'")
    assert name == KERNELS[host.system_info.arch]


def test_engine_venv_runs_the_python_of_the_os_release(host):
    codename = host.system_info.codename
    if codename not in PYTHON:
        pytest.skip(f"{codename} is not a supported release")
    version = host.check_output("/opt/dllama/bin/python -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
    assert version == PYTHON[codename]
    assert host.check_output("/usr/bin/python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'") == version


def test_the_installed_engine_is_our_wheel_not_a_build_on_the_node(host):
    # A wheel installed by uv leaves INSTALLER and no build directory; a build from the sdist
    # would have needed a compiler, which the node must not have.
    installer = host.check_output("cat /opt/dllama/lib/python3*/site-packages/dllama_cluster-*.dist-info/INSTALLER")
    assert installer == "uv"
    tag = host.check_output("grep '^Tag:' /opt/dllama/lib/python3*/site-packages/dllama_cluster-*.dist-info/WHEEL")
    assert host.system_info.arch in tag
