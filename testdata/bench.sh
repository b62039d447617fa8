#!/usr/bin/env bash
# make bench: figures for the gateway budget, printed as a table (figure,
# target, met/missed) and written to bin/bench.json (devtools/bench does the
# measuring). It runs the binary users ship: the CGO-free static build.
# About 17 minutes on 2 cores (a 10-minute memory, flash and idle window runs
# beside the other measurements; the drain against an S1 hub at the default
# send budget takes a minute of it, the arm64 drain under qemu-user one more). BENCH_WINDOW=2m shortens the window.
# BENCH_SOAK=2h runs only the memory soak (one 100-byte reading a second,
# memory sampled every 30 s into bin/soak.csv) for that long.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bin
ldflags="-s -w"
# Compiled as the Makefile compiles what ships.
. ./packaging/ship-env
static() { CGO_ENABLED=0 GOOS=linux GOARCH=$1 go build -trimpath -tags nopkcs11 -ldflags "$ldflags" -o "$2" "$3"; }
static arm64 bin/bench-gwagent-arm64-static ./cmd/gwagent
static arm64 bin/bench-floor-arm64-static ./devtools/bench/floor
./testdata/install-deps.sh --bench
CGO_ENABLED=1 GOOS=linux GOARCH=arm64 CC=aarch64-linux-gnu-gcc go build -trimpath -ldflags "$ldflags" -o bin/bench-gwagent-arm64-full ./cmd/gwagent
sizes="$(stat -c %s bin/bench-gwagent-arm64-static) $(stat -c %s bin/bench-floor-arm64-static) $(stat -c %s bin/bench-gwagent-arm64-full)"
rm -f bin/bench-floor-arm64-static bin/bench-gwagent-arm64-full
static "$(go env GOARCH)" bin/bench-gwagent-static ./cmd/gwagent
go build -o bin/bench-host ./devtools/bench
# The bench's directories (the agents' state and spool directories, azsim's)
# go on a file system made and mounted as the factory image makes and
# mounts a gateway's root (packaging/image): ext4 with mkfs's defaults,
# without online discard. Deleting delivered spool files is a large part
# of the drain's CPU, and on a file system mounted with discard (a cloud
# VM's root often is) each delete also sends the storage a TRIM and waits
# for it. As root only; otherwise, or with BENCH_FS=tmp, TMPDIR as it is.
# The figures' notes name the file system.
benchfs=""
cleanup() {
	if [ -n "$benchfs" ]; then
		umount "$benchfs/mnt" 2>/dev/null || true
		rm -rf "$benchfs"
	fi
}
if [ "$(id -u)" -eq 0 ] && [ "${BENCH_FS:-}" != tmp ]; then
	# What a bench killed before its cleanup left behind (its pid gone).
	for old in /var/tmp/gwbench-fs.*; do
		[ -d "$old" ] || continue
		pid=$(cat "$old/pid" 2>/dev/null || echo 0)
		if [ "$pid" -gt 0 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
		umount "$old/mnt" 2>/dev/null || true
		rm -rf "$old"
	done
	benchfs=$(mktemp -d /var/tmp/gwbench-fs.XXXXXX)
	echo $$ >"$benchfs/pid"
	trap cleanup EXIT
	truncate -s 4G "$benchfs/img"
	mkfs.ext4 -q -F "$benchfs/img"
	mkdir "$benchfs/mnt"
	mount -o loop,rw,errors=remount-ro "$benchfs/img" "$benchfs/mnt"
	chmod 1777 "$benchfs/mnt"
	export TMPDIR="$benchfs/mnt"
fi
if [ -n "${BENCH_SOAK:-}" ]; then
	bin/bench-host -gwagent bin/bench-gwagent-static -sizes "$sizes" -soak "$BENCH_SOAK" -soak-csv bin/soak.csv -out bin/soak.json
	exit
fi
# The arm64 drain under qemu-user: the shipped arm64 build, and the bench
# itself built for arm64 for its paho reference.
static arm64 bin/bench-arm64 ./devtools/bench
bin/bench-host -gwagent bin/bench-gwagent-static -sizes "$sizes" -window "${BENCH_WINDOW:-10m}" -out bin/bench.json \
	-gwagent-arm64 bin/bench-gwagent-arm64-static -bench-arm64 bin/bench-arm64
# The fleet check: 200 agents provisioned at once must renew spread out.
echo "fleet check (200 agents in one process, 80 s certificates, 30 s jitter window):"
# Its own lines (times, the figure, and why it failed), not the agents' logs.
go test -tags fleet -run TestFleetRenewalSpread -count=1 -v -timeout 10m ./agent 2>&1 | grep -E "fleet_test.go:[0-9]+:|^(ok|FAIL|---)" | sed 's/^ *fleet_test.go:[0-9]*: /  /'
