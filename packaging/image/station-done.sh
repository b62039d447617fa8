#!/bin/sh
# gwagent-station-done: the factory station's last step on a gateway (see
# README, the factory flow). It removes the station's login (dropbear with
# its host keys, and root's authorized key), then powers the gateway off,
# ready to ship. The session that runs it ends with the power-off.
set -eu
[ "$(id -u)" = 0 ] || { echo "gwagent-station-done: run as root" >&2; exit 1; }
rm -f /root/.ssh/authorized_keys
rmdir /root/.ssh 2>/dev/null || true
# Purging stops the listener; this session (a child of it) goes on.
dpkg --purge dropbear dropbear-bin >/dev/null 2>&1 || systemctl disable --now dropbear.service >/dev/null 2>&1 || true
rm -rf /etc/dropbear
rm -f "$0"
sync
echo "gwagent-station-done: station login removed; powering off in 3 s"
# Later, so that the station's session ends with this command's status.
systemd-run --quiet --on-active=3s --timer-property=AccuracySec=100ms /usr/bin/systemctl poweroff
