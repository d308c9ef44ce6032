"""engine role: the venv under /opt/dllama, installed from the wheelhouse."""

import hashlib
from functools import cache
from pathlib import Path

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
    arch = host.system_info.arch
    recorded = host.file("/opt/dllama/.dllama-wheelhouse")
    assert recorded.exists
    # "<arch>.tar sha256:<hex>": the controller's archive the role unpacked, by checksum
    name, checksum = recorded.content_string.split()
    archive = WHEELHOUSE / f"{arch}.tar"
    assert name == archive.name
    assert checksum == "sha256:" + sha256_of(archive)
