"""`make wheelhouse`: one archive per node kind (x86_64, aarch64 x CPython 3.11, 3.13), each with
our wheel for it (aarch64 cross-compiled here, NEON kernels in), the dependencies' wheels and
uv's; byte-identical when built again; the extensions load in Debian's own Pythons (under
qemu-user: arm64 ones emulated, x86_64 ones with the target release's glibc)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from build_lock import exclusive

ROOT = Path(__file__).resolve().parent.parent
# Debian's Python headers and Pythons: the default cache of `make wheelhouse`, downloaded once.
CACHE = ROOT / "build" / "wheelhouse"
# Every timestamp in the wheels, fixed here so that a commit landing during the run changes nothing.
EPOCH = "1700000000"

PYTHONS = {"3.11": "bookworm", "3.13": "trixie"}
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
KINDS = [f"{arch}-cp{py.replace('.', '')}" for arch in DEBIAN_ARCH for py in PYTHONS]
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}  # EM_X86_64, EM_AARCH64
KERNELS = {"x86_64": "avx2", "aarch64": "neon"}  # what the CPUs of `qemu-ARCH -cpu max` select
# glibc's own libraries: all an extension with libstdc++ and libgcc linked in may need.
GLIBC = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
         "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}

pytestmark = pytest.mark.slow


def split(kind: str) -> tuple[str, str]:
    """"aarch64-cp313" -> ("aarch64", "313")."""
    arch, xy = kind.rsplit("-cp", 1)
    return arch, xy


def make_wheelhouse(out: Path, build: Path, **variables: str) -> None:
    args = ["make", "--no-print-directory", "-C", str(ROOT), "wheelhouse", f"WHEELHOUSE={out}",
            f"WHEELHOUSE_BUILD={build}", f"WHEELHOUSE_HEADERS={CACHE / 'python-headers'}",
            f"SOURCE_DATE_EPOCH={EPOCH}"] + [f"{k}={v}" for k, v in variables.items()]
    with exclusive(build):  # both xdist workers may build into CACHE
        run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(args)}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The wheelhouse (out, build): built once for the session, in the compile trees `make
    wheelhouse` keeps (cold on a fresh clone), so the e2e's wheelhouse that follows in `make test`
    compiles nothing again; the cold compile elsewhere is test_a_rebuild_gives_byte_identical_archives'."""
    out = tmp_path_factory.mktemp("wheelhouse") / "out"
    make_wheelhouse(out, CACHE)
    return out, CACHE


@pytest.fixture(scope="session")
def wheelhouse(built) -> Path:
    return built[0]


def members(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return sorted(Path(m.name).name for m in tf.getmembers() if m.isfile())


def our_wheel(wheelhouse: Path, kind: str) -> zipfile.ZipFile:
    """Our wheel as the archive holds it (not the directory next to it)."""
    with tarfile.open(wheelhouse / f"{kind}.tar") as tf:
        (member,) = [m for m in tf.getmembers() if Path(m.name).name.startswith("dllama_cluster-")]
        return zipfile.ZipFile(io.BytesIO(tf.extractfile(member).read()))


def extension(wheelhouse: Path, kind: str, dest: Path) -> Path:
    with our_wheel(wheelhouse, kind) as whl:
        (name,) = [n for n in whl.namelist() if n.startswith("dllama/_core") and n.endswith(".so")]
        path = dest / Path(name).name
        path.write_bytes(whl.read(name))
    return path


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", "--wide", *args], check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("kind", KINDS)
def test_every_node_kind_has_an_archive_with_our_wheel_numpy_and_uv(wheelhouse, kind):
    arch, xy = split(kind)
    names = members(wheelhouse / f"{kind}.tar")
    assert names == sorted(p.name for p in (wheelhouse / kind).iterdir())
    assert [n for n in names if re.fullmatch(rf"dllama_cluster-0\.1\.0-cp{xy}-cp{xy}-manylinux_2_\d+_{arch}\.whl", n)], names
    assert [n for n in names if re.fullmatch(rf"numpy-[\d.]+-cp{xy}-cp{xy}-(manylinux\w*_{arch}\.?)+whl", n)], names
    assert [n for n in names if re.fullmatch(rf"uv-[\d.]+-py3-none-.*manylinux\w*_{arch}.*\.whl", n)], names
    # nothing to build on a node: no source distribution, no build requirements
    assert not [n for n in names if not n.endswith(".whl")], names
    assert not [n for n in names if re.match(r"(scikit_build_core|pybind11|cmake|ninja)-", n)], names


@pytest.mark.parametrize("kind", KINDS)
def test_our_wheel_is_tagged_for_its_kind_and_its_record_holds(wheelhouse, kind, tmp_path):
    arch, xy = split(kind)
    # manylinux_2_N: N the newest glibc symbol version the extension needs, no newer than
    # bookworm's 2.36 (the oldest release supported)
    needs = re.findall(r"Name: GLIBC_2\.(\d+)", readelf("-V", str(extension(wheelhouse, kind, tmp_path))))
    glibc = max(map(int, needs))
    assert glibc <= 36
    platform = f"manylinux_2_{glibc}_{arch}"
    assert f"dllama_cluster-0.1.0-cp{xy}-cp{xy}-{platform}.whl" in os.listdir(wheelhouse / kind)
    with our_wheel(wheelhouse, kind) as whl:
        wheel = whl.read("dllama_cluster-0.1.0.dist-info/WHEEL").decode().splitlines()
        assert f"Tag: cp{xy}-cp{xy}-{platform}" in wheel
        assert "Root-Is-Purelib: false" in wheel
        assert [n for n in whl.namelist() if n.startswith("dllama/_core") and n.endswith(".so")] == \
            [f"dllama/_core.cpython-{xy}-{arch}-linux-gnu.so"]
        assert "dllama/engine.py" in whl.namelist()
        assert {"dllama/_core.pyi", "dllama/py.typed"} <= set(whl.namelist())  # the core's types
        # dllama-api's pages: served from the wheel, nothing fetched at run time
        assert {f"dllama/server/static/{f}" for f in ("chat.html", "cluster.html", "chat.js", "cluster.js",
                                                      "common.js", "markdown.js", "style.css")} <= set(whl.namelist())
        record = whl.read("dllama_cluster-0.1.0.dist-info/RECORD").decode().splitlines()
        listed = {}
        for line in record:
            path, digest, size = line.rsplit(",", 2)
            listed[path] = (digest, size)
        assert set(listed) == set(whl.namelist())
        for path, (digest, size) in listed.items():
            if path.endswith("/RECORD"):
                continue
            data = whl.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, size) == (f"sha256={expected}", str(len(data))), path


