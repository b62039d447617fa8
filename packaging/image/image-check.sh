#!/usr/bin/env bash
# make image-check: the arm64 packages on the arm64 base system under qemu
# (virt machine, cortex-a57, swtpm as tpm-tis-device) against azsim on this
# machine, checked under a real systemd by guest/check.sh, in three boots:
#   1. the previous release's package installed, configured, connected, then
#      upgraded to this one; a TPM that appears after the service started;
#      the spool group; a renewal; the X.509 factory flow and its telemetry;
#      the raw /dev/tpm0 closed to the service user; the PKCS#11 package with
#      its key in SoftHSM2; a hung agent restarted by the watchdog;
#      `gwagent check` as root and as the service user.
#   2. after a reboot: the same identity, a clean journal, no restart.
#   3. a network that is down at boot (the link is cut before the guest
#      starts) and comes up later.
# The host checks what azsim received. The previous release is built from
# the last v* tag before HEAD, or else the commit in packaging/previous-release.
#
# Network rule: the guest reaches nothing but azsim on the host's loopback:
# qemu's user network runs with restrict=on and guestfwd entries from
# 10.0.2.100 to azsim's 127.0.0.1 ports.
#
# Usage: packaging/image/image-check.sh DEBDIR      (root; make deb first)
set -euo pipefail
cd "$(dirname "$0")/../.."
. packaging/image/common.sh
debdir=${1:?usage: image-check.sh DEBDIR}
deb=$(ls "$debdir"/gwagent_*_arm64.deb | head -n1)
p11=$(ls "$debdir"/gwagent-pkcs11_*_arm64.deb | head -n1)
[ "$(id -u)" = 0 ] || { echo "image-check: must run as root (mmdebstrap, image ownership)" >&2; exit 1; }
t_start=$SECONDS
cache=$(rootfs_cache)
t_rootfs=$((SECONDS - t_start))

work=$(mktemp -d /var/tmp/gwagent-imagecheck.XXXXXX)
dest=${IMAGE_CHECK_OUT:-bin/image-check}
pids=()
cleanup() {
	stop_all "$dest"
	[ -d "$work/guest/out" ] && cp -r "$work/guest/out/." "$dest/"
	cp "$work"/console*.log* "$work"/azsim.log "$work"/telemetry.jsonl "$work"/previous.log "$work"/results "$dest/" 2>/dev/null || true
	[ -n "${KEEP:-}" ] || rm -rf "$work"
	echo "image-check: results and logs in $dest" >&2
}
trap cleanup EXIT
results=$work/results

# The previous release's arm64 package, built from its own tree.
prev=$(git describe --tags --abbrev=0 --match 'v[0-9]*' HEAD^ 2>/dev/null || sed -n 's/^\([0-9a-f]\{40\}\).*/\1/p' packaging/previous-release)
[ -n "$prev" ] || { echo "image-check: no previous release (no v* tag, nothing in packaging/previous-release)" >&2; exit 1; }
t0=$SECONDS
git clone -q --shared --no-checkout . "$work/previous"
git -C "$work/previous" checkout -q "$prev"
(cd "$work/previous" && ./packaging/deb.sh "$work/prevdeb" arm64) >"$work/previous.log" 2>&1 ||
	{ cat "$work/previous.log" >&2; echo "image-check: cannot build the previous release $prev" >&2; exit 1; }
prevdeb=$(ls "$work"/prevdeb/gwagent_*_arm64.deb)
t_prev=$((SECONDS - t0))
[ "$(dpkg-deb -f "$prevdeb" Version)" != "$(dpkg-deb -f "$deb" Version)" ] &&
	dpkg --compare-versions "$(dpkg-deb -f "$prevdeb" Version)" lt "$(dpkg-deb -f "$deb" Version)" ||
	{ echo "image-check: the previous release $(dpkg-deb -f "$prevdeb" Version) does not sort before $(dpkg-deb -f "$deb" Version)" >&2; exit 1; }

start_azsim "$work"

# The check disk: packages, settings, credentials, the script.
ck=$work/check
mkdir -p "$ck/previous" "$ck/extra"
cp "$deb" "$p11" packaging/image/guest/check.sh "$ck/"
cp "$prevdeb" "$ck/previous/"
cp "$cache"/extra-debs/*.deb "$ck/extra/"
cp "$bundle" "$ck/azsim-roots.pem"
for id in gw-image-sym gw-image-p11; do
	"$work/azsim" derive-key "$id" | sed -n 's/.*"deviceKey": *"\([^"]*\)".*/\1/p' >"$ck/$id.key"
	[ -s "$ck/$id.key" ] || { echo "image-check: azsim derive-key failed" >&2; exit 1; }
done
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
[telemetry]
interval = "10s"
spool_dir = "/var/lib/gwagent-x509/spool"
TOML
cat >"$ck/pkcs11.toml" <<TOML
# make image-check: the gwagent-pkcs11 package, operational key in SoftHSM2.
trust_bundle = "/etc/gwagent/azsim-roots.pem"
[identity]
id_scope = "$scope"
registration_id = "gw-image-p11"
dps_endpoint = "azsim.test:8883"
[onboarding]
kind = "symmetric_key"
symmetric_key_file = "/etc/gwagent/dps-key"
[operational]
key = "pkcs11:token=gw;object=operational?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/etc/gwagent/pkcs11-pin"
[telemetry]
interval = "30s"
TOML
mkimage "$ck" "$work/check.img" 128M gwcheck

