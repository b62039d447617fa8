#!/usr/bin/env bash
# Installs what gwagent's tests, demo and cross builds need on Debian:
# swtpm (a real software TPM), SoftHSM2 (a real PKCS#11 token), openssl (to
# check CSRs and chains), systemd and util-linux (unit checks, sysusers,
# tmpfiles, setpriv for the unprivileged-uid spool test), tinyproxy (a real
# HTTP CONNECT proxy; the -bin package has no system service) and the cross
# compilers for the cgo (PKCS#11) build; --sdkcheck adds what make sdkcheck
# runs Microsoft's SDKs with, --bench qemu-user for make bench's arm64 drain.
# It installs only what is missing, so it is cheap to call from every make run.
# Needs root (CI runs as root) or sudo.
set -euo pipefail

want=(swtpm swtpm-tools softhsm2 openssl systemd util-linux tinyproxy-bin)
if [ "${1:-}" = "--cross" ] || [ "${1:-}" = "--bench" ]; then
	want+=(gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross)
fi
# make bench: the arm64 drain runs the arm64 builds under qemu-user; its
# directories are on an ext4 file system it makes.
if [ "${1:-}" = "--bench" ]; then
	want+=(qemu-user-static e2fsprogs)
fi
# make deb / deb-check: lintian, Azure's roots from ca-certificates, a scratch
# root; the PKCS#11 packages are cgo builds: the C compilers, the arm64 C
# library, and dpkg-shlibdeps (dpkg-dev) for their Depends.
if [ "${1:-}" = "--deb" ]; then
	want+=(lintian ca-certificates mmdebstrap gcc libc6-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross dpkg-dev)
fi
# make image-check / factory-image(-check): an arm64 Debian system under qemu
# with swtpm. ipxe-qemu holds the virtio-net option ROM (efi-virtio.rom) that
# qemu loads for -device virtio-net-pci; it is only a Recommends of
# qemu-system-arm, which --no-install-recommends leaves out.
if [ "${1:-}" = "--image" ]; then
	want+=(mmdebstrap qemu-user-static binfmt-support arch-test qemu-system-arm ipxe-qemu qemu-utils swtpm swtpm-tools socat
		e2fsprogs cpio xz-utils zstd ca-certificates openssl)
fi

# make sdkcheck: Node.js for Microsoft's Node SDKs; Debian's Python with the
# dependencies of Microsoft's Python SDK (azure-iot-device 2.14.0), for when
# it runs from its source because the Python package index is out of reach.
if [ "${1:-}" = "--sdkcheck" ]; then
	want+=(python3 python3-paho-mqtt python3-requests python3-requests-unixsocket python3-urllib3
		python3-deprecation python3-janus python3-socks python3-typing-extensions)
	# A Node.js from elsewhere (nodesource) brings its own npm and
	# conflicts with Debian's.
	command -v node >/dev/null && command -v npm >/dev/null || want+=(nodejs npm)
fi

missing=()
for p in "${want[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
	echo "install-deps: missing ${missing[*]} and no apt-get here; install them with your package manager" >&2
	exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null || { echo "install-deps: need root to install ${missing[*]}" >&2; exit 1; }
	sudo=sudo
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
