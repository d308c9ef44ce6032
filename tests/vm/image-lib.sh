# What the test VMs' image scripts share (sourced by image.sh and image-arm64.sh; not run alone).
#
# image_begin NAME SCRIPT  the cache directory $OUT=$CACHE/image-NAME-<hash of SCRIPT and this
#                          file>; prints it and exits when it is already built; else $WORK, $ROOT
# image_ssh                root logs in with a new key ($WORK/id_ed25519) only
# image_mask UNIT...       units that only cost boot time, masked
# image_finish             vmlinuz, initrd.img, base.qcow2 (ext4, no partition table) and the key
#                          into $OUT; older images of the same NAME pruned (never another NAME's)
#
# The mirror is this machine's Debian archive (packaging/debian-mirror); DLLAMA_VM_MIRROR overrides.

CACHE="${DLLAMA_VM_CACHE:-$HOME/.cache/dllama-vm}"
IMAGE_LIB="$(readlink -f "${BASH_SOURCE[0]}")"
REPO_DIR="$(cd "$(dirname "$IMAGE_LIB")/../.." && pwd)"
SIZE="${SIZE:-3G}"

log() { echo "[image] $*" >&2; }

image_mirror() {
  if [ -n "${DLLAMA_VM_MIRROR:-}" ]; then
    echo "$DLLAMA_VM_MIRROR"
  else
    "$REPO_DIR/packaging/debian-mirror"
  fi
}

image_begin() {
  IMAGE_NAME="$1"
  local key
  key="$(cat "$2" "$IMAGE_LIB" | sha256sum | cut -c1-16)"
  OUT="$CACHE/image-$IMAGE_NAME-$key"
  if [ -f "$OUT/base.qcow2" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] && [ -f "$OUT/id_ed25519" ]; then
    echo "$OUT"
    exit 0
  fi
  MIRROR="$(image_mirror)"
  mkdir -p "$CACHE"
  WORK="$(mktemp -d "$CACHE/build-$IMAGE_NAME-XXXXXX")"
  ROOT="$WORK/rootfs"
  trap image_cleanup EXIT
  START=$SECONDS
}

image_cleanup() {
  local m
  for m in dev/pts dev proc sys; do
    mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m"
  done
  rm -rf "$WORK"
}

image_ssh() {
  ssh-keygen -q -t ed25519 -N "" -C "dllama-e2e-$IMAGE_NAME" -f "$WORK/id_ed25519"
  install -d -m 0700 "$ROOT/root/.ssh"
  install -m 0600 "$WORK/id_ed25519.pub" "$ROOT/root/.ssh/authorized_keys"
  chroot "$ROOT" passwd -l root >/dev/null
  mkdir -p "$ROOT/etc/ssh/sshd_config.d"
  cat >"$ROOT/etc/ssh/sshd_config.d/dllama-e2e.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
EOF
}

image_mask() {
  local unit
  for unit in "$@"; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
  done
}

image_finish() {
  rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
    "$ROOT"/tmp/* "$ROOT"/var/log/*.log
  mkdir -p "$WORK/out"
  cp "$(ls "$ROOT"/boot/vmlinuz-* | sort -V | tail -n1)" "$WORK/out/vmlinuz"
  cp "$(ls "$ROOT"/boot/initrd.img-* | sort -V | tail -n1)" "$WORK/out/initrd.img"
  mv "$WORK/id_ed25519" "$WORK/id_ed25519.pub" "$WORK/out/"
  mkfs.ext4 -q -L root -E root_owner=0:0 -d "$ROOT" "$WORK/base.raw" "$SIZE"
  qemu-img convert -O qcow2 "$WORK/base.raw" "$WORK/out/base.qcow2"
  rm -rf "$OUT"
  mv "$WORK/out" "$OUT"
  # Images of earlier versions of the same script are stale (~700 MB each; the snapshots of VMs
  # booted from them go with them in cluster.py). Another architecture's image is not.
  local old
  for old in "$CACHE/image-$IMAGE_NAME"-*; do
    [ "$old" = "$OUT" ] || rm -rf "$old"
  done
  log "image $OUT ($(du -sh "$OUT/base.qcow2" | cut -f1), initrd $(du -sh "$OUT/initrd.img" | cut -f1)) in $((SECONDS - START)) s"
  echo "$OUT"
}
