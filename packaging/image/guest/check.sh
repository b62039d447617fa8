#!/bin/sh
# The image check inside the arm64 guest, run by gwagent-imagecheck.service
# from the check disk (/check). Two boots: the first installs the package,
# starts the service before the TPM driver is loaded, then checks
# provisioning, the spool group, renewal, the X.509 factory flow and
# `gwagent check`, and reboots; the second checks that the identity
# survived, measures start-to-first-message and RSS, and powers off.
# Results go to /check/out/results (PASS/FAIL/METRIC lines); the host reads
# them back with debugfs.
set -u
C=/check
O=$C/out
mkdir -p "$O"
exec >>"$O/log" 2>&1
log() { echo "$(date -u +%H:%M:%S) $*"; }
pass() { log "PASS $*"; echo "PASS $*" >>"$O/results"; }
fail() { log "FAIL $*"; echo "FAIL $*" >>"$O/results"; }
metric() { log "METRIC $*"; echo "METRIC $*" >>"$O/results"; }
# waitfor SECONDS COMMAND...: poll once a second until a wall-clock
# deadline (each gwagent call takes a while on the emulated CPU).
waitfor() {
	end=$(($(date +%s) + $1))
	shift
	while [ "$(date +%s)" -lt "$end" ]; do
		"$@" >/dev/null 2>&1 && return 0
		sleep 1
	done
	return 1
}
state() { gwagent status --config /etc/gwagent/gwagent.toml 2>/dev/null | sed -n 's/^state: *\([a-z-]*\).*/\1/p'; }
connected() { [ "$(state)" = connected ]; }
serial() { gwagent status --config /etc/gwagent/gwagent.toml 2>/dev/null | sed -n 's/^certificate: *serial \([0-9a-f]*\).*/\1/p'; }
deviceid() { gwagent status --config /etc/gwagent/gwagent.toml 2>/dev/null | sed -n 's/^device id: *//p'; }
security() {
	systemd-analyze security --no-pager gwagent.service >"$O/security-$1.txt" 2>&1
	metric "security-exposure-$1 $(sed -n 's/.*Overall exposure level for gwagent.service: *//p' "$O/security-$1.txt")"
}
rss() {
	pid=$(systemctl show -p MainPID --value gwagent.service)
	metric "rss-kib-$1 $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")"
}
check() {
	gwagent check --json >"$O/check-$1.json" 2>&1
	if grep -q '"ok": true' "$O/check-$1.json"; then pass "gwagent-check-$1"; else fail "gwagent-check-$1 (see check-$1.json)"; fi
}

