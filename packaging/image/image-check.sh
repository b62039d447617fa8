#!/usr/bin/env bash
# make image-check: boots the arm64 package on a Debian arm64 system under
# qemu (virt machine, cortex-a57, swtpm as tpm-tis-device) against azsim on
# this machine, and checks it under a real systemd (see guest/check.sh).
#
# Network rule: the guest reaches nothing but azsim on the host's loopback.
# qemu's user network runs with restrict=on (no route out) and guestfwd
# entries that connect 10.0.2.100:{8883,8884,8480} to azsim's loopback ports.
#
# Usage: packaging/image/image-check.sh DEBDIR      (root; needs make deb first)
set -euo pipefail
cd "$(dirname "$0")/../.."
. packaging/image/common.sh
debdir=${1:?usage: image-check.sh DEBDIR}
deb=$(ls "$debdir"/gwagent_*_arm64.deb | head -n1)
[ "$(id -u)" = 0 ] || { echo "image-check: must run as root (mmdebstrap, image ownership)" >&2; exit 1; }
t_start=$SECONDS
cache=$(rootfs_cache)
t_rootfs=$((SECONDS - t_start))

work=$(mktemp -d /var/tmp/gwagent-imagecheck.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	[ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# azsim on loopback ports; the guest sees them as azsim.test:8883/8884/8480.
free_port() {
	local p
	while :; do
		p=$((30000 + RANDOM % 30000))
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
	done
}
dps=$(free_port) hub=$(free_port) admin=$(free_port)
go build -o "$work/azsim" ./cmd/azsim
"$work/azsim" serve --state "$work/azsim-state" --dps-addr "127.0.0.1:$dps" --hub-addr "127.0.0.1:$hub" \
	--admin-addr "127.0.0.1:$admin" --hub-hostname azsim.test:8884 --server-names azsim.test \
	--telemetry-log "$work/telemetry.jsonl" --info-file "$work/azsim.json" --retry-after 1 >"$work/azsim.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/azsim.json" ] && break; sleep 0.1; done
[ -s "$work/azsim.json" ] || { cat "$work/azsim.log" >&2; exit 1; }
scope=$(sed -n 's/.*"idScope": *"\([^"]*\)".*/\1/p' "$work/azsim.json")
bundle=$(sed -n 's/.*"trustBundle": *"\([^"]*\)".*/\1/p' "$work/azsim.json")

# The check disk: package, settings, credential, the script.
ck=$work/check
mkdir -p "$ck"
cp "$deb" packaging/image/guest/check.sh "$ck/"
cp "$bundle" "$ck/azsim-roots.pem"
"$work/azsim" derive-key --admin "http://127.0.0.1:$admin" gw-image-sym | sed -n 's/.*"deviceKey": *"\([^"]*\)".*/\1/p' >"$ck/dps-key"
[ -s "$ck/dps-key" ] || { echo "image-check: azsim derive-key failed" >&2; exit 1; }
cat >"$ck/gwagent.toml" <<TOML
# make image-check: symmetric-key onboarding, operational key in the TPM.
trust_bundle = "/etc/gwagent/azsim-roots.pem"
[identity]
id_scope = "$scope"
registration_id = "gw-image-sym"
dps_endpoint = "azsim.test:8883"
[onboarding]
kind = "symmetric_key"
symmetric_key_file = "/etc/gwagent/dps-key"
[operational]
key = "tpm2:device=/dev/tpmrm0;blob=/var/lib/gwagent/operational.tpmkey"
[telemetry]
interval = "30s"
TOML
cat >"$ck/x509.toml" <<TOML
# make image-check: the X.509 factory flow, onboarding key in the TPM.
state_dir = "/var/lib/gwagent-x509"
trust_bundle = "/etc/gwagent/azsim-roots.pem"
[identity]
id_scope = "$scope"
registration_id = "gw-image-x509"
dps_endpoint = "azsim.test:8883"
[onboarding]
kind = "x509"
key = "tpm2:device=/dev/tpmrm0;handle=0x81000101"
chain = "/var/lib/gwagent-x509/onboarding-chain.pem"
[operational]
key = "tpm2:device=/dev/tpmrm0;blob=/var/lib/gwagent-x509/operational.tpmkey"
TOML
mkimage "$ck" "$work/check.img" 64M gwcheck

# The system disk: the cached root file system plus the test-only units,
# azsim's name, and tpm_tis held back so the TPM appears after gwagent.
t0=$SECONDS
root=$work/root
cp -a "$cache/rootfs" "$root"
for u in gwagent-imagecheck.service imagecheck-net.service; do
	install -m 0644 "packaging/image/guest/$u" "$root/etc/systemd/system/$u"
	ln -sf "/etc/systemd/system/$u" "$root/etc/systemd/system/multi-user.target.wants/$u"
done
mkdir -p "$root/etc/systemd/system/network-online.target.wants"
ln -sf /etc/systemd/system/imagecheck-net.service "$root/etc/systemd/system/network-online.target.wants/"
echo "10.0.2.100 azsim.test" >>"$root/etc/hosts"
echo gwagent-imagecheck >"$root/etc/hostname"
echo "blacklist tpm_tis" >"$root/etc/modprobe.d/gwagent-imagecheck.conf"
mkimage "$root" "$work/root.img" 2G gwroot
rm -rf "$root"
t_disk=$((SECONDS - t0))

# Two power cycles: the guest's `systemctl reboot` ends qemu (-no-reboot);
# swtpm keeps its state in $work/tpm across them, like a TPM's NVRAM.
fwd() { echo "guestfwd=tcp:10.0.2.100:$1-cmd:socat STDIO TCP4:127.0.0.1:$2"; }
boot() {
	local n=$1 sw t0=$SECONDS
	mkdir -p "$work/tpm"
	rm -f "$work/tpm/swtpm.sock"
	swtpm socket --tpm2 --tpmstate "dir=$work/tpm" --ctrl "type=unixio,path=$work/tpm/swtpm.sock" \
		--log "file=$work/swtpm.log" &
	sw=$!
	pids+=("$sw")
	for _ in $(seq 100); do [ -S "$work/tpm/swtpm.sock" ] && break; sleep 0.1; done
	timeout "${IMAGE_TIMEOUT:-1200}" qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 2 -m 1024 -nographic -no-reboot \
		-kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" \
		-append "root=/dev/vda rw console=ttyAMA0 panic=-1" \
		-drive "if=none,id=root,file=$work/root.img,format=raw" -device virtio-blk-pci,drive=root \
		-drive "if=none,id=check,file=$work/check.img,format=raw" -device virtio-blk-pci,drive=check \
		-netdev "user,id=net0,restrict=on,$(fwd 8883 "$dps"),$(fwd 8884 "$hub"),$(fwd 8480 "$admin")" \
		-device virtio-net-pci,netdev=net0 \
		-chardev "socket,id=chrtpm,path=$work/tpm/swtpm.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm \
		-device tpm-tis-device,tpmdev=tpm0 \
		-serial "file:$work/console$n.log" -monitor none </dev/null >/dev/null 2>"$work/qemu$n.log" || true
	kill "$sw" 2>/dev/null || true
	wait "$sw" 2>/dev/null || true
	echo "image-check: boot $n took $((SECONDS - t0)) s" >&2
	eval "t_boot$n=$((SECONDS - t0))"
}
boot 1
boot 2

# Results, read back from the check disk without mounting it.
mkdir -p "$work/guest"
debugfs -R "rdump /out $work/guest" "$work/check.img" >/dev/null 2>&1 || true
out=$work/guest/out
mkdir -p "$out"
results=$out/results
touch "$results"
# What azsim saw: the spool message and telemetry after the reboot.
if grep -q '"imagecheck":"spool"' "$work/telemetry.jsonl" 2>/dev/null; then
	echo "PASS azsim-received-spool-message" >>"$results"
else
	echo "FAIL azsim-received-spool-message" >>"$results"
fi
if [ -s "$out/start2" ]; then
	start2=$(cat "$out/start2")
	first=$(grep '"deviceId":"gw-image-sym"' "$work/telemetry.jsonl" | sed -n 's/.*"receivedAt":"\([^"]*\)".*/\1/p' |
		while read -r at; do s=$(date -u -d "$at" +%s); [ "$s" -ge "$start2" ] && { echo "$s"; break; }; done)
	if [ -n "$first" ]; then
		echo "METRIC start-to-first-message-s $((first - start2))" >>"$results"
	else
		echo "FAIL no-telemetry-after-reboot" >>"$results"
	fi
fi
[ -e "$out/phase2.done" ] || echo "FAIL guest did not finish both boots (console: $work/console1.log, console2.log)" >>"$results"
{
	echo "METRIC rootfs-cache-s $t_rootfs"
	echo "METRIC disk-images-s $t_disk"
	echo "METRIC boot1-s ${t_boot1:-0}"
	echo "METRIC boot2-s ${t_boot2:-0}"
	echo "METRIC total-s $((SECONDS - t_start))"
} >>"$results"
echo "== image-check results" >&2
cat "$results" >&2
dest=${IMAGE_CHECK_OUT:-bin/image-check}
rm -rf "$dest"
mkdir -p "$dest"
cp -r "$out"/. "$work"/console*.log "$work"/azsim.log "$work"/telemetry.jsonl "$dest/" 2>/dev/null || true
echo "image-check: logs in $dest" >&2
if grep -q '^FAIL' "$results"; then
	exit 1
fi
echo "image-check: ok" >&2
