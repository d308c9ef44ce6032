"""engine role: the venv under /opt/dllama, installed from the wheelhouse, and nothing to compile with."""

import hashlib
from functools import cache
from pathlib import Path

import pytest
from infra_hosts import hosts

# Where `make wheelhouse` leaves the archives the engine role sends (the role's default).
WHEELHOUSE = Path(__file__).resolve().parents[2] / "out" / "wheelhouse"

testinfra_hosts = hosts("cluster")


@cache
def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_engine_venv_exists(host):
    assert host.file("/opt/dllama/bin/python").exists


def test_engine_is_importable_in_the_venv(host):
    host.run_expect([0], "/opt/dllama/bin/python -c 'import dllama, dllama._core'")


def test_dllama_command_reports_its_version(host):
    assert host.check_output("/opt/dllama/bin/dllama --version").startswith("dllama")


def test_dllama_api_command_is_installed(host):
    assert host.file("/opt/dllama/bin/dllama-api").is_file


def test_the_wheelhouse_the_engine_came_from_is_recorded(host):
    # "<arch>-cp<XY>.tar sha256:<hex>": the controller's archive for the node's architecture and
    # system Python that the role unpacked, by checksum
    arch = host.system_info.arch
    xy = host.check_output("python3 -c 'import sys; print(\"%d%d\" % sys.version_info[:2])'")
    recorded = host.file("/opt/dllama/.dllama-wheelhouse")
    assert recorded.exists
    name, checksum = recorded.content_string.split()
    archive = WHEELHOUSE / f"{arch}-cp{xy}.tar"
    assert name == archive.name
    assert checksum == "sha256:" + sha256_of(archive)


@pytest.mark.parametrize("compiler", ["gcc", "cc", "g++", "c++"])
def test_no_compiler_is_installed(host, compiler):
    # Nodes install our prebuilt wheel: the role installs no build tools unless a node opts in
    # to building from source (engine_build_from_source).
    assert not host.exists(compiler)