if [ ! -e "$O/phase1.done" ]; then
	log "phase 1: $(uname -a)"
	[ ! -e /dev/tpmrm0 ] || fail "late-tpm: /dev/tpmrm0 exists before the driver was loaded"

	if dpkg -i "$C"/gwagent_*_arm64.deb; then pass install; else fail install; fi
	getent group tss >/dev/null && id -nG gwagent | grep -qw tss && pass "user-in-tss" || fail "user-in-tss"
	[ "$(systemctl is-enabled gwagent.service)" = enabled ] && pass "unit-enabled" || fail "unit-enabled: $(systemctl is-enabled gwagent.service)"
	[ "$(systemctl is-active gwagent.service)" != active ] && pass "not-started-unconfigured" || fail "not-started-unconfigured"

	# Per-product settings: config, trust bundle, credential. No rebuild.
	install -m 0640 -g gwagent "$C/gwagent.toml" /etc/gwagent/gwagent.toml
	install -m 0644 "$C/azsim-roots.pem" /etc/gwagent/azsim-roots.pem
	install -m 0600 -o gwagent -g gwagent "$C/dps-key" /etc/gwagent/dps-key

	# The TPM driver loads after the service started.
	systemctl start gwagent.service
	waitfor 60 sh -c 'gwagent status | grep -q key-store-unavailable' || log "no key-store-unavailable condition seen"
	log "state before the TPM: $(state)"
	t0=$(date +%s)
	modprobe tpm_tis
	if waitfor 300 connected; then
		pass "late-tpm-provisioned connected $(($(date +%s) - t0))s after modprobe tpm_tis"
	else
		fail "late-tpm-provisioned: state $(state)"
		journalctl -u gwagent --no-pager | tail -40
	fi
	ls -l /dev/tpmrm0 >"$O/tpm-node.txt" 2>&1

	# An application in the spool group drops a message.
	spool=$(awk '$1 == "d" && $2 ~ /spool/ {print $2}' /usr/lib/tmpfiles.d/gwagent.conf | head -n1)
	group=$(stat -c %G "$spool" 2>/dev/null)
	if [ -n "$group" ] && [ "$group" != gwagent ]; then
		useradd --system --no-create-home --groups "$group" imageapp
		runuser -u imageapp -- sh -c "printf '{\"imagecheck\":\"spool\"}' >$spool/.imagecheck.tmp && mv $spool/.imagecheck.tmp $spool/imagecheck.json" &&
			waitfor 120 sh -c "[ ! -e $spool/imagecheck.json ]" && pass "spool-group $group" || fail "spool-group: $spool/imagecheck.json not taken (group $group)"
	else
		fail "spool-group: $spool has group '$group'; no group for applications"
	fi

	# Renewal while running.
	s1=$(serial)
	gwagent renew
	if waitfor 300 sh -c "s=\$(gwagent status | sed -n 's/^certificate: *serial \([0-9a-f]*\).*/\1/p'); [ -n \"\$s\" ] && [ \"\$s\" != $s1 ]"; then
		pass "renewal $s1 -> $(serial)"
	else
		fail "renewal: serial still $(serial)"
	fi

	# The X.509 factory flow with the onboarding key in the TPM: the device
	# makes the key and CSR, the station (azsim's factory CA here) signs it,
	# the device installs the chain and provisions.
	install -d -m 0700 -o gwagent -g gwagent /var/lib/gwagent-x509
	as() { runuser -u gwagent -- "$@"; }
	if as gwagent onboard csr --config "$C/x509.toml" --out /var/lib/gwagent-x509/onboarding.csr &&
		busybox wget -q -O /tmp/chain.pem --post-file=/var/lib/gwagent-x509/onboarding.csr http://azsim.test:8480/factory/sign &&
		as gwagent onboard install --config "$C/x509.toml" --chain /tmp/chain.pem &&
		as gwagent provision --config "$C/x509.toml"; then
		pass "x509-factory-flow"
	else
		fail "x509-factory-flow"
	fi

	check 1
	security 1
	rss 1
	deviceid >"$O/device1"
	serial >"$O/serial1"
	rm -f /etc/modprobe.d/gwagent-imagecheck.conf
	touch "$O/phase1.done"
	sync
	systemctl reboot
	exit 0
fi

log "phase 2: after the reboot"
start=$(systemctl show -p ExecMainStartTimestamp --value gwagent.service)
date -u -d "$start" +%s >"$O/start2"
if waitfor 300 connected; then pass "connected-after-reboot"; else fail "connected-after-reboot: $(state)"; fi
[ "$(deviceid)" = "$(cat "$O/device1")" ] && [ "$(serial)" = "$(cat "$O/serial1")" ] &&
	pass "reboot-keeps-identity $(deviceid) serial $(serial)" || fail "reboot-keeps-identity: $(deviceid) $(serial), was $(cat "$O/device1") $(cat "$O/serial1")"
# An upgrade (here: the same version again) under a running systemd
# restarts the running agent on the new files and keeps its identity.
pid1=$(systemctl show -p MainPID --value gwagent.service)
if dpkg -i "$C"/gwagent_*_arm64.deb && waitfor 120 sh -c "[ \"\$(systemctl show -p MainPID --value gwagent.service)\" != $pid1 ]" &&
	waitfor 300 connected && [ "$(serial)" = "$(cat "$O/serial1")" ]; then
	pass "upgrade-restarts-running-service"
else
	fail "upgrade-restarts-running-service: pid $(systemctl show -p MainPID --value gwagent.service) (was $pid1), $(state), serial $(serial)"
fi
sleep 20
rss 2
check 2
security 2
journalctl -b -1 -u gwagent --no-pager >"$O/journal-boot1.txt" 2>&1
journalctl -b -u gwagent --no-pager >"$O/journal-boot2.txt" 2>&1
metric "gwagent-started-after-boot-s $(($(systemctl show -p ExecMainStartTimestampMonotonic --value gwagent.service) / 1000000))"
touch "$O/phase2.done"
sync
systemctl poweroff
