#!/usr/bin/env bash
# make bench: figures for the gateway budget, printed as a table (figure,
# target, met/missed) and written to bin/bench.json (devtools/bench does the
# measuring). It runs the binary users ship: the CGO-free static build.
# About 15 minutes on 2 cores (a 10-minute memory, flash and idle window runs
# beside the other measurements; the drain against an S1 hub at the default
# send budget takes a minute of it). BENCH_WINDOW=2m shortens the window.
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
./testdata/install-deps.sh --cross
CGO_ENABLED=1 GOOS=linux GOARCH=arm64 CC=aarch64-linux-gnu-gcc go build -trimpath -ldflags "$ldflags" -o bin/bench-gwagent-arm64-full ./cmd/gwagent
sizes="$(stat -c %s bin/bench-gwagent-arm64-static) $(stat -c %s bin/bench-floor-arm64-static) $(stat -c %s bin/bench-gwagent-arm64-full)"
rm -f bin/bench-gwagent-arm64-static bin/bench-floor-arm64-static bin/bench-gwagent-arm64-full
static "$(go env GOARCH)" bin/bench-gwagent-static ./cmd/gwagent
if [ -n "${BENCH_SOAK:-}" ]; then
	exec go run ./devtools/bench -gwagent bin/bench-gwagent-static -sizes "$sizes" -soak "$BENCH_SOAK" -soak-csv bin/soak.csv -out bin/soak.json
fi
go run ./devtools/bench -gwagent bin/bench-gwagent-static -sizes "$sizes" -window "${BENCH_WINDOW:-10m}" -out bin/bench.json
# The fleet check: 200 agents provisioned at once must renew spread out.
echo "fleet check (200 agents in one process, 80 s certificates, 30 s jitter window):"
go test -tags fleet -run TestFleetRenewalSpread -count=1 -v -timeout 10m ./agent 2>&1 | grep -E "FLEET|^(ok|FAIL|---)" | sed 's/^ *fleet_test.go:[0-9]*: /  /'