# The system disk: the cached base plus the test-only unit and azsim's name.
t0=$SECONDS
root=$work/root
cp -a "$cache/rootfs" "$root"
install -m 0644 packaging/image/guest/gwagent-imagecheck.service "$root/etc/systemd/system/"
ln -sf /etc/systemd/system/gwagent-imagecheck.service "$root/etc/systemd/system/multi-user.target.wants/"
echo "10.0.2.100 azsim.test" >>"$root/etc/hosts"
echo gwagent-imagecheck >"$root/etc/hostname"
mkimage "$root" "$work/root.img" 2G gwroot
rm -rf "$root"
t_disk=$((SECONDS - t0))

# Three power cycles: the guest's `systemctl reboot` or poweroff ends qemu
# (-no-reboot); swtpm keeps its state in $work/tpm, like a TPM's NVRAM.
# Boot 3 starts with the link cut; the guest says on its console when it
# wants it back, and the host plugs it in through qemu's monitor.
monitor() { echo "$1" | socat - "UNIX-CONNECT:$work/monitor.sock" >/dev/null 2>&1; }
boot() {
	local n=$1 t0=$SECONDS q
	start_swtpm "$work/tpm"
	rm -f "$work/monitor.sock"
	qemu_virt "$cache/vmlinuz" "$cache/initrd.img" "$work/tpm" "$work/console$n.log" -S \
		-drive "if=none,id=root,file=$work/root.img,format=raw" -device virtio-blk-pci,drive=root \
		-drive "if=none,id=check,file=$work/check.img,format=raw" -device virtio-blk-pci,drive=check \
		-netdev "user,id=net0,restrict=on$(guestfwd_args)" -device virtio-net-pci,netdev=net0,romfile= \
		-monitor "unix:$work/monitor.sock,server,nowait" &
	q=$!
	pids+=("$q")
	local deadline=$((SECONDS + ${IMAGE_TIMEOUT:-1800}))
	for _ in $(seq 100); do [ -S "$work/monitor.sock" ] && break; sleep 0.1; done
	if [ "$n" = 3 ]; then
		monitor "set_link net0 off"
	fi
	monitor cont
	while kill -0 "$q" 2>/dev/null; do
		if [ "$n" = 3 ] && grep -q 'IMAGECHECK-LINK-UP' "$work/console$n.log" 2>/dev/null && [ ! -e "$work/link-up" ]; then
			monitor "set_link net0 on"
			touch "$work/link-up"
		fi
		if [ $SECONDS -gt $deadline ]; then
			echo "image-check: boot $n still running after ${IMAGE_TIMEOUT:-1800} s; stopping it" >&2
			kill "$q"
		fi
		sleep 1
	done
	wait "$q" || true
	kill "$swtpm_pid" 2>/dev/null || true
	wait "$swtpm_pid" 2>/dev/null || true
	echo "image-check: boot $n took $((SECONDS - t0)) s" >&2
	eval "t_boot$n=$((SECONDS - t0))"
}
boot 1
boot 2
boot 3

# Results, read back from the check disk without mounting it.
mkdir -p "$work/guest"
debugfs -R "rdump /out $work/guest" "$work/check.img" >/dev/null 2>&1 || true
out=$work/guest/out
mkdir -p "$out"
cp "$out/results" "$results" 2>/dev/null || : >"$results"
# What azsim saw.
received() { grep -q "$1" "$work/telemetry.jsonl" 2>/dev/null; }
received '"imagecheck":"spool"' && echo "PASS azsim-received-spool-message" >>"$results" || echo "FAIL azsim-received-spool-message" >>"$results"
received '"deviceId":"gw-image-x509"' && echo "PASS azsim-received-x509-identity-telemetry" >>"$results" ||
	echo "FAIL azsim-received-x509-identity-telemetry: nothing from gw-image-x509" >>"$results"
received '"deviceId":"gw-image-p11"' && echo "PASS azsim-received-pkcs11-identity-telemetry" >>"$results" ||
	echo "FAIL azsim-received-pkcs11-identity-telemetry: nothing from gw-image-p11" >>"$results"
if [ -s "$out/start2" ]; then
	start2=$(cat "$out/start2")
	first=$(grep '"deviceId":"gw-image-p11"' "$work/telemetry.jsonl" | sed -n 's/.*"receivedAt":"\([^"]*\)".*/\1/p' |
		while read -r at; do s=$(date -u -d "$at" +%s); [ "$s" -ge "$start2" ] && { echo "$s"; break; }; done)
	if [ -n "$first" ]; then
		echo "METRIC start-to-first-message-s $((first - start2))" >>"$results"
	else
		echo "FAIL no-telemetry-after-reboot" >>"$results"
	fi
fi
[ -e "$work/link-up" ] && echo "PASS host-plugged-the-link-in" >>"$results" || echo "FAIL the guest never asked for the link (console3.log)" >>"$results"
[ -e "$out/phase3.done" ] || echo "FAIL guest did not finish all three boots (console1.log, console2.log, console3.log, log)" >>"$results"
{
	echo "METRIC rootfs-cache-s $t_rootfs"
	echo "METRIC previous-release-build-s $t_prev"
	echo "METRIC disk-images-s $t_disk"
	echo "METRIC boot1-s ${t_boot1:-0}"
	echo "METRIC boot2-s ${t_boot2:-0}"
	echo "METRIC boot3-s ${t_boot3:-0}"
	echo "METRIC total-s $((SECONDS - t_start))"
} >>"$results"
echo "== image-check results" >&2
cat "$results" >&2
if grep -q '^FAIL' "$results"; then
	exit 1
fi
echo "image-check: ok" >&2
