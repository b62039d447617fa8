#!/usr/bin/env bash
# make bench: figures for the gateway budget, printed as a table and written
# to bin/bench.json. More rows arrive with the runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bin
ldflags="-s -w"
CGO_ENABLED=0 GOOS=linux GOARCH=arm64 go build -trimpath -tags nopkcs11 -ldflags "$ldflags" -o bin/bench-gwagent-arm64-static ./cmd/gwagent
./testdata/install-deps.sh --cross
CGO_ENABLED=1 GOOS=linux GOARCH=arm64 CC=aarch64-linux-gnu-gcc go build -trimpath -ldflags "$ldflags" -o bin/bench-gwagent-arm64-full ./cmd/gwagent
static=$(stat -c %s bin/bench-gwagent-arm64-static)
full=$(stat -c %s bin/bench-gwagent-arm64-full)
limit=$((8 * 1024 * 1024))
printf '%-44s %14s %14s\n' metric value target
printf '%-44s %14s %14s\n' "binary size, linux/arm64 CGO-free (bytes)" "$static" "<= $limit"
printf '%-44s %14s %14s\n' "binary size, linux/arm64 full (bytes)" "$full" "-"
cat > bin/bench.json <<JSON
{"binary_size_arm64_static_bytes": $static, "binary_size_arm64_full_bytes": $full, "binary_size_target_bytes": $limit}
JSON
echo "written bin/bench.json"
rm -f bin/bench-gwagent-arm64-static bin/bench-gwagent-arm64-full
