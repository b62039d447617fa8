#!/usr/bin/env bash
# Builds the cached parts of the arm64 test/factory system: a Debian root file
# system (mmdebstrap, minbase), the cloud-arm64 kernel (the only Debian arm64
# kernel with CONFIG_TCG_TIS, which qemu's virt machine needs for its TPM) and a
# tiny initramfs made on the host from busybox-static and the few modules that
# mount the root disk. Making the initramfs on the host instead of running
# update-initramfs under qemu-user saves 10-20 minutes per build.
#
# Usage: rootfs.sh CACHEDIR     (CACHEDIR/{rootfs/,vmlinuz,initrd.img,kver} on success)
# The caller keys CACHEDIR by a hash of this script, so any change rebuilds.
set -euo pipefail

out=${1:?usage: rootfs.sh CACHEDIR}
suite=${IMAGE_SUITE:-trixie}
mirror=${IMAGE_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "rootfs.sh: must run as root (mmdebstrap, device nodes in the root file system)" >&2; exit 1; }

# qemu-user runs the arm64 maintainer scripts; it needs binfmt_misc.
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
arch-test arm64 >/dev/null || { echo "rootfs.sh: this machine cannot run arm64 binaries; install qemu-user-static binfmt-support" >&2; exit 1; }

# The slow part (mmdebstrap under emulation) survives a failure in the
# fast steps after it: $tmp is kept and reused until the whole build is done.
tmp=${out%/}.partial
mkdir -p "$tmp"
if [ ! -e "$tmp/rootfs.done" ]; then
rm -rf "$tmp/rootfs"
mkdir -p "$tmp/rootfs"
# The kernel package is unpacked, not installed: installing it would run
# update-initramfs under emulation. Its modules still land in /lib/modules so
# udev in the guest loads tpm_tis.
mmdebstrap --arch=arm64 --variant=minbase --mode=root --format=directory \
  --include=systemd,systemd-sysv,udev,kmod,dbus,tpm-udev,ca-certificates,busybox-static,e2fsprogs \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='chroot "$1" sh -c "cd /tmp && apt-get download \$(apt-cache depends linux-image-cloud-arm64 | sed -n \"s/.*Depends: \(linux-image-[0-9].*\)/\1/p\" | head -n1)"' \
  --customize-hook='for d in "$1"/tmp/linux-image-*.deb; do dpkg-deb -x "$d" "$1"; done; rm -f "$1"/tmp/*.deb' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  "$suite" "$tmp/rootfs" "$mirror"
touch "$tmp/rootfs.done"
fi

r=$tmp/rootfs
kver=$(ls "$r/lib/modules" | head -n1)
[ -n "$kver" ] || { echo "rootfs.sh: no kernel modules unpacked" >&2; exit 1; }
chroot "$r" depmod "$kver"
cp "$r/boot/vmlinuz-$kver" "$tmp/vmlinuz"
echo "$kver" >"$tmp/kver"

# Initramfs: busybox, the modules for a virtio disk with ext4 (and their
# dependencies from modules.dep), and an init that mounts root= and switches.
ird=$tmp/initramfs
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$r/usr/bin/busybox" "$ird/bin/busybox"
moddir=$r/lib/modules/$kver
deps() { # prints the module paths (relative) for module $1 and its dependencies, dependencies first
  local line
  line=$(grep -E "(^|/)$(echo "$1" | sed 's/[-_]/[-_]/g')\.ko(\.[a-z]+)?:" "$moddir/modules.dep" || true)
  [ -n "$line" ] || return 0
  local self=${line%%:*} rest=${line#*:}
  for d in $rest; do deps "$(basename "${d%%.ko*}")"; done
  echo "$self"
}
: >"$ird/modules"
# rtc-pl031: the virt machine's clock, read before systemd starts (a module
# loaded this late misses the kernel's own hctosys).
for m in virtio_mmio virtio_pci virtio_blk crc32c_generic ext4 rtc-pl031; do
  for p in $(deps "$m"); do
    b=$(basename "${p%%.ko*}").ko
    grep -qx "$b" "$ird/modules" && continue
    case $p in
      *.xz) xz -dc "$moddir/$p" >"$ird/lib/modules/$b" ;;
      *.zst) zstd -qdc "$moddir/$p" >"$ird/lib/modules/$b" ;;
      *) cp "$moddir/$p" "$ird/lib/modules/$b" ;;
    esac
    echo "$b" >>"$ird/modules"
  done
done
cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /modules); do /bin/busybox insmod /lib/modules/$m 2>/dev/null; done
[ -e /dev/rtc0 ] && /bin/busybox hwclock -s -u 2>/dev/null
root=/dev/vda
for a in $(/bin/busybox cat /proc/cmdline); do case $a in root=*) root=${a#root=};; esac; done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
/bin/busybox mount -o rw "$root" /newroot || { echo "initramfs: cannot mount $root"; exec /bin/busybox sh; }
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
INIT
chmod 755 "$ird/init"
(cd "$ird" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -n -9) >"$tmp/initrd.img"
rm -rf "$ird"

rm -rf "$out" "$tmp/rootfs.done"
mkdir -p "$(dirname "$out")"
mv "$tmp" "$out"
echo "rootfs.sh: $out ready (kernel $kver)"
