#!/usr/bin/env bash
# make sdkcheck: Microsoft's official Node.js device SDKs, unchanged, against
# azsim: X.509 enrollment-group and symmetric-key provisioning over MQTT,
# then telemetry and twin on the assigned hub; and the TPM security client
# with the HTTP transport (TPM attestation) on a swtpm, through tpmbridge. Needs node and npm (the
# packages come from the npm registry, pinned in testdata/sdkcheck).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v npm >/dev/null || { echo "sdkcheck needs node and npm (apt-get install nodejs npm)"; exit 1; }
DIR=$PWD/bin/sdkcheck
rm -rf "$DIR" && mkdir -p "$DIR" && cp testdata/sdkcheck/package.json testdata/sdkcheck/check.js "$DIR/"
(cd "$DIR" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
mkdir -p "$DIR/tpm/state" && cp testdata/sdkcheck/tpm/package.json testdata/sdkcheck/tpmcheck.js "$DIR/tpm/"
(cd "$DIR/tpm" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
go build -o bin/tpmbridge ./internal/sdkcheck/tpmbridge
export AZSIM_ADMIN=http://127.0.0.1:28480
bin/azsim serve --state "$DIR/azsim" --dps-addr 127.0.0.1:28883 --dps-https-addr 127.0.0.1:28443 --hub-addr 127.0.0.1:28884 \
	--admin-addr 127.0.0.1:28480 --telemetry-log "$DIR/telemetry.jsonl" --retry-after 1 >"$DIR/azsim.log" 2>&1 &
AZ=$!
swtpm socket --tpm2 --server type=unixio,path="$DIR/tpm/state/tpm.sock" --ctrl type=unixio,path="$DIR/tpm/state/ctrl.sock" \
	--tpmstate dir="$DIR/tpm/state" --flags not-need-init,startup-clear >"$DIR/swtpm.log" 2>&1 &
SWTPM=$!
trap 'kill $AZ $SWTPM ${BRIDGE:-} 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$DIR/tpm/state/tpm.sock" ] && break; sleep 0.1; done
bin/tpmbridge -swtpm "$DIR/tpm/state/tpm.sock" -port 28321 >"$DIR/tpmbridge.log" 2>&1 &
BRIDGE=$!
for _ in $(seq 50); do bin/azsim info >/dev/null 2>&1 && break; sleep 0.1; done
export NODE_EXTRA_CA_CERTS=$DIR/azsim/pki/trust-bundle.pem
cd "$DIR"
openssl ecparam -name prime256v1 -genkey -noout -out x509.key
openssl req -new -key x509.key -subj /CN=node-x509-1 -out x509.csr
../azsim factory-sign <x509.csr >x509-chain.pem
echo "X.509 group:   $(node check.js x509 localhost:28883 0ne00AZSIM0 node-x509-1 x509-chain.pem x509.key)"
KEY=$(../azsim derive-key node-sym-1 | sed -n 's/.*"deviceKey": *"\([^"]*\)".*/\1/p')
echo "symmetric key: $(node check.js symkey localhost:28883 0ne00AZSIM0 node-sym-1 "$KEY")"
TPM_OUT=$(cd tpm && node tpmcheck.js localhost 28443 0ne00AZSIM0 28321 http://127.0.0.1:28480) || true
echo "TPM (HTTPS):   $TPM_OUT"
case "$TPM_OUT" in *'"ok":true'*) ;; *) echo "FAIL: the Node.js TPM client did not register"; exit 1 ;; esac
for id in node-x509-1 node-sym-1; do
	grep -q "\"deviceId\":\"$id\"" telemetry.jsonl || { echo "FAIL: no telemetry from $id in azsim's log"; exit 1; }
done
echo "PASS: both MQTT SDK devices provisioned, sent telemetry that azsim logged, and reported twin properties; the TPM SDK device registered with TPM attestation over HTTPS"
