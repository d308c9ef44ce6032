"""The NEON Q40 x Q80 kernel's hot loops read by llvm-mca: no Arm board needed.

native/kernels_neon.cpp is cross-compiled to assembly exactly as CMake builds it for aarch64 (its
COMPILE_OPTIONS in native/CMakeLists.txt), with DLLAMA_MCA defined so the marks of native/mca.h
put "LLVM-MCA-BEGIN/END q40x<R>_q80_batch<B>" around one iteration of the group-block loop for
each tile: R weight rows of a 144-byte group-block (8 rows x 32 values; R = 4 when a wide tile
goes over a group in two passes) against B tokens. Each marked region, plus the loop's own
increment and back branch when they sit right after the END mark, is handed alone to llvm-mca
for each CPU model; its simulated cycles per iteration, times 8 / R, are one group-block's
(regions of one name, the passes of a split tile and any copies the compiler made of a loop, are
averaged before):

    decode  (B = 1):   cycles and instructions per group-block, weight GB/s per core = 144 B x f / cycles
    prefill (widest B): cycles per group-block per token (cycles / B), and the same GB/s per core

at f = 2.4 GHz (the Raspberry Pi 5's Cortex-A76). Spills are the region's loads and stores
through the stack pointer. llvm-mca's figures are a model's (no cache misses, perfect branch
prediction): a bound on what the core can do, deterministic, unaffected by a busy machine. The
Neoverse N1 model is the one to read: the N1 is the A76's server sibling (same pipelines), while
LLVM 19's "cortex-a76" borrows the older Cortex-A57 model (one load pipe), shown for comparison.

Run with `make bench-neon` (Debian: g++-aarch64-linux-gnu and llvm-19).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
SOURCE = NATIVE / "kernels_neon.cpp"
CXX = "aarch64-linux-gnu-g++"
MCA = "llvm-mca-19"
CPUS = ("neoverse-n1", "cortex-a76")
GHZ = 2.4
GROUP_BLOCK_BYTES = 144
ITERATIONS = 1000
REGION = re.compile(r"#\s*LLVM-MCA-(BEGIN|END)\s+(\S+)")
BRANCH = re.compile(r"^\s*(b\.\w+|bne|beq|blt|bgt|ble|bge|bhi|bls|bcc|bcs|bmi|bpl|cbnz|cbz|tbnz|tbz)\s+(.*?,\s*)?(\.?\w+)\s*$")
LABEL = re.compile(r"^(\.?\w+):")


def neon_compile_options() -> list[str]:
    """kernels_neon.cpp's options as native/CMakeLists.txt gives them (one place for the flags)."""
    text = (NATIVE / "CMakeLists.txt").read_text()
    m = re.search(r"set_source_files_properties\(kernels_neon\.cpp\s+PROPERTIES\s+COMPILE_OPTIONS\s+\"([^\"]+)\"", text)
    if m is None:
        sys.exit("native/CMakeLists.txt: no COMPILE_OPTIONS for kernels_neon.cpp")
    return m.group(1).split(";")


def compile_marked(out: Path, extra: list[str]) -> str:
    cmd = [CXX, "-std=c++17", "-O3", *neon_compile_options(), *extra, "-DDLLAMA_MCA", f"-I{NATIVE}", "-S", "-o", str(out), str(SOURCE)]
    subprocess.run(cmd, check=True)
    return out.read_text()


