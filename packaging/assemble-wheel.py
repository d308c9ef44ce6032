"""Our wheel for one node kind: the pure-Python wheel scikit-build-core builds (the package and
its metadata, with no CMake run) plus the extension packaging/build-extension compiled for that
kind, under the kind's tag.

    python3 packaging/assemble-wheel.py PURE_WHEEL EXTENSION PYTHON_TAG OUT_DIR

EXTENSION goes into the package directory under its own name (_core.cpython-313-aarch64-linux-gnu.so),
WHEEL says Root-Is-Purelib: false and Tag: PYTHON_TAG-PYTHON_TAG-PLATFORM (cp313-cp313-
manylinux_2_36_aarch64), the platform read from the extension itself: its ELF machine and the
newest glibc symbol version it needs, so the tag is true by construction and an installer on an
older system refuses the wheel instead of a failing import. RECORD is written anew. Deterministic: entries
sorted (the .dist-info last, RECORD at its end, as wheels have it), every timestamp
SOURCE_DATE_EPOCH, fixed permissions and compression, so the same inputs give the same bytes
(nodes reinstall only when the wheelhouse really changed). Prints the wheel's path.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
import sys
import time
import zipfile
from pathlib import Path

ZIP_EPOCH = 315532800  # 1980-01-01, the earliest time a zip entry can hold


ELF_ARCH = {62: "x86_64", 183: "aarch64", 243: "riscv64"}  # e_machine -> `uname -m`


def platform_tag(elf: bytes) -> str:
    """manylinux_2_N_ARCH for a 64-bit little-endian ELF shared object: N the newest GLIBC_2.N
    its dynamic string table names (the symbol versions it needs)."""
    if elf[:4] != b"\x7fELF" or elf[4:6] != b"\x02\x01":
        raise SystemExit("not a 64-bit little-endian ELF file")
    machine, = struct.unpack_from("<H", elf, 18)
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def name(section) -> bytes:
        start = names_at + section[0]
        return elf[start:elf.index(b"\0", start)]

    (dynstr,) = [s for s in sections if name(s) == b".dynstr"]
    table = elf[dynstr[4]:dynstr[4] + dynstr[5]]
    versions = [(int(a), int(b)) for a, b in re.findall(rb"\0GLIBC_(\d+)\.(\d+)", b"\0" + table)]
    major, minor = max(versions, default=(2, 17))
    return f"manylinux_{major}_{minor}_{ELF_ARCH[machine]}"


def record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def wheel_metadata(text: str, tag: str) -> str:
    """The template's WHEEL file with its tags replaced: a platform wheel now."""
    lines = [line for line in text.splitlines() if line and not line.startswith(("Tag:", "Root-Is-Purelib:"))]
    return "\n".join(lines + ["Root-Is-Purelib: false", f"Tag: {tag}"]) + "\n"


def assemble(pure: Path, extension: Path, python_tag: str, out_dir: Path) -> Path:
    name, version = pure.name.split("-")[:2]
    binary = extension.read_bytes()
    tag = f"{python_tag}-{python_tag}-{platform_tag(binary)}"
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, tuple[bytes, int]] = {}
    with zipfile.ZipFile(pure) as zf:
        for info in zf.infolist():
            if info.is_dir() or info.filename in (f"{dist_info}/RECORD", f"{dist_info}/WHEEL"):
                continue
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            files[info.filename] = (zf.read(info), mode)
        wheel = wheel_metadata(zf.read(f"{dist_info}/WHEEL").decode(), tag)
    package = next(p.split("/")[0] for p in files if not p.startswith(dist_info))
    if any(Path(p).name.startswith("_core.") and Path(p).suffix == ".so" for p in files):  # _core.pyi belongs
        raise SystemExit(f"{pure}: already holds an extension; expected the pure-Python wheel")
    files[f"{package}/{extension.name}"] = (binary, 0o755)
    files[f"{dist_info}/WHEEL"] = (wheel.encode(), 0o644)

    order = sorted(files, key=lambda p: (p.startswith(dist_info + "/"), p))
    record = "".join(f"{p},{record_hash(files[p][0])},{len(files[p][0])}\n" for p in order)
    record += f"{dist_info}/RECORD,,\n"
    files[f"{dist_info}/RECORD"] = (record.encode(), 0o644)
    order.append(f"{dist_info}/RECORD")

    epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", ZIP_EPOCH)), ZIP_EPOCH)
    date_time = time.gmtime(epoch)[:6]
    out = out_dir / f"{name}-{version}-{tag}.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w") as zf:
        for path in order:
            data, mode = files[path]
            info = zipfile.ZipInfo(path, date_time)
            info.create_system = 3  # Unix, so the permissions below are read
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=6)
    partial.replace(out)
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(__doc__)
    pure, extension, python_tag, out_dir = argv
    print(assemble(Path(pure), Path(extension), python_tag, Path(out_dir)))


if __name__ == "__main__":
    main(sys.argv[1:])
