#!/usr/bin/env bash
# make factory-image: an arm64 Debian system image with the gwagent package
# installed offline (dpkg in a chroot under qemu-user, no running systemd)
# and enabled, plus the product's settings. Writes OUTDIR/gwagent-factory-arm64.img
# (ext4, root=/dev/vda), vmlinuz and initrd.img.
#
# Usage: packaging/image/factory-image.sh DEBDIR PRODUCTDIR OUTDIR   (root)
set -euo pipefail
cd "$(dirname "$0")/../.."
. packaging/image/common.sh
debdir=${1:?usage: factory-image.sh DEBDIR PRODUCTDIR OUTDIR}
product=${2:?usage: factory-image.sh DEBDIR PRODUCTDIR OUTDIR}
out=${3:?usage: factory-image.sh DEBDIR PRODUCTDIR OUTDIR}
deb=$(ls "$debdir"/gwagent_*_arm64.deb | head -n1)
[ "$(id -u)" = 0 ] || { echo "factory-image: must run as root" >&2; exit 1; }
[ -r "$product/gwagent.toml" ] || { echo "factory-image: $product/gwagent.toml missing (the product's settings)" >&2; exit 1; }
t0=$SECONDS
cache=$(rootfs_cache)
work=$(mktemp -d /var/tmp/gwagent-factory.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
cp -a "$cache/rootfs" "$root"
cp "$deb" "$root/tmp/gwagent.deb"
chroot "$root" dpkg -i /tmp/gwagent.deb
rm "$root/tmp/gwagent.deb"
install -m 0640 -g "$(chroot "$root" getent group gwagent | cut -d: -f3)" "$product/gwagent.toml" "$root/etc/gwagent/gwagent.toml"
for f in "$product"/*.pem; do
	[ -e "$f" ] && install -m 0644 "$f" "$root/etc/gwagent/"
done
chroot "$root" gwagent version >/dev/null
[ -L "$root/etc/systemd/system/multi-user.target.wants/gwagent.service" ] || { echo "factory-image: gwagent.service not enabled" >&2; exit 1; }
echo gateway >"$root/etc/hostname"
mkdir -p "$out"
mkimage "$root" "$out/gwagent-factory-arm64.img" 2G gwroot
cp "$cache/vmlinuz" "$cache/initrd.img" "$out/"
echo "factory-image: $out/gwagent-factory-arm64.img ($(du -h --apparent-size "$out/gwagent-factory-arm64.img" | cut -f1) sparse, $(du -h "$out/gwagent-factory-arm64.img" | cut -f1) used) in $((SECONDS - t0)) s" >&2
echo "factory-image: boot: qemu-system-aarch64 -M virt -cpu cortex-a57 -m 1024 -kernel $out/vmlinuz -initrd $out/initrd.img -append 'root=/dev/vda rw console=ttyAMA0' -drive if=none,id=r,file=$out/gwagent-factory-arm64.img,format=raw -device virtio-blk-pci,drive=r ..." >&2
