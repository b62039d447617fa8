#!/usr/bin/env bash
# make sdkcheck: Microsoft's official Node.js device SDKs, unchanged, against
# azsim: X.509 enrollment-group and symmetric-key provisioning over MQTT,
# then telemetry and twin on the assigned hub. Needs node and npm (the
# packages come from the npm registry, pinned in testdata/sdkcheck).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v npm >/dev/null || { echo "sdkcheck needs node and npm (apt-get install nodejs npm)"; exit 1; }
DIR=$PWD/bin/sdkcheck
rm -rf "$DIR" && mkdir -p "$DIR" && cp testdata/sdkcheck/package.json testdata/sdkcheck/check.js "$DIR/"
(cd "$DIR" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
export AZSIM_ADMIN=http://127.0.0.1:28480
bin/azsim serve --state "$DIR/azsim" --dps-addr 127.0.0.1:28883 --hub-addr 127.0.0.1:28884 --admin-addr 127.0.0.1:28480 \
	--telemetry-log "$DIR/telemetry.jsonl" --retry-after 1 >"$DIR/azsim.log" 2>&1 &
AZ=$!
trap 'kill $AZ 2>/dev/null; wait $AZ 2>/dev/null || true' EXIT
for _ in $(seq 50); do bin/azsim info >/dev/null 2>&1 && break; sleep 0.1; done
export NODE_EXTRA_CA_CERTS=$DIR/azsim/pki/trust-bundle.pem
cd "$DIR"
openssl ecparam -name prime256v1 -genkey -noout -out x509.key
openssl req -new -key x509.key -subj /CN=node-x509-1 -out x509.csr
../azsim factory-sign <x509.csr >x509-chain.pem
echo "X.509 group:   $(node check.js x509 localhost:28883 0ne00AZSIM0 node-x509-1 x509-chain.pem x509.key)"
KEY=$(../azsim derive-key node-sym-1 | sed -n 's/.*"deviceKey": *"\([^"]*\)".*/\1/p')
echo "symmetric key: $(node check.js symkey localhost:28883 0ne00AZSIM0 node-sym-1 "$KEY")"
for id in node-x509-1 node-sym-1; do
	grep -q "\"deviceId\":\"$id\"" telemetry.jsonl || { echo "FAIL: no telemetry from $id in azsim's log"; exit 1; }
done
echo "PASS: both SDK devices provisioned, sent telemetry that azsim logged, and reported twin properties"
