"""Kernel tests in two layers.

1. The native test binary (native/tests/test_kernels.cpp), built with CMake outside the source
   tree: run natively (the fast set of this CPU against the generic reference), again with
   DLLAMA_KERNELS=generic, and cross-built for aarch64 and run under qemu-aarch64, once on a CPU
   with dotprod (the NEON set is tested) and once on one without (generic is chosen).
2. The Q40 block format the converter writes, through dllama._core.quantize_q40, against a numpy
   re-implementation of the rules in native/kernels.h and FORMATS.md (q40_numpy.py): exact bytes.
   (Q80 and the dequantizers run only inside the core: the native binary checks them bit for bit.)
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from build_lock import exclusive
from q40_numpy import dequantize_q40_numpy, quantize_q40_numpy

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
TOOLCHAIN = NATIVE / "cmake" / "aarch64-linux-gnu.cmake"
BUILD_JOBS = "2"
SUMMARY_OK = "0 failed"


# ---------------------------------------------------------------------------------------------
# the native test binary


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n"
            f"--- stdout (last lines)\n{_tail(proc.stdout)}\n--- stderr\n{_tail(proc.stderr)}"
        )
    return proc


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _build_test_kernels(build_dir: Path, *cmake_args: str) -> Path:
    """Configure and build only the test_kernels target; incremental when the directory exists."""
    with exclusive(build_dir):  # both xdist workers may build the same tree
        return _configure_and_build(build_dir, *cmake_args)


def _configure_and_build(build_dir: Path, *cmake_args: str) -> Path:
    _run(
        [
            "cmake",
            "-S", NATIVE,
            "-B", build_dir,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DDLLAMA_PYTHON=OFF",
            "-DDLLAMA_BUILD_TESTS=ON",
            *cmake_args,
        ]
    )
    _run(["cmake", "--build", build_dir, "--target", "test_kernels", "-j", BUILD_JOBS])
    binary = build_dir / "test_kernels"
    assert binary.is_file(), f"{binary} was not built"
    return binary


def _check_summary(stdout: str) -> None:
    failures = [line for line in stdout.splitlines() if line.startswith("FAIL")]
    assert not failures, "\n".join(failures)
    last = stdout.strip().splitlines()[-1]
    assert last.endswith(" passed, " + SUMMARY_OK), last
    assert int(last.split()[0]) > 0, last


@pytest.fixture(scope="module")
def native_test_kernels() -> Path:
    if shutil.which("cmake") is None:
        pytest.fail("cmake is not installed (make system-deps installs it)")
    return _build_test_kernels(ROOT / "build" / f"native-tests-{platform.machine()}")


@pytest.fixture(scope="module")
def aarch64_test_kernels() -> Path:
    missing = [tool for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cross toolchain not installed: {', '.join(missing)} (make system-deps installs it)")
    return _build_test_kernels(
        ROOT / "build" / "native-tests-aarch64-cross",
        f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN}",
        "-DCMAKE_EXE_LINKER_FLAGS=-static",  # qemu-aarch64 then needs no Arm sysroot
    )


def _fast_set_of_this_machine() -> str | None:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "avx2"
    if machine in ("aarch64", "arm64"):
        return "neon"
    return None


@pytest.mark.slow
def test_native_kernels_pass(native_test_kernels: Path) -> None:
    proc = _run([native_test_kernels], env={"DLLAMA_KERNELS": ""})
    print(proc.stdout)  # the TIME lines are informational; pytest -s shows them
    _check_summary(proc.stdout)
    assert "testing kernel set: generic (against formulas)" in proc.stdout
    fast = _fast_set_of_this_machine()
    if fast is not None and f"{fast}: available" in proc.stdout:
        assert f"testing kernel set: {fast} (against generic)" in proc.stdout
        assert f"kernels() selected: {fast}" in proc.stdout
    else:
        assert "kernels() selected: generic" in proc.stdout


@pytest.mark.slow
def test_native_kernels_pass_with_generic_forced(native_test_kernels: Path) -> None:
    proc = _run([native_test_kernels, "--no-timing"], env={"DLLAMA_KERNELS": "generic"})
    assert "kernels() selected: generic" in proc.stdout
    _check_summary(proc.stdout)


@pytest.mark.slow
def test_native_kernel_selection_falls_back_with_a_warning(native_test_kernels: Path) -> None:
    unsupported = "neon" if _fast_set_of_this_machine() == "avx2" else "avx2"
    proc = _run([native_test_kernels, "--selected"], env={"DLLAMA_KERNELS": unsupported})
    assert proc.stdout.strip() == "kernels() selected: generic"
    assert f"DLLAMA_KERNELS={unsupported} is not supported" in proc.stderr

    best = _run([native_test_kernels, "--selected"], env={"DLLAMA_KERNELS": ""}).stdout
    proc = _run([native_test_kernels, "--selected"], env={"DLLAMA_KERNELS": "sse9"})
    assert proc.stdout == best
    assert "unknown DLLAMA_KERNELS=sse9" in proc.stderr


@pytest.mark.slow
def test_neon_kernels_pass_under_qemu(aarch64_test_kernels: Path) -> None:
    proc = _run(["qemu-aarch64", "-cpu", "max", aarch64_test_kernels, "--no-timing"], env={"DLLAMA_KERNELS": ""})
    assert "neon: available" in proc.stdout
    assert "testing kernel set: neon (against generic)" in proc.stdout
    assert "kernels() selected: neon" in proc.stdout
    _check_summary(proc.stdout)


@pytest.mark.slow
def test_aarch64_without_dotprod_uses_generic(aarch64_test_kernels: Path) -> None:
    # Cortex-A72 (Raspberry Pi 4) is ARMv8.0: no dotprod, so the NEON set must refuse to load.
    proc = _run(["qemu-aarch64", "-cpu", "cortex-a72", aarch64_test_kernels, "--no-timing"], env={"DLLAMA_KERNELS": ""})
    assert "neon: unavailable" in proc.stdout
    assert "kernels() selected: generic" in proc.stdout
    _check_summary(proc.stdout)


@pytest.mark.slow
def test_neon_hot_loops_by_llvm_mca() -> None:
    """The NEON matmul's loops as llvm-mca reads them (make bench-neon): deterministic for a given
    compiler and LLVM, so the issue #17 targets hold or a change broke them. N1 model, per
    144-byte group-block: decode <= 24 cycles, the widest tile <= 14 cycles per token, no tile
    spilling to the stack."""
    import bench_neon

    missing = [t for t in (bench_neon.CXX, bench_neon.MCA) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make system-deps installs them)")
    a = bench_neon.analyse([])
    assert [bench_neon.batch_of(name) for name in a.tiles] == list(range(1, 9))
    assert all(r.loop_closed for parts in a.tiles.values() for r in parts)
    spilled = {name: bench_neon.spills_per_group_block(parts) for name, parts in a.tiles.items()}
    assert not any(spilled.values()), spilled
    decode = a.readings[a.decode, "neoverse-n1"]
    prefill = a.readings[a.prefill, "neoverse-n1"]
    assert decode.cycles <= 24, decode
    assert prefill.cycles / bench_neon.batch_of(a.prefill) <= 14, prefill


# ---------------------------------------------------------------------------------------------
# the Q40 block format through the extension, against numpy


@pytest.fixture(scope="module")
def core():
    return pytest.importorskip("dllama._core", reason="the dllama._core extension is not built")


def _inputs() -> dict[str, np.ndarray]:
    """Named float32 arrays: odd row counts, one-block rows, long rows and awkward blocks."""
    rng = np.random.default_rng(7)
    special = np.zeros((6, 64), dtype=np.float32)
    special[1, 3] = -0.0
    special[2, 5], special[2, 20] = -3.0, 3.0  # magnitude tie: the first (-3) wins
    special[2, 40], special[2, 33] = 2.0, -2.0  # the first (-2) wins
    special[3, :32] = np.arange(32) - 16 + 0.5  # q80 halves
    special[3, 31] = 127.0
    special[4, :] = rng.standard_normal(64).astype(np.float32) * np.float32(1e30)
    special[5, :] = np.round(rng.standard_normal(64) * 20) / 4
    scaled = rng.standard_normal((5, 2048)).astype(np.float32)
    scaled *= (10.0 ** rng.integers(-8, 8, size=(5, 64)).repeat(32, axis=1)).astype(np.float32)
    return {
        "one block row": rng.standard_normal((1, 32)).astype(np.float32),
        "1-d row": rng.standard_normal(96).astype(np.float32),
        "3 rows n=64": rng.standard_normal((3, 64)).astype(np.float32),
        "7 rows n=768": rng.standard_normal((7, 768)).astype(np.float32),
        "5 rows n=2048, scales 1e-8..1e7": scaled,
        "2x3x4096": rng.standard_normal((2, 3, 4096)).astype(np.float32),
        "zeros, ties, halves, huge": special,
    }


INPUT_NAMES = list(_inputs())


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_quantize_q40_matches_numpy(core, name: str) -> None:
    x = _inputs()[name]
    got = core.quantize_q40(x)
    want = quantize_q40_numpy(x)
    assert got.dtype == np.uint8
    assert got.shape == (*x.shape[:-1], x.shape[-1] // 32 * 18)
    np.testing.assert_array_equal(got, want)


def test_q40_byte_layout(core) -> None:
    # m = -8 comes first, so d = 1 and q = x + 8: elements 0..15 get 0..15, 16..31 get 15..0
    x = np.concatenate([np.arange(16) - 8, 7 - np.arange(16)]).astype(np.float32)
    block = core.quantize_q40(x)
    assert block.shape == (18,)
    assert block[:2].tobytes() == b"\x00\x3c"  # fp16 1.0, little-endian
    j = np.arange(16)
    np.testing.assert_array_equal(block[2:], (j | ((15 - j) << 4)).astype(np.uint8))
    np.testing.assert_array_equal(dequantize_q40_numpy(block), x)


def test_q40_low_nibble_is_element_j_high_nibble_is_element_j_plus_16(core) -> None:
    x = np.zeros(32, dtype=np.float32)
    x[0] = -8.0  # d = 1
    x[3] = 5.0  # element 3 -> low nibble of byte 3: 13
    x[19] = -6.0  # element 19 -> high nibble of byte 3: 2
    block = core.quantize_q40(x)
    assert block[2 + 3] == 13 | (2 << 4)
    assert block[2 + 0] == 0 | (8 << 4)  # element 0 is -8 -> 0; element 16 is 0 -> 8


def test_zero_blocks(core) -> None:
    x = np.zeros((2, 32), dtype=np.float32)
    x[1, 7] = -0.0
    q40 = core.quantize_q40(x)
    # m = +0 so d = 0 / -8 = -0 (fp16 0x8000) and every nibble is 8
    assert q40[:, :2].tobytes() == b"\x00\x80" * 2
    assert (q40[:, 2:] == 0x88).all()
    np.testing.assert_array_equal(dequantize_q40_numpy(q40), 0)


def test_round_trip_is_within_one_step(core) -> None:
    x = np.random.default_rng(3).standard_normal((9, 2048)).astype(np.float32)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    err40 = np.abs(dequantize_q40_numpy(core.quantize_q40(x)) - x).reshape(-1, 32)
    assert (err40 <= amax / 8 * 1.01).all()  # at most one step of d = amax / 8


def test_quantize_rejects_a_row_that_is_not_whole_blocks(core) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        core.quantize_q40(np.zeros(33, dtype=np.float32))


def test_kernel_name(core) -> None:
    assert core.kernel_name() in ("generic", "avx2", "neon")
