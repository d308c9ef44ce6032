#!/usr/bin/env bash
# The x86 test VMs' base image: Debian bookworm (systemd, NetworkManager, openssh-server, python3
# with venv), built once with debootstrap and cached outside the repository.
#
#   tests/vm/image.sh            # prints the image directory (built on the first call, ~6 min)
#
# The cache (${DLLAMA_VM_CACHE:-~/.cache/dllama-vm}) holds one directory per version of this
# script (and of image-lib.sh, which it shares with image-arm64.sh), image-amd64-<hash>, so
# editing the script builds a new image and never reuses a stale one. The directory holds:
#   base.qcow2                  the root file system (ext4, no partition table: root=/dev/vda)
#   vmlinuz, initrd.img         for direct kernel boot (the initrd carries only virtio and ext4)
#   id_ed25519, id_ed25519.pub  the key root logs in with (root has no password)
#
# The mirror is this machine's Debian archive (packaging/debian-mirror; DLLAMA_VM_MIRROR overrides).
# Each VM takes its management address and name from its kernel command line,
# `dllama.addr=10.77.0.11/24 dllama.hostname=vm-root`: a oneshot unit writes a NetworkManager
# profile for eth0 from them before NetworkManager starts. Needs root (debootstrap, chroot).
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
. "$(dirname "$SCRIPT")/image-lib.sh"
SUITE=bookworm
PACKAGES=systemd-sysv,libpam-systemd,udev,dbus,network-manager,dhcpcd,openssh-server,python3,python3-venv,linux-image-amd64,iproute2,nftables,iputils-ping,procps,sudo,initramfs-tools

image_begin amd64 "$SCRIPT"
# The image directories of this script's versions before image-lib.sh (image-<hash>) are stale.
rm -rf "$CACHE"/image-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]

for tool in debootstrap mkfs.ext4 qemu-img ssh-keygen; do
  command -v "$tool" >/dev/null || { log "missing $tool (apt-get install debootstrap e2fsprogs qemu-utils openssh-client)"; exit 1; }
done

start=$SECONDS
log "debootstrap $SUITE minbase from $MIRROR into $ROOT (a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
  tail -n 40 "$WORK/debootstrap.log" >&2
  exit 1
}
log "debootstrap done in $((SECONDS - start)) s"

# --- configuration ------------------------------------------------------------------------------
echo "dllama-vm" >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
echo "/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1" >"$ROOT/etc/fstab"

image_ssh

# NetworkManager: no invented "Wired connection 1"; profiles are keyfiles.
cat >"$ROOT/etc/NetworkManager/conf.d/dllama-e2e.conf" <<'EOF'
[main]
no-auto-default=*
plugins=keyfile
EOF

# The management address from the kernel command line, before NetworkManager starts.
cat >"$ROOT/usr/local/sbin/mgmt-net" <<'EOF'
#!/bin/sh
# Writes the NetworkManager profile "mgmt" for eth0 from dllama.addr= (and the host name from
# dllama.hostname=) on the kernel command line. With dllama.net=dhcpcd the node is a Raspberry
# Pi OS Bullseye look-alike instead: dhcpcd owns eth0 (its static address in /etc/dhcpcd.conf)
# and NetworkManager is off.
set -eu
addr=""; name=""; net=networkmanager
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    dllama.addr=*) addr="${arg#dllama.addr=}" ;;
    dllama.hostname=*) name="${arg#dllama.hostname=}" ;;
    dllama.net=*) net="${arg#dllama.net=}" ;;
  esac
done
if [ -n "$name" ]; then
  echo "$name" >/etc/hostname
  echo "$name" >/proc/sys/kernel/hostname
  grep -q "^127.0.1.1[[:space:]]" /etc/hosts || printf '127.0.1.1\t%s\n' "$name" >>/etc/hosts
fi
[ -n "$addr" ] || exit 0
if [ "$net" = dhcpcd ]; then
  grep -q "^# management address" /etc/dhcpcd.conf || cat >>/etc/dhcpcd.conf <<CONF

# management address (mgmt-net, from the kernel command line)
interface eth0
static ip_address=$addr
CONF
  # Runs before NetworkManager: its queued start is cancelled.
  systemctl disable NetworkManager.service
  systemctl --no-block stop NetworkManager.service
  systemctl enable dhcpcd.service
  systemctl --no-block start dhcpcd.service
  exit 0
fi
umask 077
cat >/etc/NetworkManager/system-connections/mgmt.nmconnection <<PROFILE
[connection]
id=mgmt
type=ethernet
interface-name=eth0
autoconnect=true
autoconnect-priority=0

[ipv4]
method=manual
address1=$addr

[ipv6]
method=ignore
PROFILE
EOF
chmod 0755 "$ROOT/usr/local/sbin/mgmt-net"
cat >"$ROOT/etc/systemd/system/mgmt-net.service" <<'EOF'
[Unit]
Description=Management address from the kernel command line (dllama.addr=)
DefaultDependencies=no
After=local-fs.target
Before=NetworkManager.service dhcpcd.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/mgmt-net

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
# dhcpcd only where mgmt-net turns it on (dllama.net=dhcpcd); NetworkManager everywhere else.
rm -f "$ROOT/etc/systemd/system/multi-user.target.wants/dhcpcd.service"
ln -sf /etc/systemd/system/mgmt-net.service "$ROOT/etc/systemd/system/multi-user.target.wants/mgmt-net.service"

# Only what costs boot time goes: waiting for the network, timers, trims.
image_mask NetworkManager-wait-online.service systemd-networkd-wait-online.service apt-daily.timer \
  apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer \
  systemd-timesyncd.service

# A small initrd: direct kernel boot from a virtio disk needs only these.
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' >"$ROOT/etc/initramfs-tools/modules"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sys "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
chroot "$ROOT" update-initramfs -u -k all >"$WORK/initramfs.log" 2>&1 || { tail -n 20 "$WORK/initramfs.log" >&2; exit 1; }
for m in dev/pts dev sys proc; do umount "$ROOT/$m"; done

chroot "$ROOT" apt-get clean
image_finish
