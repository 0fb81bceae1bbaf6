#!/bin/bash
# ext4 on an NBD export through nbdfuse and a loop device. Run it in a private mount namespace:
#   unshare -m --propagation private bash ext4_nbdfuse.sh PHASE URI WORKDIR [SRCDIR]
# so no mount leaks out and a dying script cannot pin a loop device in the host namespace.
#   PHASE=write:  mkfs.ext4, mount, copy SRCDIR to /tree, checksum, umount, fsck.ext4 -fn
#   PHASE=verify: fsck.ext4 -fn, mount read-only, checksum /tree, umount
#   PHASE=change: mount, replace /tree by a copy of SRCDIR, checksum, umount, fsck.ext4 -fn
# Checksums go to WORKDIR/sums.PHASE (sha256sum format, paths relative to /tree, sorted).
# nbdfuse is always unmounted and reaped on exit, even on failure.
set -euo pipefail
phase=$1 uri=$2 work=$3 src=${4:-}
fuse=$work/fuse
mnt=$work/mnt
mkdir -p "$fuse" "$mnt"
nbdfuse_pid=

cleanup() {
  rc=$?
  set +e
  if mountpoint -q "$mnt"; then umount "$mnt" || umount -l "$mnt"; fi
  if [ -n "$nbdfuse_pid" ]; then
    fusermount3 -u "$fuse" 2>/dev/null || fusermount3 -uz "$fuse" 2>/dev/null
    for _ in $(seq 200); do kill -0 "$nbdfuse_pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$nbdfuse_pid" 2>/dev/null
    wait "$nbdfuse_pid" 2>/dev/null
  fi
  exit $rc
}
trap cleanup EXIT

nbdfuse "$fuse" "$uri" &
nbdfuse_pid=$!
# Poll (bounded) for the file nbdfuse exposes.
for _ in $(seq 400); do
  [ -e "$fuse/nbd" ] && break
  kill -0 "$nbdfuse_pid" 2>/dev/null || { echo "nbdfuse exited early" >&2; exit 1; }
  sleep 0.05
done
[ -e "$fuse/nbd" ] || { echo "nbdfuse: $fuse/nbd did not appear within 20s" >&2; exit 1; }

checksum() {
  (cd "$mnt/tree" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) > "$work/sums.$phase"
}

fill_tree() {  # mount, replace /tree by a copy of SRCDIR, checksum, umount, fsck
  mount -o loop "$fuse/nbd" "$mnt"
  rm -rf "$mnt/tree"
  mkdir "$mnt/tree"
  cp -a "$src/." "$mnt/tree/"
  sync -f "$mnt"
  checksum
  umount "$mnt"
  fsck.ext4 -fn "$fuse/nbd"
}

case $phase in
  write)
    mkfs.ext4 -q -F -b 4096 "$fuse/nbd"
    fill_tree
    ;;
  change)
    fill_tree
    ;;
  verify)
    fsck.ext4 -fn "$fuse/nbd"
    mount -o loop,ro "$fuse/nbd" "$mnt"
    checksum
    umount "$mnt"
    ;;
  *)
    echo "unknown phase $phase" >&2; exit 2 ;;
esac
echo "ext4_nbdfuse $phase ok"