def is_instruction(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith(("#", "//", ".", "@")) and not LABEL.match(s)


@dataclass
class Region:
    name: str
    body: list[str]  # instructions of one iteration
    loop_closed: bool  # the increment and back branch were found and included


def regions(asm: str) -> list[Region]:
    """Each BEGIN..END region's instructions; when the lines after END up to the first branch
    branch back to the label just before BEGIN, they are the loop's own step and join the body."""
    lines = asm.splitlines()
    out: list[Region] = []
    i = 0
    while i < len(lines):
        m = REGION.search(lines[i])
        if not (m and m.group(1) == "BEGIN"):
            i += 1
            continue
        name, begin = m.group(2), i
        labels = []
        for k in range(begin - 1, max(begin - 8, -1), -1):
            lm = LABEL.match(lines[k].strip())
            if lm:
                labels.append(lm.group(1))
            elif is_instruction(lines[k]):
                break
        body = []
        i += 1
        while i < len(lines) and not ((e := REGION.search(lines[i])) and e.group(1) == "END" and e.group(2) == name):
            if is_instruction(lines[i]):
                body.append(lines[i].strip())
            i += 1
        tail, closed = [], False
        for k in range(i + 1, min(i + 12, len(lines))):
            if LABEL.match(lines[k].strip()):
                break
            if not is_instruction(lines[k]):
                continue
            tail.append(lines[k].strip())
            b = BRANCH.match(lines[k])
            if b or lines[k].strip().startswith("b "):
                closed = bool(b) and b.group(3) in labels
                break
        out.append(Region(name, body + (tail if closed else []), closed))
    return out


def mca_movi_fix(line: str) -> str:
    """GCC prints a byte splat of a negative value as its 64-bit pattern; llvm-mca wants the byte."""
    m = re.match(r"(movi\s+v\d+\.(?:16b|8b),\s*)(0x[0-9a-f]+)$", line)
    return f"{m.group(1)}{int(m.group(2), 16) & 0xFF:#x}" if m else line


@dataclass
class Reading:
    instructions: float  # per iteration
    cycles: float  # per iteration
    uops: float


def run_mca(body: list[str], cpu: str, workdir: Path) -> Reading:
    src = workdir / "region.s"
    src.write_text("\n".join(mca_movi_fix(l) for l in body) + "\n")
    proc = subprocess.run(
        [MCA, "-mtriple=aarch64", f"-mcpu={cpu}", f"-iterations={ITERATIONS}", str(src)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"{MCA} failed on {cpu}:\n{proc.stderr}")

    def field(label: str) -> float:
        m = re.search(rf"^{label}:\s+([\d.]+)", proc.stdout, re.M)
        if m is None:
            sys.exit(f"{MCA}: no '{label}' in its output")
        return float(m.group(1))

    iters = field("Iterations")
    return Reading(field("Instructions") / iters, field("Total Cycles") / iters, field("Total uOps") / iters)


def spills(body: list[str]) -> int:
    return sum(1 for l in body if re.match(r"(ld|st)\w*\s.*\[sp", l))


def tile_of(name: str) -> tuple[int, int]:
    """(rows, tokens) of a region named q40x<rows>_q80_batch<tokens>; (0, 0) for another."""
    m = re.fullmatch(r"q40x(\d+)_q80_batch(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def batch_of(name: str) -> int:
    return tile_of(name)[1]


def spills_per_group_block(parts: list[Region]) -> float:
    return sum(spills(p.body) for p in parts) / len(parts) * 8 / tile_of(parts[0].name)[0]


def per_group_block(parts: list[Region], cpu: str, workdir: Path) -> Reading:
    """One group-block's reading from the regions of one tile (one pass, or the two of a split)."""
    scale = 8 / tile_of(parts[0].name)[0] / len(parts)
    ms = [run_mca(p.body, cpu, workdir) for p in parts]
    return Reading(*(sum(getattr(m, f) for m in ms) * scale for f in ("instructions", "cycles", "uops")))


@dataclass
class Analysis:
    tiles: dict[str, list[Region]]  # regions by name, names in tile-width order
    readings: dict[tuple[str, str], Reading]  # per (name, cpu): one group-block

    @property
    def decode(self) -> str:
        return next(iter(self.tiles))

    @property
    def prefill(self) -> str:
        return list(self.tiles)[-1]


def analyse(cxxflags: list[str], keep: Path | None = None) -> Analysis:
    """Compile the marked build and read every tile's region on every CPU model."""
    for tool, package in ((CXX, "g++-aarch64-linux-gnu"), (MCA, "llvm-19")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (Debian package {package}; make system-deps installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        asm = compile_marked(keep or work / "kernels_neon.s", cxxflags)
        tiles: dict[str, list[Region]] = {}
        for r in regions(asm):
            if batch_of(r.name):
                tiles.setdefault(r.name, []).append(r)
        if not tiles:
            sys.exit("no LLVM-MCA regions in the marked assembly")
        tiles = {name: tiles[name] for name in sorted(tiles, key=batch_of)}
        readings = {(name, cpu): per_group_block(parts, cpu, work) for name, parts in tiles.items() for cpu in CPUS}
    return Analysis(tiles, readings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cxxflags", default="", help="extra compiler flags (e.g. -mtune=cortex-a76)")
    parser.add_argument("--keep", type=Path, help="write the marked assembly here")
    args = parser.parse_args()
    a = analyse(args.cxxflags.split(), args.keep)
    print(f"NEON Q40 x Q80, one 144-byte group-block (8 rows x 32 values) per iteration; "
          f"{CXX} {' '.join(neon_compile_options())} {args.cxxflags}".rstrip())
    print(f"GB/s of weights per core at {GHZ} GHz; llvm-mca {ITERATIONS} iterations\n")
    header = (f"{'region (per group-block)':26} {'cpu':12} {'tokens':>6} {'instr':>6} {'uops':>6} {'cycles':>7} "
              f"{'cyc/token':>9} {'GB/s':>6} {'spills':>6}")
    print(header)
    print("-" * len(header))
    for name, parts in a.tiles.items():
        b = batch_of(name)
        for cpu in CPUS:
            m = a.readings[name, cpu]
            note = "" if all(p.loop_closed for p in parts) else "  (loop step not found: body only)"
            spilled = spills_per_group_block(parts)
            print(f"{name:26} {cpu:12} {b:6d} {m.instructions:6.0f} {m.uops:6.0f} {m.cycles:7.2f} "
                  f"{m.cycles / b:9.2f} {GROUP_BLOCK_BYTES * GHZ / m.cycles:6.2f} {spilled:6.0f}{note}")
    print()
    for cpu in CPUS:
        d, p, pb = a.readings[a.decode, cpu], a.readings[a.prefill, cpu], batch_of(a.prefill)
        print(f"{cpu}: decode {d.cycles:.2f} cycles / {d.instructions:.0f} instructions per group-block "
              f"({GROUP_BLOCK_BYTES * GHZ / d.cycles:.2f} GB/s per core); prefill tile of {pb} tokens "
              f"{p.cycles / pb:.2f} cycles per group-block per token")


if __name__ == "__main__":
    main()
