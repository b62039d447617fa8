#!/usr/bin/env bash
# Builds the cached base of the arm64 gateway system, shared by make
# image-check, factory-image and factory-image-check: a Debian root file
# system that a manufacturer can ship once gwagent and the product's
# settings are added (factory-image.sh does that).
#
# What the base is, and why:
# - Debian minbase + systemd, udev, dbus, tpm-udev, ca-certificates.
# - The kernel as a package (linux-image-cloud-arm64: the only Debian arm64
#   flavour with CONFIG_TCG_TIS, which qemu's virt machine needs for its
#   TPM), so apt upgrades it with the security updates. Its initramfs comes
#   from tiny-initramfs (the kernel's linux-initramfs-tool): a few KiB of C
#   built in seconds, where initramfs-tools would take 10-20 minutes under
#   qemu-user and boot slower. It loads the modules listed below and mounts
#   root=, nothing else.
# - Network by DHCP on every Ethernet port (systemd-networkd), names from
#   systemd-resolved (/etc/resolv.conf points at its stub; nothing of the
#   build host's), time from systemd-timesyncd (Debian's NTP pool; a product
#   puts its own servers in its folder).
# - apt sources for the release, its updates and its security updates.
# - dropbear, installed but disabled and without host keys: the station's
#   login, which factory-image.sh enables only for a product that gives a
#   station key, and which the station's last step removes.
# - Nothing of the build: no machine-id (made at first boot), no host keys,
#   no apt lists, no random seed, no resolv.conf or hostname of the builder.
# - busybox-static: wget and ip for field diagnosis and the image checks.
#
# Also fetched (not installed) into CACHEDIR/extra-debs: SoftHSM2 for arm64
# and what it needs beyond the base, the PKCS#11 token the image check
# installs to test the PKCS#11 package.
#
# Usage: rootfs.sh CACHEDIR     (CACHEDIR/{rootfs/,vmlinuz,initrd.img,kver,extra-debs/} on success)
# The caller keys CACHEDIR by a hash of this script, so any change rebuilds.
set -euo pipefail

