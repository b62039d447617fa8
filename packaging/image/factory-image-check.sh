#!/usr/bin/env bash
# make factory-image-check: the factory flow end to end, as a manufacturer
# runs it. Builds the factory image (factory-image.sh, the command of
# make factory-image) for a product made from packaging/image/product-example/
# pointed at azsim, boots it under qemu with swtpm, runs the station flow
# of the README over the station's SSH login (the README's block itself,
# taken from README.md, with azsim factory-sign as the factory CA), and then,
# as in the field: the gateway boots, provisions through DPS, sends
# telemetry; its power is cut; it boots again and sends telemetry with the
# same identity, without registering again. Also: the image holds nothing of
# the build host, and the station login is gone after the station's last step.
#
# Network rule: the guest reaches nothing but azsim on the host's loopback
# (qemu's user network with restrict=on; guestfwd to 127.0.0.1 ports); the
# host reaches the guest's SSH through a hostfwd bound to 127.0.0.1.
#
# Usage: packaging/image/factory-image-check.sh DEBDIR      (root; make deb first)
set -euo pipefail
cd "$(dirname "$0")/../.."
. packaging/image/common.sh
debdir=${1:?usage: factory-image-check.sh DEBDIR}
[ "$(id -u)" = 0 ] || { echo "factory-image-check: must run as root" >&2; exit 1; }
t_start=$SECONDS
cache=$(rootfs_cache)
t_rootfs=$((SECONDS - t_start))

work=$(mktemp -d /var/tmp/gwagent-factorycheck.XXXXXX)
dest=${IMAGE_CHECK_OUT:-bin/factory-image-check}
results=$work/results
: >"$results"
pids=()
cleanup() {
	stop_all "$dest"
	cp "$results" "$work"/*.log "$work"/*.qemu "$work"/station.txt "$work"/telemetry.jsonl "$work"/check-*.txt "$work"/*.json "$dest/" 2>/dev/null || true
	[ -n "${KEEP:-}" ] || rm -rf "$work"
	echo "factory-image-check: results and logs in $dest" >&2
}
trap cleanup EXIT
pass() { echo "PASS $*" | tee -a "$results" >&2; }
fail() { echo "FAIL $*" | tee -a "$results" >&2; }
metric() { echo "METRIC $*" | tee -a "$results" >&2; }

start_azsim "$work"

# The product: the example, pointed at azsim, with the station's key, and
# azsim's name for the guest (in the product's rootfs/, as a product would
# add its own files).
product=$work/product
cp -a packaging/image/product-example/. "$product/"
sed -i -e "s|^id_scope = .*|id_scope = \"$scope\"|" -e 's|^dps_endpoint = .*|dps_endpoint = "azsim.test:8883"|' \
	-e 's|^trust_bundle = .*|trust_bundle = "/etc/gwagent/azsim-roots.pem"|' "$product/gwagent.toml"
cp "$bundle" "$product/azsim-roots.pem"
ssh-keygen -q -t ed25519 -N '' -C factory-station -f "$work/station_key"
cp "$work/station_key.pub" "$product/station.pub"
mkdir -p "$product/rootfs/etc"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n10.0.2.100\tazsim.test\n' "$(cat "$product/hostname" 2>/dev/null || echo gateway)" >"$product/rootfs/etc/hosts"

t0=$SECONDS
if ./packaging/image/factory-image.sh "$debdir" "$product" "$work/factory" 2>"$work/factory-image.log"; then
	pass "factory-image-built (no build-host files, kernel a package, security updates source)"
else
	cat "$work/factory-image.log" >&2
	fail "factory-image-built"
	exit 1
fi
metric "factory-image-s $((SECONDS - t0))"
img=$work/factory/gwagent-factory-arm64.img

ssh_port=$(free_port)
net="user,id=net0,restrict=on$(guestfwd_args),hostfwd=tcp:127.0.0.1:$ssh_port-:22"
qemu_pid=
boot() { # boot N: power on (the swtpm's NVRAM persists across boots)
	start_swtpm "$work/tpm"
	qemu_virt "$work/factory/vmlinuz" "$work/factory/initrd.img" "$work/tpm" "$work/console$1.log" \
		-drive "if=none,id=root,file=$img,format=raw" -device virtio-blk-pci,drive=root \
		-netdev "$net" -device virtio-net-pci,netdev=net0,romfile= -monitor none &
	qemu_pid=$!
	pids+=("$qemu_pid")
	boot_at=$(date +%s)
}
power_off() { # power_off: wait for the guest to end qemu, or cut the power after $1 s
	local i
	for i in $(seq "${1:-0}"); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 1; done
	kill "$qemu_pid" 2>/dev/null || true
	wait "$qemu_pid" 2>/dev/null || true
	kill "$swtpm_pid" 2>/dev/null || true
	wait "$swtpm_pid" 2>/dev/null || true
}
telemetry_since() { # telemetry_since EPOCH: whether gw-0042 sent a message since then
	grep '"deviceId":"gw-0042"' "$work/telemetry.jsonl" 2>/dev/null | sed -n 's/.*"receivedAt":"\([^"]*\)".*/\1/p' |
		while read -r at; do [ "$(date -u -d "$at" +%s)" -ge "$1" ] && echo x; done | grep -q x
}
registration() { # registration FIELD: gw-0042's registrations count or certificateSerial at DPS
	"$work/azsim" registrations 2>/dev/null | awk -v f="\"$1\":" '/"registrationId": "gw-0042"/ {on=1} on && index($0, f) {gsub(/[^0-9a-fA-F]/, "", $2); print $2; exit}'
}
wait_for() { # wait_for SECONDS COMMAND...
	local end=$((SECONDS + $1))
	shift
	while [ $SECONDS -lt $end ]; do "$@" && return 0; sleep 2; done
	return 1
}
export STATION_SSH="-p $ssh_port -i $work/station_key -o UserKnownHostsFile=$work/known_hosts -o StrictHostKeyChecking=accept-new -o ConnectTimeout=10 -o BatchMode=yes -o LogLevel=ERROR"
export GW=127.0.0.1
ssh_ok() { ssh $STATION_SSH root@$GW true 2>/dev/null; }

