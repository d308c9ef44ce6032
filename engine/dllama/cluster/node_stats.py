"""A node's own figures (temperature, clock, load, memory, the Pi's throttling word), read from
sysfs, /proc and `vcgencmd`, and the check the root applies to the figures a worker reports.

Every figure may be missing (None): a VM has no thermal zone, an x86 box no vcgencmd. A worker
sends what `read_local` gives in a STATS frame; the root takes a peer's figures only through
`check_figures`, which keeps the known fields, each a finite number in its range, and refuses
anything else with the field named.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

SYS = Path("/sys")
PROC = Path("/proc")
VCGENCMD_TIMEOUT = 2.0
# Thermal zones that measure the CPU, in order of preference (Pi: cpu-thermal, x86: the package).
CPU_ZONES = ("cpu-thermal", "x86_pkg_temp", "soc-thermal", "cpu_thermal")

# The bits of `vcgencmd get_throttled`: the low ones hold now, the same ones 16 higher
# have held at some point since boot.
THROTTLE_BITS = {"under_voltage": 0x1, "freq_capped": 0x2, "throttled": 0x4, "soft_temp_limit": 0x8}
SINCE_BOOT_SHIFT = 16

# field -> (kind, lowest, highest): what a root accepts from a worker
FIELDS: dict[str, tuple[type, float, float]] = {
    "temperature_c": (float, -100.0, 200.0),
    "cpu_mhz": (float, 0.0, 100_000.0),
    "load1": (float, 0.0, 100_000.0),
    "cpus": (int, 1, 4096),
    "rss_bytes": (int, 0, 1 << 50),
    "mem_total_bytes": (int, 0, 1 << 50),
    "mem_available_bytes": (int, 0, 1 << 50),
    "throttled": (int, 0, (1 << 32) - 1),
}
INSTANCE_RE = re.compile(r"[0-9a-f]{32}")


def decode_throttled(word: int | None) -> dict[str, dict[str, bool]] | None:
    """{"now": {flag: bool}, "since_boot": {flag: bool}}, or None when the node has no such word."""
    if word is None:
        return None
    return {"now": {name: bool(word & bit) for name, bit in THROTTLE_BITS.items()},
            "since_boot": {name: bool(word & (bit << SINCE_BOOT_SHIFT)) for name, bit in THROTTLE_BITS.items()}}


def read_local() -> dict[str, float | int | None]:
    """This node's figures now: each field of FIELDS, None where the node does not have it."""
    total, available = _meminfo()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "temperature_c": _temperature(),
        "cpu_mhz": _cpu_mhz(),
        "load1": load,
        "cpus": os.cpu_count(),
        "rss_bytes": _rss(),
        "mem_total_bytes": total,
        "mem_available_bytes": available,
        "throttled": _throttled(),
    }


def check_figures(obj: object) -> dict[str, float | int | None]:
    """A peer's figures as the root keeps them: every FIELDS entry (None when absent), unknown
    keys dropped. A wrong type, a non-finite number or one out of range is a ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("the figures are not a JSON object")
    out: dict[str, float | int | None] = {}
    for name, (kind, low, high) in FIELDS.items():
        value = obj.get(name)
        if value is None:
            out[name] = None
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind is int and not isinstance(value, int)):
            raise ValueError(f"figure {name} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"figure {name} is out of range ({low}..{high})")
        out[name] = kind(value)
    return out


def check_instance(value: object) -> str:
    """The worker process's random id (a new one after every restart)."""
    if not isinstance(value, str) or not INSTANCE_RE.fullmatch(value):
        raise ValueError("instance is not 32 hex digits")
    return value


# readers: each returns None when the node does not have the figure


def _read(path: Path) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(4096)
    except OSError:
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        return float(text.strip()) if text is not None else None
    except ValueError:
        return None


def _temperature() -> float | None:
    """°C of the CPU's thermal zone (the first zone when none is named as the CPU's)."""
    zones = sorted((SYS / "class/thermal").glob("thermal_zone*"))
    kinds = {z: (_read(z / "type") or "").strip() for z in zones}
    preferred = [z for name in CPU_ZONES for z in zones if kinds[z] == name]
    for zone in preferred + zones:
        millidegrees = _number(zone / "temp")
        if millidegrees is not None and -100_000 <= millidegrees <= 200_000:
            return round(millidegrees / 1000, 1)
    return None


def _cpu_mhz() -> float | None:
    """cpu0's clock now (cpufreq), else what /proc/cpuinfo says (a VM has no cpufreq)."""
    khz = _number(SYS / "devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    if khz is not None:
        return round(khz / 1000, 1)
    for line in (_read(PROC / "cpuinfo") or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "cpu MHz":
            try:
                return round(float(value), 1)
            except ValueError:
                return None
    return None


def _meminfo() -> tuple[int | None, int | None]:
    fields = {}
    for line in (_read(PROC / "meminfo") or "").splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024  # kB
    return fields.get("MemTotal"), fields.get("MemAvailable")


def _rss() -> int | None:
    """This process's resident memory: the engine's weights, KV cache and buffers."""
    for line in (_read(PROC / "self/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _throttled() -> int | None:
    """`vcgencmd get_throttled` (throttled=0x50005) as a number; None without vcgencmd."""
    tool = shutil.which("vcgencmd")
    if tool is None:
        return None
    try:
        run = subprocess.run([tool, "get_throttled"], capture_output=True, text=True, timeout=VCGENCMD_TIMEOUT,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.fullmatch(r"throttled=(0x[0-9a-fA-F]{1,8})", run.stdout.strip())
    return int(match.group(1), 16) if match and run.returncode == 0 else None