out=${1:?usage: rootfs.sh CACHEDIR}
suite=${IMAGE_SUITE:-trixie}
mirror=${IMAGE_MIRROR:-http://deb.debian.org/debian}
security=${IMAGE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
[ "$(id -u)" = 0 ] || { echo "rootfs.sh: must run as root (mmdebstrap, device nodes in the root file system)" >&2; exit 1; }

# qemu-user runs the arm64 maintainer scripts; it needs binfmt_misc.
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
arch-test arm64 >/dev/null || { echo "rootfs.sh: this machine cannot run arm64 binaries; install qemu-user-static binfmt-support" >&2; exit 1; }

# The modules the initramfs loads to mount a virtio disk with ext4, and the
# virt machine's RTC (so the clock is right before systemd starts).
initrd_modules=virtio_pci,virtio_blk,ext4,rtc-pl031

# The slow part (mmdebstrap under emulation) survives a failure in the
# fast steps after it: $tmp is kept and reused until the whole build is done.
tmp=${out%/}.partial
mkdir -p "$tmp"
if [ ! -e "$tmp/rootfs.done" ]; then
rm -rf "$tmp/rootfs" "$tmp/extra-debs"
mkdir -p "$tmp/rootfs" "$tmp/extra-debs"
mmdebstrap --arch=arm64 --variant=minbase --mode=root --format=directory \
  --include=systemd,systemd-sysv,udev,kmod,dbus,tpm-udev,ca-certificates,e2fsprogs,systemd-timesyncd,systemd-resolved,dropbear,tiny-initramfs,linux-image-cloud-arm64,busybox-static \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --essential-hook="mkdir -p \"\$1/etc/tiny-initramfs\" && printf 'AUTO_MODULES=no\nINCLUDE_MODULES=\"$initrd_modules\"\n' >\"\$1/etc/tiny-initramfs/tiny-initramfs.conf\"" \
  --customize-hook="chroot \"\$1\" apt-get clean && chroot \"\$1\" apt-get -q -y --no-install-recommends install --download-only softhsm2 && mv \"\$1\"/var/cache/apt/archives/*.deb '$tmp/extra-debs/'" \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb' \
  "$suite" "$tmp/rootfs" \
  "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main"
touch "$tmp/rootfs.done"
fi

# The fast part: configuration, re-run as a whole after any failure.
r=$tmp/rootfs
kver=$(ls "$r/lib/modules" | head -n1)
[ -n "$kver" ] || { echo "rootfs.sh: no kernel installed" >&2; exit 1; }
dpkg-query --admindir="$r/var/lib/dpkg" -W -f='${Status}\n' "linux-image-$kver" | grep -q 'install ok installed' ||
  { echo "rootfs.sh: the kernel $kver is not an installed package" >&2; exit 1; }
if [ ! -s "$r/boot/initrd.img-$kver" ]; then
  chroot "$r" update-tirfs
fi

# Network: DHCP on every Ethernet port. network-online.target waits for
# one link at most 30 s: a gateway that boots without network must still
# start its services (gwagent retries on its own).
install -d "$r/etc/systemd/network" "$r/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$r/etc/systemd/network/80-gateway-dhcp.network" <<'EOF'
# Base image: every Ethernet port by DHCP. A product overrides this file
# (same name) or adds its own with a lower number, in its folder's rootfs/.
[Match]
Type=ether

[Network]
DHCP=yes
EOF
cat >"$r/etc/systemd/system/systemd-networkd-wait-online.service.d/gateway.conf" <<'EOF'
# Base image: one link is enough, and 30 s at most.
[Service]
ExecStart=
ExecStart=/usr/lib/systemd/systemd-networkd-wait-online --any --timeout=30
EOF
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$r/etc/resolv.conf"
for u in systemd-networkd.service systemd-networkd-wait-online.service systemd-resolved.service systemd-timesyncd.service; do
  chroot "$r" systemctl enable "$u" >/dev/null 2>&1 || { echo "rootfs.sh: systemctl enable $u failed" >&2; exit 1; }
done

# Security updates: deb822 sources for the release, its updates and its
# security archive (not the mirror the image was built from).
rm -f "$r/etc/apt/sources.list"
cat >"$r/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# The station's login: dropbear, key only (-s), host keys made on first
# use (-R), so every device has its own. Disabled here.
rm -f "$r"/etc/dropbear/dropbear_*_host_key "$r"/etc/dropbear/dropbear_*_host_key.pub
sed -i 's/^#\?DROPBEAR_EXTRA_ARGS=.*/DROPBEAR_EXTRA_ARGS="-R -s"/' "$r/etc/default/dropbear"
chroot "$r" systemctl disable dropbear.service >/dev/null 2>&1 || true
rm -f "$r"/etc/rc?.d/S*dropbear

# Root on the disk labelled gwroot (mkimage in common.sh).
echo 'LABEL=gwroot / ext4 rw,errors=remount-ro 0 1' >"$r/etc/fstab"

# Nothing of the build host or of this build.
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
rm -f "$r/etc/hostname"
echo localhost >"$r/etc/hostname"
chmod 0644 "$r/etc/hostname"
echo uninitialized >"$r/etc/machine-id"
rm -f "$r/var/lib/dbus/machine-id" "$r/var/lib/systemd/random-seed" "$r/var/lib/systemd/timesync/clock"
rm -rf "$r"/etc/ssh/ssh_host_* "$r"/root/.bash_history "$r"/tmp/* "$r"/var/tmp/*
find "$r/var/log" -type f -delete
find "$r/var/cache/debconf" -name '*-old' -delete

cp "$r/boot/vmlinuz-$kver" "$tmp/vmlinuz"
cp "$r/boot/initrd.img-$kver" "$tmp/initrd.img"
echo "$kver" >"$tmp/kver"
dpkg-query --admindir="$r/var/lib/dpkg" -W >"$tmp/manifest"

rm -rf "$out" "$tmp/rootfs.done"
mkdir -p "$(dirname "$out")"
mv "$tmp" "$out"
echo "rootfs.sh: $out ready (kernel $kver, $(wc -l <"$out/manifest") packages)"
