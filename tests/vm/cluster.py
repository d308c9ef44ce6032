"""Three Debian VMs on a bridge inside a network namespace, for the end-to-end test.

    cluster = Cluster(image_dir, run_dir)
    cluster.up()          # netns + bridge + taps, then boot (or resume the cached snapshot)
    ...                   # everything that talks to the VMs runs under `cluster.netns_exec(...)`
    cluster.down()        # kill qemu, delete the namespace (always: call it in a finally)

The namespace `dllama-e2e` holds a bridge br0 (10.77.0.254/24) and one tap per VM, all at MTU 9000
(jumbo frames need every hop at 9000). Nothing leaves it: the VMs have no route out, and every
command that talks to them runs inside it.

VMs boot their kernel directly (root=/dev/vda, the management address on the kernel command
line, read by the image's mgmt-net.service). Each VM's disk is a qcow2 overlay of the cached base
image kept in the cache; the first boot saves the booted VMs as the internal snapshot `booted`
(through QMP, with no ssh session open), and later runs start with `-loadvm booted`, which reverts
disk and memory to that moment, then set the guests' clocks. The snapshot is keyed by the image
and everything on the qemu command line, so a change to either boots cold again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

NETNS = "dllama-e2e"
BRIDGE = "br0"
HOST_ADDRESS = "10.77.0.254"
PREFIX = 24
MTU = 9000
SNAPSHOT = "booted"


@dataclass(frozen=True)
class VM:
    name: str
    address: str
    memory_mb: int
    index: int
    # The network stack that owns eth0: NetworkManager (Debian, Raspberry Pi OS Bookworm) or
    # dhcpcd (Raspberry Pi OS Bullseye), so site.yml's network role runs both of its paths.
    net: str = "networkmanager"

    @property
    def tap(self) -> str:
        return f"tap{self.index}"

    @property
    def mac(self) -> str:
        return f"52:54:00:77:00:{self.index + 0x10:02x}"


VMS = (
    VM("vm-root", "10.77.0.11", 1024, 1),
    VM("vm-worker1", "10.77.0.12", 640, 2),
    VM("vm-worker2", "10.77.0.13", 640, 3, net="dhcpcd"),
)


def run(argv, check=True, **kw):
    return subprocess.run([str(a) for a in argv], check=check, text=True, **kw)


def netns_exec(argv) -> list[str]:
    """argv run inside the test's network namespace."""
    return ["ip", "netns", "exec", NETNS] + [str(a) for a in argv]


