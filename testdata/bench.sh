#!/usr/bin/env bash
# make bench: figures for the gateway budget, printed as a table and written
# to bin/bench.json (internal/bench does the measuring).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bin
ldflags="-s -w"
CGO_ENABLED=0 GOOS=linux GOARCH=arm64 go build -trimpath -tags nopkcs11 -ldflags "$ldflags" -o bin/bench-gwagent-arm64-static ./cmd/gwagent
./testdata/install-deps.sh --cross
CGO_ENABLED=1 GOOS=linux GOARCH=arm64 CC=aarch64-linux-gnu-gcc go build -trimpath -ldflags "$ldflags" -o bin/bench-gwagent-arm64-full ./cmd/gwagent
static=$(stat -c %s bin/bench-gwagent-arm64-static)
full=$(stat -c %s bin/bench-gwagent-arm64-full)
rm -f bin/bench-gwagent-arm64-static bin/bench-gwagent-arm64-full
go build -trimpath -ldflags "$ldflags" -o bin/gwagent ./cmd/gwagent
go run ./internal/bench -gwagent bin/gwagent -sizes "$static $full" -out bin/bench.json
# The fleet check: 200 agents provisioned at once must renew spread out.
echo "fleet check (200 agents in one process, 80 s certificates, 30 s jitter window):"
go test -tags fleet -run TestFleetRenewalSpread -count=1 -v -timeout 10m ./agent 2>&1 | grep -E "FLEET|^(ok|FAIL|---)" | sed 's/^ *fleet_test.go:[0-9]*: /  /'