# 1. At the station: first boot, the station logs in and runs its block.
t0=$SECONDS
boot 1
if wait_for 600 ssh_ok; then
	pass "station-login (ssh with the product's station key)"
	metric "power-on-to-station-login-s $((SECONDS - t0))"
else
	fail "station-login: no ssh within 600 s (console: console1.log)"
	exit 1
fi
mid=$(ssh $STATION_SSH root@$GW cat /etc/machine-id)
[ -n "$mid" ] && [ "$mid" != uninitialized ] && pass "machine-id-made-at-first-boot $mid" || fail "machine-id-made-at-first-boot: '$mid'"
ssh $STATION_SSH root@$GW 'networkctl status --no-pager; timedatectl; systemctl --failed --no-legend' >"$work/first-boot.log" 2>&1 || true

# The README's station block, as written there.
awk '/<!-- the station block: make factory-image-check runs it -->/ {on=1; next} on && /^ *```sh/ {code=1; next} code && /^ *```/ {exit} code' README.md >"$work/station.sh"
[ -s "$work/station.sh" ] || { fail "README.md has no station block"; exit 1; }
t0=$SECONDS
(
	cd "$work"
	factory_sign() { "$work/azsim" factory-sign; }
	set -e
	. "$work/station.sh"
) >"$work/station.txt" 2>&1 && station_rc=0 || station_rc=$?
metric "station-flow-s $((SECONDS - t0))"
if [ "$station_rc" = 0 ] && [ -s "$work/check-gw-0042.txt" ]; then
	pass "station-flow (README block, exit 0)"
else
	fail "station-flow: exit $station_rc (station.txt)"
fi
grep -Eq '^ +ok +onboarding ' "$work/check-gw-0042.txt" && pass "station-check-onboarding-ok" || fail "station-check-onboarding-ok (check-gw-0042.txt)"
if grep -q 'stopping gwagent.service' "$work/station.txt" && grep -q 'started gwagent.service again' "$work/station.txt"; then
	pass "station-on-the-enabled-service (stopped and started again)"
else
	fail "station-on-the-enabled-service (station.txt)"
fi
power_off 300
kill -0 "$qemu_pid" 2>/dev/null && fail "gwagent-station-done did not power off" || true
# A gateway that reached DPS from the station has provisioned already;
# what happens in the field is counted from here.
echo "after the station: registrations $(registration registrations), serial $(registration certificateSerial)" >>"$work/station.txt"

# 2. In the field: first boot, provisioning (if not done), telemetry.
boot 2
field=$boot_at
if wait_for 600 telemetry_since "$field"; then
	pass "field-telemetry from gw-0042"
	metric "power-on-to-first-telemetry-s $(($(date +%s) - field))"
else
	fail "field-telemetry: nothing from gw-0042 within 600 s (console2.log)"
fi
if ssh_ok; then fail "station-login-removed: ssh still works"; else pass "station-login-removed"; fi
serial=$(registration certificateSerial)
regs=$(registration registrations)
sleep 10
power_off 0 # a power cut
pass "power-cut"

# 3. Again after the power cut: the same identity, no new registration.
boot 3
again=$boot_at
if wait_for 600 telemetry_since "$again"; then
	pass "telemetry-after-power-cut"
	metric "power-on-to-first-telemetry-after-cut-s $(($(date +%s) - again))"
else
	fail "telemetry-after-power-cut (console3.log)"
fi
if [ -n "$serial" ] && [ "$(registration certificateSerial)" = "$serial" ] && [ "$(registration registrations)" = "$regs" ]; then
	pass "same-identity-after-power-cut (serial $serial, $regs registration(s))"
else
	fail "same-identity-after-power-cut: serial $serial -> $(registration certificateSerial), registrations $regs -> $(registration registrations)"
fi
power_off 0
metric "rootfs-cache-s $t_rootfs"
metric "total-s $((SECONDS - t_start))"
echo "== factory-image-check results" >&2
cat "$results" >&2
if grep -q '^FAIL' "$results"; then
	exit 1
fi
echo "factory-image-check: ok" >&2
