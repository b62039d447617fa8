#!/bin/sh
# The image check inside the arm64 guest, run by gwagent-imagecheck.service
# from the check disk (/check) at each of three boots (see image-check.sh).
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
st() { gwagent status --config "${CFG:-/etc/gwagent/gwagent.toml}" 2>/dev/null; }
state() { st | sed -n 's/^state: *\([a-z-]*\).*/\1/p'; }
connected() { [ "$(state)" = connected ]; }
serial() { st | sed -n 's/^certificate: *serial \([0-9a-f]*\).*/\1/p'; }
deviceid() { st | sed -n 's/^device id: *//p'; }
mainpid() { systemctl show -p MainPID --value gwagent.service; }
nrestarts() { systemctl show -p NRestarts --value gwagent.service; }
raised() { gwagent status 2>/dev/null | grep -q "$1"; }
security() {
	systemd-analyze security --no-pager gwagent.service >"$O/security-$1.txt" 2>&1
	metric "security-exposure-$1 $(sed -n 's/.*Overall exposure level for gwagent.service: *//p' "$O/security-$1.txt")"
}
rss() { metric "rss-kib-$1 $(awk '/^VmRSS:/ {print $2}' "/proc/$(mainpid)/status")"; }
check() { # check NAME [USER]: gwagent check passes, as root or as USER
	if [ -n "${2:-}" ]; then
		runuser -u "$2" -- gwagent check --json >"$O/check-$1.json" 2>&1
	else
		gwagent check --json >"$O/check-$1.json" 2>&1
	fi
	if grep -q '"ok": true' "$O/check-$1.json"; then pass "gwagent-check-$1"; else fail "gwagent-check-$1 (see check-$1.json)"; fi
}
# clean_journal NAME: no warning or worse from the agent (its log lines say
# level=WARN or level=ERROR; journald files them all at the same priority)
# or from systemd about the unit in this boot, and no automatic restart.
clean_journal() {
	{
		journalctl -b -u gwagent --no-pager -o cat | grep -E 'level=(WARN|ERROR)'
		journalctl -b -u gwagent --no-pager -p warning -o cat
	} >"$O/warnings-$1.txt" 2>&1
	if [ ! -s "$O/warnings-$1.txt" ] && [ "$(nrestarts)" = 0 ]; then
		pass "clean-journal-$1 (no warning, NRestarts=0)"
	else
		fail "clean-journal-$1: NRestarts=$(nrestarts), $(wc -l <"$O/warnings-$1.txt") warning line(s) (warnings-$1.txt)"
	fi
}
configure() { # configure TOML KEYFILE: the service's settings and credential
	install -m 0640 -g gwagent "$C/$1" /etc/gwagent/gwagent.toml
	install -m 0644 "$C/azsim-roots.pem" /etc/gwagent/azsim-roots.pem
	install -m 0600 -o gwagent -g gwagent "$C/$2" /etc/gwagent/dps-key
}

