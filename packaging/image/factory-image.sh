#!/usr/bin/env bash
# make factory-image: the arm64 image a manufacturer ships, from the cached
# base system (rootfs.sh: network by DHCP, time by NTP, kernel as a package,
# security updates, nothing of the build host) with the gwagent package
# installed offline (dpkg in a chroot under qemu-user) and enabled, and the
# product's settings. Writes OUTDIR/gwagent-factory-arm64.img (ext4 labelled
# gwroot, root=/dev/vda on qemu's virt machine), the image's own vmlinuz and
# initrd.img (from its /boot: the kernel package's), and manifest.txt.
#
# The product folder (PRODUCTDIR; packaging/image/product-example/ is the
# template) holds every per-product setting:
#   gwagent.toml   the agent's config: id scope, DPS endpoint, key URIs (required)
#   *.pem          trust bundles, copied to /etc/gwagent/
#   package        gwagent (default) or gwagent-pkcs11 (keys in a PKCS#11 token)
#   hostname       the gateways' host name (default: gateway)
#   station.pub    the factory station's SSH public key: enables the station
#                  login (root, key only, dropbear) that gwagent-station-done,
#                  the station's last step, removes. Without it, no login.
#   rootfs/        files copied over the image as they are: the product's own
#                  network (/etc/systemd/network/), NTP servers
#                  (/etc/systemd/timesyncd.conf.d/), apt mirror, anything else.
#
# Usage: packaging/image/factory-image.sh DEBDIR PRODUCTDIR OUTDIR   (root)
set -euo pipefail
cd "$(dirname "$0")/../.."
. packaging/image/common.sh
debdir=${1:?usage: factory-image.sh DEBDIR PRODUCTDIR OUTDIR}
product=${2:?usage: factory-image.sh DEBDIR PRODUCTDIR OUTDIR}
out=${3:?usage: factory-image.sh DEBDIR PRODUCTDIR OUTDIR}
[ "$(id -u)" = 0 ] || { echo "factory-image: must run as root" >&2; exit 1; }
die() { echo "factory-image: $*" >&2; exit 1; }
[ -r "$product/gwagent.toml" ] || die "$product/gwagent.toml missing (the product's settings; see packaging/image/product-example/)"
pkg=gwagent
[ -r "$product/package" ] && pkg=$(tr -d '[:space:]' <"$product/package")
case $pkg in gwagent | gwagent-pkcs11) ;; *) die "$product/package says '$pkg'; it must be gwagent or gwagent-pkcs11" ;; esac
deb=$(ls "$debdir/${pkg}"_*_arm64.deb 2>/dev/null | head -n1)
[ -n "$deb" ] || die "no ${pkg}_*_arm64.deb in $debdir (make deb)"
t0=$SECONDS
cache=$(rootfs_cache)
work=$(mktemp -d /var/tmp/gwagent-factory.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
cp -a "$cache/rootfs" "$root"

cp "$deb" "$root/tmp/gwagent.deb"
chroot "$root" dpkg -i /tmp/gwagent.deb >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; die "dpkg -i $(basename "$deb") failed"; }
rm "$root/tmp/gwagent.deb"
install -m 0640 -g "$(chroot "$root" getent group gwagent | cut -d: -f3)" "$product/gwagent.toml" "$root/etc/gwagent/gwagent.toml"
for f in "$product"/*.pem; do
	[ -e "$f" ] && install -m 0644 "$f" "$root/etc/gwagent/"
done
chroot "$root" gwagent version >/dev/null
[ -L "$root/etc/systemd/system/multi-user.target.wants/gwagent.service" ] || die "gwagent.service not enabled"
hostname=gateway
[ -r "$product/hostname" ] && hostname=$(tr -d '[:space:]' <"$product/hostname")
echo "$hostname" >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' "$hostname" >"$root/etc/hosts"

# The station's login, removed by gwagent-station-done.
if [ -r "$product/station.pub" ]; then
	install -d -m 0700 "$root/root/.ssh"
	install -m 0600 "$product/station.pub" "$root/root/.ssh/authorized_keys"
	chroot "$root" systemctl enable dropbear.service >/dev/null 2>&1 || die "cannot enable dropbear"
	install -m 0755 packaging/image/station-done.sh "$root/usr/local/sbin/gwagent-station-done"
fi
if [ -d "$product/rootfs" ]; then
	cp -a --no-preserve=ownership "$product/rootfs/." "$root/"
fi

# What a shipped image must not hold: the build host's or this build's
# identity and secrets. A product that replaces one of these in its
# rootfs/ does so on purpose and is not second-guessed.
ours() { [ ! -e "$product/rootfs/$1" ] && [ ! -L "$product/rootfs/$1" ]; }
if ours etc/resolv.conf; then
	[ "$(readlink "$root/etc/resolv.conf")" = ../run/systemd/resolve/stub-resolv.conf ] || die "/etc/resolv.conf is not systemd-resolved's stub"
fi
[ "$(cat "$root/etc/machine-id")" = uninitialized ] || die "/etc/machine-id is set; every gateway must make its own at first boot"
for f in "$root"/etc/dropbear/dropbear_*_host_key "$root"/etc/ssh/ssh_host_*_key "$root/var/lib/systemd/random-seed" "$root/var/lib/dbus/machine-id"; do
	[ ! -e "$f" ] || die "${f#"$root"} is in the image; it must be made on each gateway"
done
[ -z "$(ls -A "$root/var/lib/apt/lists" 2>/dev/null | grep -v '^lock$\|^partial$')" ] || die "apt lists of the build are in the image"
grep -rqs 'debian-security' "$root/etc/apt/sources.list" "$root/etc/apt/sources.list.d/" || die "no security updates source in /etc/apt"
kver=$(cat "$cache/kver")
dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Status}' "linux-image-$kver" | grep -q 'install ok installed' || die "the kernel is not an installed package"

mkdir -p "$out"
dpkg-query --admindir="$root/var/lib/dpkg" -W >"$out/manifest.txt"
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
mkimage "$root" "$out/gwagent-factory-arm64.img" 2G gwroot
echo "factory-image: $out/gwagent-factory-arm64.img with $(basename "$deb") ($(du -h --apparent-size "$out/gwagent-factory-arm64.img" | cut -f1) sparse, $(du -h "$out/gwagent-factory-arm64.img" | cut -f1) used) in $((SECONDS - t0)) s" >&2
echo "factory-image: boot it: qemu-system-aarch64 -M virt -cpu cortex-a57 -m 1024 -kernel $out/vmlinuz -initrd $out/initrd.img -append 'root=/dev/vda rw console=ttyAMA0' -drive if=none,id=r,file=$out/gwagent-factory-arm64.img,format=raw -device virtio-blk-pci,drive=r -netdev user,id=n -device virtio-net-pci,netdev=n ... (the TPM: see make factory-image-check)" >&2
