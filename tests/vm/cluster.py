"""Four Debian VMs on a bridge inside a network namespace, for the end-to-end test: three x86_64
bookworm VMs and one arm64 trixie VM set up like Raspberry Pi OS Trixie (cloud-init, netplan,
NetworkManager).

    cluster = Cluster({"x86_64": image_dir, "aarch64": arm64_image_dir}, run_dir, cache_dir)
    cluster.up()          # netns + bridge + taps, then boot (or resume the cached snapshot)
    ...                   # everything that talks to the VMs runs under `netns_exec(...)`
    cluster.reboot(vm)    # `systemctl reboot` in the guest, back when ssh answers from the new boot
    cluster.down()        # kill qemu, delete the namespace (always: call it in a finally)

The namespace `dllama-e2e` holds a bridge br0 (10.77.0.254/24) and one tap per VM, all at MTU 9000
(jumbo frames need every hop at 9000). Nothing leaves it: the VMs have no route out, and every
command that talks to them runs inside it.

VMs boot their kernel directly (root=/dev/vda, the management address on the kernel command
line: read by the x86 image's mgmt-net.service; on the arm64 VM it is cloud-init's NoCloud seed,
`ds=nocloud;i=NAME;h=NAME network-config=<base64 netplan v2>`, which cloud-init renders into
/etc/netplan/50-cloud-init.yaml for NetworkManager, as on a Raspberry Pi).
Each image (one per architecture) has its own root key: `cluster.key_for(vm)`. Each VM's disk is a qcow2 overlay of the cached base
image kept in the cache; the first boot saves the booted VMs as the internal snapshot `booted`
(through QMP, with no ssh session open), and later runs start with `-loadvm booted`, which reverts
disk and memory to that moment, then set the guests' clocks. The snapshot is keyed by the image
and everything on the qemu command line, so a change to either boots cold again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
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
    # x86_64 (image.sh: Debian bookworm) or aarch64 (image-arm64.sh: Debian trixie like Raspberry
    # Pi OS Trixie, under qemu-system-aarch64; its network is cloud-init's, `net` does not apply).
    arch: str = "x86_64"

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
    # The engine worker with numpy on Python 3.13 needs about 1 GB.
    VM("vm-arm", "10.77.0.14", 1024, 4, arch="aarch64"),
)
ARCHS = tuple(sorted({vm.arch for vm in VMS}))
QEMU = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}


def netplan_config(vm: VM) -> str:
    """The arm64 VM's network-config (netplan v2, as Raspberry Pi Imager writes it for cloud-init)."""
    return ("network:\n  version: 2\n  renderer: NetworkManager\n  ethernets:\n    eth0:\n"
            f"      dhcp4: false\n      addresses: [{vm.address}/{PREFIX}]\n")


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
    def __init__(self, images, run_dir: Path, cache_dir: Path, kvm: bool = False, log=print):
        """images: architecture ("x86_64", "aarch64") -> image directory (image.sh,
        image-arm64.sh); a single directory means the x86_64 image."""
        if not isinstance(images, dict):
            images = {"x86_64": images}
        self.images = {arch: Path(path) for arch, path in images.items()}
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cache_dir)
        # KVM only where the host runs the guest's architecture; the others stay under TCG.
        self.kvm = kvm
        self.log = log
        self.procs: dict[str, subprocess.Popen] = {}
        self.snapshot_dir = self.cache_dir / "vms"  # named after spec_hash() just below
        self.snapshot_dir = self.cache_dir / f"vms-{self.spec_hash()}"

    def image_dir(self, vm: VM) -> Path:
        return self.images[vm.arch]

    def key_for(self, vm: VM) -> Path:
        """The private key root logs in to `vm` with (its image's)."""
        return self.image_dir(vm) / "id_ed25519"

    def uses_kvm(self, vm: VM) -> bool:
        return self.kvm and platform.machine() == vm.arch

    # --- what the snapshot depends on ----------------------------------------------------------
    def qemu_argv(self, vm: VM, loadvm: bool) -> list[str]:
        machine, accel, boot = (self._aarch64_parts(vm) if vm.arch == "aarch64" else self._x86_64_parts(vm))
        # norandmaps: TCG keys translated code by virtual address, so with address-space
        # randomisation every new process translates its libraries again (fork+exec 3x slower).
        cmdline = f"root=/dev/vda rw {boot}" + ("" if self.uses_kvm(vm) else " norandmaps")
        image = self.image_dir(vm)
        argv = [
            QEMU[vm.arch], "-name", vm.name, "-machine", machine, *accel,
            "-smp", "1", "-m", str(vm.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
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

    def _x86_64_parts(self, vm: VM) -> tuple[str, list[str], str]:
        """The machine, the accelerator and CPU, and the kernel command line's own part."""
        # Under TCG, `rep stosb`/`rep movsb` run a byte per step: with ERMS/FSRM advertised the
        # guest kernel zeroes and copies pages that way (measured: dd from /dev/zero 8x slower).
        accel = (["-enable-kvm", "-cpu", "host,-arch-capabilities"] if self.uses_kvm(vm)
                 else ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max,erms=off,fsrm=off"])
        boot = (f"console=ttyS0 net.ifnames=0 quiet "
                f"dllama.addr={vm.address}/{PREFIX} dllama.hostname={vm.name} dllama.net={vm.net}")
        return "q35", accel, boot

    def _aarch64_parts(self, vm: VM) -> tuple[str, list[str], str]:
        # -cpu max has dotprod (asimddp) as a Pi 5's Cortex-A76 does; pauth-impdef=on makes
        # pointer authentication cheap to emulate (the architected algorithm costs a lot).
        accel = (["-enable-kvm", "-cpu", "host"] if self.uses_kvm(vm)
                 else ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max,pauth-impdef=on"])
        network_config = base64.b64encode(netplan_config(vm).encode()).decode()
        # cloud-init's NoCloud seed: instance id and host name (meta-data), the network-config.
        boot = (f"console=ttyAMA0 net.ifnames=0 quiet "
                f"ds=nocloud;i={vm.name};h={vm.name} network-config={network_config}")
        return "virt", accel, boot

    def spec_hash(self) -> str:
        versions = {arch: run([QEMU[arch], "--version"], capture_output=True).stdout.splitlines()[0]
                    for arch in ARCHS}
        spec = {"images": {arch: self.images[arch].name for arch in ARCHS}, "qemu": versions,
                "kvm": self.kvm, "vms": [vm.__dict__ for vm in VMS], "net": [HOST_ADDRESS, PREFIX, MTU],
                # the command lines minus the paths (the images are their names above)
                "argv": [[a for a in self.qemu_argv(vm, False)
                          if str(self.run_dir) not in a and str(self.cache_dir) not in a]
                         for vm in VMS]}
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
        return netns_exec(["ssh", "-i", self.key_for(vm), "-o", "StrictHostKeyChecking=no",
                           "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                           "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}",
                           "-o", "ControlMaster=no", "-o", "ControlPath=none",
                           f"root@{vm.address}", *command])

    def ssh(self, vm: VM, *command, timeout: int = 60, check: bool = True):
        return run(self.ssh_argv(vm, *command), check=check, capture_output=True, timeout=timeout)

    def wait_for_ssh(self, vm: VM, timeout: float) -> bool:
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(vm.name)
            if proc is not None and proc.poll() is not None:
                self.log(f"  {vm.name}: qemu exited with {proc.returncode} "
                         f"(see {self.run_dir / (vm.name + '.qemu.log')})")
                return False
            try:
                if self.ssh(vm, "true", timeout=30, check=False).returncode == 0:
                    self.log(f"  {vm.name} ({vm.arch}): ssh after {time.monotonic() - start:.0f} s")
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
                 "-b", self.image_dir(vm) / "base.qcow2", self.disk(vm)])
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

    def up(self, cold: bool = False, boot_timeout: float = 900, resume_timeout: float = 240) -> str:
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

    def boot_id(self, vm: VM) -> str:
        return self.ssh(vm, "cat", "/proc/sys/kernel/random/boot_id").stdout.strip()

    def reboot(self, vm: VM, timeout: float = 600) -> float:
        """Reboot `vm` from inside (`systemctl reboot` over ssh) and wait until ssh answers from
        the new boot (another boot id); returns the seconds it took. qemu stays the same process
        (a guest reset boots the same kernel and disk again, never the snapshot)."""
        before = self.boot_id(vm)
        start = time.monotonic()
        try:
            # The session may die with the guest's sshd before it returns: not a failure.
            self.ssh(vm, "systemctl", "reboot", timeout=60, check=False)
        except subprocess.TimeoutExpired:
            pass
        deadline = start + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(vm.name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{vm.name}: qemu exited with {proc.returncode} during the reboot")
            try:
                answer = self.ssh(vm, "cat", "/proc/sys/kernel/random/boot_id", timeout=30, check=False)
                if answer.returncode == 0 and answer.stdout.strip() not in ("", before):
                    return time.monotonic() - start
            except subprocess.TimeoutExpired:
                pass
            time.sleep(2)
        raise RuntimeError(f"{vm.name}: no ssh from a new boot {timeout:.0f} s after `systemctl reboot` "
                           f"(console: {self.run_dir / (vm.name + '.console.log')})")

    def down(self):
        self.kill_vms()
        self.netns_down()