if [ ! -e "$O/phase1.done" ]; then
	log "phase 1: $(uname -a)"

	# The previous release, configured and connected, then upgraded.
	if dpkg -i "$C"/previous/gwagent_*_arm64.deb; then pass "install-previous-release $(dpkg-query -W -f='${Version}' gwagent)"; else fail install-previous-release; fi
	[ "$(systemctl is-enabled gwagent.service)" = enabled ] && pass "unit-enabled" || fail "unit-enabled: $(systemctl is-enabled gwagent.service)"
	[ "$(systemctl is-active gwagent.service)" != active ] && pass "not-started-unconfigured" || fail "not-started-unconfigured"
	configure gwagent.toml gw-image-sym.key
	systemctl start gwagent.service
	if waitfor 300 connected; then pass "previous-release-connected"; else fail "previous-release-connected: $(state)"; fi
	s0=$(serial) d0=$(deviceid) pid0=$(mainpid)
	if dpkg -i "$C"/gwagent_*_arm64.deb && waitfor 120 sh -c "[ \"\$(systemctl show -p MainPID --value gwagent.service)\" != $pid0 ]" &&
		waitfor 300 connected && [ "$(serial)" = "$s0" ] && [ "$(deviceid)" = "$d0" ]; then
		pass "upgrade-from-previous-release to $(dpkg-query -W -f='${Version}' gwagent), restarted, same identity $d0 serial $s0"
	else
		fail "upgrade-from-previous-release: pid $(mainpid) (was $pid0), $(state), serial $(serial) (was $s0)"
	fi
	getent group tss >/dev/null && id -nG gwagent | grep -qw tss && pass "user-in-tss" || fail "user-in-tss"

	# A TPM that appears after the service started: provisioning (fresh
	# state), and the condition cleared once the TPM works, not later.
	systemctl stop gwagent.service
	find /var/lib/gwagent -mindepth 1 -delete
	if modprobe -r tpm_tis && [ ! -e /dev/tpmrm0 ]; then
		systemctl start gwagent.service
		waitfor 120 raised key-store-unavailable || log "no key-store-unavailable condition seen"
		log "state before the TPM: $(state)"
		t0=$(date +%s)
		modprobe tpm_tis
		cleared=
		while [ $(($(date +%s) - t0)) -lt 300 ]; do
			st >"$O/late-tpm-status.txt"
			if [ -z "$cleared" ] && ! grep -q key-store-unavailable "$O/late-tpm-status.txt"; then cleared=$(($(date +%s) - t0)); fi
			grep -q '^state: *connected' "$O/late-tpm-status.txt" && break
			sleep 1
		done
		connected_s=$(($(date +%s) - t0))
		metric "late-tpm-condition-cleared-s ${cleared:-never}"
		if grep -q '^state: *connected' "$O/late-tpm-status.txt" && [ -n "$cleared" ] && ! raised key-store-unavailable; then
			pass "late-tpm-provisioned connected ${connected_s}s after modprobe tpm_tis, condition cleared after ${cleared}s"
		else
			fail "late-tpm-provisioned: $(state), condition cleared after ${cleared:-never}s (late-tpm-status.txt)"
			journalctl -u gwagent --no-pager | tail -40
		fi
	else
		fail "late-tpm: cannot unload tpm_tis"
		modprobe tpm_tis
		systemctl start gwagent.service
	fi
	ls -l /dev/tpm0 /dev/tpmrm0 >"$O/tpm-nodes.txt" 2>&1

	# The raw TPM (no resource manager) is closed to the service user, also
	# inside the service's cgroup, whose device policy allows char-tpm.
	cg=/sys/fs/cgroup/system.slice/gwagent.service
	out=$(sh -c "echo \$\$ >$cg/cgroup.procs && exec setpriv --reuid=gwagent --regid=gwagent --init-groups sh -c 'exec 3<>/dev/tpmrm0 && echo rm-ok; exec 4<>/dev/tpm0 && echo raw-ok'" 2>&1)
	log "as gwagent in $cg: $out"
	case $out in
	*rm-ok*raw-ok*) fail "raw-tpm-closed: the service user opened /dev/tpm0" ;;
	*rm-ok*) pass "raw-tpm-closed (/dev/tpmrm0 opens, /dev/tpm0 does not, as gwagent in the service's cgroup)" ;;
	*) fail "raw-tpm-closed: the service user cannot open /dev/tpmrm0 either: $out" ;;
	esac

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

	# The X.509 factory flow with the onboarding key in the TPM, as the
	# service user, then that identity's telemetry (the host checks azsim).
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
	as gwagent run --config "$C/x509.toml" >"$O/x509-run.log" 2>&1 &
	x509=$!
	if CFG=$C/x509.toml waitfor 120 connected; then
		sleep 15
		pass "x509-identity-connected"
	else
		fail "x509-identity-connected: $(CFG=$C/x509.toml state) (x509-run.log)"
	fi
	kill "$x509"
	wait "$x509"

	check 1
	check 1-as-service-user gwagent

	# The PKCS#11 build replaces the static one under the running service,
	# which then provisions with its operational key in SoftHSM2.
	dpkg -i "$C"/extra/*.deb >"$O/softhsm-install.log" 2>&1 || fail "softhsm2 install (softhsm-install.log)"
	pid0=$(mainpid)
	if dpkg -i "$C"/gwagent-pkcs11_*_arm64.deb && gwagent version | grep -q 'pkcs11: yes' &&
		waitfor 120 sh -c "[ \"\$(systemctl show -p MainPID --value gwagent.service)\" != $pid0 ]" && waitfor 300 connected; then
		pass "switch-to-pkcs11-package: restarted on the new build, connected"
	else
		fail "switch-to-pkcs11-package: $(gwagent version | tail -1), pid $(mainpid) (was $pid0), $(state)"
	fi
	systemctl stop gwagent.service
	find /var/lib/gwagent -mindepth 1 -delete
	install -d -m 0700 -o gwagent -g gwagent /var/lib/gwagent/softhsm /var/lib/gwagent/softhsm/tokens
	# SoftHSM2's own config (root:softhsm 0640) names the token directory,
	# so the service, gwagent check and softhsm2-util all find the token
	# (README); the service user reads it as a member of group softhsm.
	usermod -aG softhsm gwagent
	sed -i 's|^directories.tokendir = .*|directories.tokendir = /var/lib/gwagent/softhsm/tokens|' /etc/softhsm/softhsm2.conf
	printf '1234\n' >/etc/gwagent/pkcs11-pin
	chown gwagent:gwagent /etc/gwagent/pkcs11-pin
	chmod 0600 /etc/gwagent/pkcs11-pin
	runuser -u gwagent -- softhsm2-util --init-token --free --label gw --so-pin 5678 --pin 1234 >"$O/softhsm-init.log" 2>&1 ||
		fail "softhsm2-util --init-token (softhsm-init.log)"
	configure pkcs11.toml gw-image-p11.key
	systemctl start gwagent.service
	if waitfor 300 connected && st | grep -q 'pkcs11:'; then
		pass "pkcs11-package-provisioned with its key in SoftHSM2: $(deviceid) serial $(serial)"
	else
		fail "pkcs11-package-provisioned: $(state)"
		st
		journalctl -u gwagent --no-pager | tail -40
	fi
	ls -lR /var/lib/gwagent/softhsm >"$O/softhsm-tokens.txt" 2>&1

	# A hung agent: systemd's watchdog restarts it.
	n0=$(nrestarts) pid0=$(mainpid)
	kill -STOP "$pid0"
	t0=$(date +%s)
	if waitfor 400 sh -c "[ \"\$(systemctl show -p NRestarts --value gwagent.service)\" -gt $n0 ]" && waitfor 300 connected; then
		pass "watchdog-restarted-hung-agent after $(($(date +%s) - t0))s, NRestarts $n0 -> $(nrestarts)"
	else
		fail "watchdog-restarted-hung-agent: NRestarts $(nrestarts), pid $(mainpid) (was $pid0), $(state)"
	fi
	journalctl -u gwagent --no-pager | grep -i watchdog >"$O/watchdog.txt" 2>&1 || true

	security 1
	rss 1
	deviceid >"$O/device1"
	serial >"$O/serial1"
	journalctl -b -u gwagent --no-pager >"$O/journal-boot1.txt" 2>&1
	touch "$O/phase1.done"
	sync
	systemctl reboot
	exit 0
fi

if [ ! -e "$O/phase2.done" ]; then
	log "phase 2: after a reboot"
	start=$(systemctl show -p ExecMainStartTimestamp --value gwagent.service)
	date -u -d "$start" +%s >"$O/start2"
	if waitfor 300 connected; then pass "connected-after-reboot"; else fail "connected-after-reboot: $(state)"; fi
	[ "$(deviceid)" = "$(cat "$O/device1")" ] && [ "$(serial)" = "$(cat "$O/serial1")" ] &&
		pass "reboot-keeps-identity $(deviceid) serial $(serial)" || fail "reboot-keeps-identity: $(deviceid) $(serial), was $(cat "$O/device1") $(cat "$O/serial1")"
	sleep 30
	clean_journal boot2
	rss 2
	check 2
	check 2-as-service-user gwagent
	security 2
	metric "gwagent-started-after-boot-s $(($(systemctl show -p ExecMainStartTimestampMonotonic --value gwagent.service) / 1000000))"
	journalctl -b -u gwagent --no-pager >"$O/journal-boot2.txt" 2>&1
	touch "$O/phase2.done"
	sync
	systemctl poweroff
	exit 0
fi

log "phase 3: booted with the network cable out"
link=$(for n in /sys/class/net/*; do [ "${n##*/}" = lo ] || echo "${n##*/}"; done | head -n1)
log "link $link carrier $(cat "/sys/class/net/$link/carrier" 2>/dev/null)"
[ "$(cat "/sys/class/net/$link/carrier" 2>/dev/null)" != 1 ] && pass "link-down-at-boot $link" || fail "link-down-at-boot: $link has a carrier"
sleep 20
if [ "$(systemctl is-active gwagent.service)" = active ] && [ "$(nrestarts)" = 0 ] && ! connected; then
	pass "network-down-at-boot: service active, not connected, NRestarts=0 ($(state))"
else
	fail "network-down-at-boot: $(systemctl is-active gwagent.service), NRestarts=$(nrestarts), $(state)"
fi
echo "IMAGECHECK-LINK-UP" >/dev/console
t0=$(date +%s)
if waitfor 300 connected; then
	pass "network-up-later: connected $(($(date +%s) - t0))s after the link came up"
	metric "link-up-to-connected-s $(($(date +%s) - t0))"
else
	fail "network-up-later: $(state) (journal-boot3.txt)"
fi
[ "$(nrestarts)" = 0 ] && pass "no-restart-without-network" || fail "no-restart-without-network: NRestarts=$(nrestarts)"
journalctl -b -u gwagent --no-pager >"$O/journal-boot3.txt" 2>&1
networkctl status --no-pager >"$O/network-boot3.txt" 2>&1
touch "$O/phase3.done"
sync
systemctl poweroff