class Qmp:
    """The smallest QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 600):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            message = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, **arguments):
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def hmp(self, command_line: str) -> str:
        return self.execute("human-monitor-command", **{"command-line": command_line})

    def close(self):
        self.file.close()
        self.sock.close()


class Cluster:
    def __init__(self, image_dir: Path, run_dir: Path, cache_dir: Path, kvm: bool = False,
                 log=print):
        self.image_dir = Path(image_dir)
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cache_dir)
        self.kvm = kvm
        self.log = log
        self.key = self.image_dir / "id_ed25519"
        self.procs: dict[str, subprocess.Popen] = {}
        self.snapshot_dir = self.cache_dir / "vms"  # named after spec_hash() just below
        self.snapshot_dir = self.cache_dir / f"vms-{self.spec_hash()}"

    # --- what the snapshot depends on ----------------------------------------------------------
    def qemu_argv(self, vm: VM, loadvm: bool) -> list[str]:
        # Under TCG, `rep stosb`/`rep movsb` run a byte per step: with ERMS/FSRM advertised the
        # guest kernel zeroes and copies pages that way (measured: dd from /dev/zero 8x slower).
        accel = (["-enable-kvm", "-cpu", "host,-arch-capabilities"] if self.kvm
                 else ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max,erms=off,fsrm=off"])
        # norandmaps: TCG keys translated code by virtual address, so with address-space
        # randomisation every new process translates its libraries again (fork+exec 3x slower).
        cmdline = (f"root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet "
                   f"dllama.addr={vm.address}/{PREFIX} dllama.hostname={vm.name} dllama.net={vm.net}"
                   + ("" if self.kvm else " norandmaps"))
        argv = [
            "qemu-system-x86_64", "-name", vm.name, "-machine", "q35", *accel,
            "-smp", "1", "-m", str(vm.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(self.image_dir / "vmlinuz"), "-initrd", str(self.image_dir / "initrd.img"),
            "-append", cmdline,
            "-drive", f"file={self.disk(vm)},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            "-netdev", f"tap,id=net0,ifname={vm.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={vm.mac}",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{self.run_dir / (vm.name + '.console.log')}",
            "-qmp", f"unix:{self.qmp_path(vm)},server=on,wait=off",
        ]
        if loadvm:
            argv += ["-loadvm", SNAPSHOT]
        return argv

    def spec_hash(self) -> str:
        version = run(["qemu-system-x86_64", "--version"], capture_output=True).stdout.splitlines()[0]
        spec = {"image": self.image_dir.name, "qemu": version, "kvm": self.kvm,
                "vms": [vm.__dict__ for vm in VMS], "net": [HOST_ADDRESS, PREFIX, MTU],
                # the command line minus the paths (the image is its name above)
                "argv": [a for a in self.qemu_argv(VMS[0], False)
                         if str(self.run_dir) not in a and str(self.cache_dir) not in a]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def disk(self, vm: VM) -> Path:
        return self.snapshot_dir / f"{vm.name}.qcow2"

    def qmp_path(self, vm: VM) -> Path:
        return self.run_dir / f"{vm.name}.qmp"

    # --- the namespace ---------------------------------------------------------------------------
    def netns_up(self):
        self.netns_down()
        run(["ip", "netns", "add", NETNS])
        ip = ["ip", "-n", NETNS]
        run(ip + ["link", "set", "lo", "up"])
        # A fixed MAC: a resumed guest still has the bridge in its ARP cache from snapshot time.
        run(ip + ["link", "add", BRIDGE, "address", "52:54:00:77:00:fe", "type", "bridge"])
        for vm in VMS:
            run(ip + ["tuntap", "add", vm.tap, "mode", "tap"])
            run(ip + ["link", "set", vm.tap, "mtu", MTU])
            run(ip + ["link", "set", vm.tap, "master", BRIDGE])
            run(ip + ["link", "set", vm.tap, "up"])
        run(ip + ["link", "set", BRIDGE, "mtu", MTU])
        run(ip + ["addr", "add", f"{HOST_ADDRESS}/{PREFIX}", "dev", BRIDGE])
        run(ip + ["link", "set", BRIDGE, "up"])

    def netns_down(self):
        if NETNS not in run(["ip", "netns", "list"], capture_output=True).stdout.split():
            return
        # Processes left in it by an earlier run of this test that did not finish (ours: by pid).
        pids = run(["ip", "netns", "pids", NETNS], capture_output=True, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        run(["ip", "netns", "del", NETNS], check=False)

    # --- VMs ------------------------------------------------------------------------------------
    def start(self, vm: VM, loadvm: bool):
        self.qmp_path(vm).unlink(missing_ok=True)
        log = open(self.run_dir / f"{vm.name}.qemu.log", "ab")
        self.procs[vm.name] = subprocess.Popen(netns_exec(self.qemu_argv(vm, loadvm)),
                                               stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)

    def ssh_argv(self, vm: VM, *command, timeout: int = 10) -> list[str]:
        return netns_exec(["ssh", "-i", self.key, "-o", "StrictHostKeyChecking=no",
                           "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                           "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}",
                           "-o", "ControlMaster=no", "-o", "ControlPath=none",
                           f"root@{vm.address}", *command])

    def ssh(self, vm: VM, *command, timeout: int = 60, check: bool = True):
        return run(self.ssh_argv(vm, *command), check=check, capture_output=True, timeout=timeout)

    def wait_for_ssh(self, vm: VM, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(vm.name)
            if proc is not None and proc.poll() is not None:
                self.log(f"  {vm.name}: qemu exited with {proc.returncode} "
                         f"(see {self.run_dir / (vm.name + '.qemu.log')})")
                return False
            try:
                if self.ssh(vm, "true", timeout=30, check=False).returncode == 0:
                    return True
            except subprocess.TimeoutExpired:
                pass
            time.sleep(2)
        self.log(f"  {vm.name}: no ssh after {timeout:.0f} s "
                 f"(console: {self.run_dir / (vm.name + '.console.log')})")
        return False

    def wait_all(self, timeout: float) -> bool:
        with ThreadPoolExecutor(len(VMS)) as pool:
            return all(pool.map(lambda vm: self.wait_for_ssh(vm, timeout), VMS))

    def kill_vms(self):
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def boot_cold(self, timeout: float):
        # Snapshots of other qemu command lines or images are stale: ~600 MB each.
        for old in self.cache_dir.glob("vms-*"):
            shutil.rmtree(old, ignore_errors=True)
        self.snapshot_dir.mkdir(parents=True)
        for vm in VMS:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                 "-b", self.image_dir / "base.qcow2", self.disk(vm)])
            self.start(vm, loadvm=False)
        if not self.wait_all(timeout):
            raise RuntimeError("the VMs did not come up")
        # The ssh probes are closed: no session is frozen into the snapshot.
        for vm in VMS:
            qmp = Qmp(self.qmp_path(vm))
            try:
                out = qmp.hmp(f"savevm {SNAPSHOT}")
            finally:
                qmp.close()
            if "rror" in out:  # HMP reports failures as text
                raise RuntimeError(f"savevm on {vm.name}: {out.strip()}")
        (self.snapshot_dir / "ok").write_text(self.snapshot_dir.name + "\n")

    def resume(self, timeout: float) -> bool:
        for vm in VMS:
            self.start(vm, loadvm=True)
        if not self.wait_all(timeout):
            return False
        # The guests' clocks stopped at the snapshot (a new ssh session costs seconds in a guest).
        with ThreadPoolExecutor(len(VMS)) as pool:
            list(pool.map(lambda vm: self.ssh(vm, "date", "-s", f"@{int(time.time())}"), VMS))
        return True

    def up(self, cold: bool = False, boot_timeout: float = 600, resume_timeout: float = 180) -> str:
        """Boot the VMs (or resume the snapshot); returns "resumed" or "booted cold"."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.netns_up()
        if not cold and (self.snapshot_dir / "ok").is_file():
            if self.resume(resume_timeout):
                return "resumed"
            self.log("  resuming the snapshot failed: booting cold")
            self.kill_vms()
        self.boot_cold(boot_timeout)
        return "booted cold"

    def down(self):
        self.kill_vms()
        self.netns_down()