@pytest.mark.parametrize("kind", KINDS)
def test_the_extension_is_an_elf_of_its_arch_that_needs_only_glibc(wheelhouse, kind, tmp_path):
    arch, _ = split(kind)
    so = extension(wheelhouse, kind, tmp_path)
    header = so.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
    assert int.from_bytes(header[18:20], "little") == ELF_MACHINE[arch]
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf("-d", str(so))))
    assert needed and needed <= GLIBC, needed  # no libstdc++, no libgcc_s: linked in


def test_x86_64_cp313_extension_is_named_for_cp313(wheelhouse):
    with our_wheel(wheelhouse, "x86_64-cp313") as whl:
        assert "dllama/_core.cpython-313-x86_64-linux-gnu.so" in whl.namelist()


@pytest.mark.parametrize("kind", [k for k in KINDS if k.startswith("aarch64-")])
def test_aarch64_extensions_hold_the_neon_kernels(wheelhouse, kind, tmp_path):
    so = extension(wheelhouse, kind, tmp_path)
    assert ".symtab" in readelf("-S", str(so))  # the symbol table is kept, not stripped
    symbols = readelf("-s", str(so))
    for kernel in ("matmul_q40x8_q80_neon", "matmul_f32_neon", "quantize_row_q80_neon"):
        assert re.search(rf"\sFUNC\s.*{kernel}", symbols), kernel


def test_a_rebuild_gives_byte_identical_archives(built, tmp_path):
    wheelhouse, build = built
    # the output removed, the compile trees kept: every archive again
    make_wheelhouse(tmp_path / "again", build)
    for kind in KINDS:
        assert sha256(tmp_path / "again" / f"{kind}.tar") == sha256(wheelhouse / f"{kind}.tar"), kind
    # and a cold compile elsewhere (other paths, nothing reused) gives the same bytes
    make_wheelhouse(tmp_path / "cold", tmp_path / "cold-build", WHEELHOUSE_ARCHS="aarch64", WHEELHOUSE_PYTHONS="3.13")
    assert sha256(tmp_path / "cold" / "aarch64-cp313.tar") == sha256(wheelhouse / "aarch64-cp313.tar")


def test_building_on_the_node_is_an_opt_in_archive_of_its_own(built, tmp_path):
    _, build = built
    make_wheelhouse(tmp_path / "out", build, WHEELHOUSE_ARCHS="aarch64", WHEELHOUSE_PYTHONS="3.11",
                    WHEELHOUSE_SOURCE="aarch64-cp312")
    names = members(tmp_path / "out" / "aarch64-cp312-source.tar")
    assert "dllama_cluster-0.1.0.tar.gz" in names
    for requirement in ("scikit_build_core", "pybind11", "uv"):
        assert [n for n in names if n.startswith(requirement + "-")], requirement
    assert [n for n in names if re.fullmatch(r"numpy-[\d.]+-cp312-cp312-.*_aarch64\.whl", n)], names
    assert "aarch64-cp311.tar" in os.listdir(tmp_path / "out")


def debian_python(suite: str, debian_arch: str, python: str) -> Path:
    """Debian's own CPython of a release, unpacked (not installed) with its libc: a root for
    `qemu-ARCH -L`."""
    root = CACHE / "python-roots" / f"{suite}-{debian_arch}"
    subprocess.run([ROOT / "packaging" / "debian-extract", suite, debian_arch, root,
                    f"python{python}-minimal", f"libpython{python}-minimal", f"libpython{python}-stdlib",
                    "libc6", "zlib1g", "libexpat1"], check=True)
    # Releases with a merged /usr ship the loader under usr/ only: the symlinks base-files makes.
    for top in ("lib", "lib64"):
        if not (root / top).exists() and (root / "usr" / top).is_dir():
            try:
                (root / top).symlink_to(f"usr/{top}")
            except FileExistsError:
                pass
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_the_extension_loads_in_debians_python_and_picks_its_kernels(wheelhouse, kind, tmp_path):
    arch, xy = split(kind)
    qemu = shutil.which(f"qemu-{arch}")
    if not qemu:
        pytest.skip(f"qemu-{arch} is missing (apt-get install qemu-user)")
    python = f"{xy[0]}.{xy[1:]}"
    root = debian_python(PYTHONS[python], DEBIAN_ARCH[arch], python)
    with our_wheel(wheelhouse, kind) as whl:
        whl.extractall(tmp_path / "site")
    run = subprocess.run(
        [qemu, "-cpu", "max", "-L", str(root), str(root / "usr" / "bin" / f"python{python}"), "-c",
         "import sys, dllama._core as c; print('%d.%d' % sys.version_info[:2], c.kernel_name())"],
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": os.environ.get("PATH", "")},
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [python, KERNELS[arch]]
