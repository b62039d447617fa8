#!/usr/bin/env bash
# make sdkcheck: Microsoft's official Node.js device SDKs, unchanged, against
# azsim: X.509 enrollment-group and symmetric-key provisioning over MQTT,
# then telemetry and twin on the assigned hub; and the TPM security client
# with the HTTP transport (TPM attestation) on a swtpm, through tpmbridge;
# as root, MQTT over WebSockets through a proxy. Needs node and npm (the
# packages come from the npm registry, pinned in testdata/sdkcheck).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
command -v npm >/dev/null || { echo "sdkcheck needs node and npm (apt-get install nodejs npm)"; exit 1; }
DIR=$PWD/bin/sdkcheck
rm -rf "$DIR" && mkdir -p "$DIR" && cp testdata/sdkcheck/package.json testdata/sdkcheck/check.js "$DIR/"
(cd "$DIR" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
mkdir -p "$DIR/tpm/state" && cp testdata/sdkcheck/tpm/package.json testdata/sdkcheck/tpmcheck.js "$DIR/tpm/"
(cd "$DIR/tpm" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
go build -o bin/tpmbridge ./devtools/sdkcheck/tpmbridge
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

# MQTT over WebSockets through a proxy: the SDKs' MqttWs transports always
# dial port 443, so a second azsim serves WebSockets on 443 (DPS on
# 127.0.0.1, the hub on 127.0.0.2), behind tinyproxy with a password that
# tunnels only to 443. Binding 443 needs root (CI runs as root).
if [ "$(id -u)" -ne 0 ]; then
	echo "SKIPPED the WebSocket check: binding port 443 needs root"
	exit 0
fi
command -v tinyproxy >/dev/null || { echo "sdkcheck needs tinyproxy (testdata/install-deps.sh installs tinyproxy-bin)"; exit 1; }
cd "$ROOT"
export AZSIM_ADMIN=http://127.0.0.1:28490
bin/azsim serve --state "$DIR/azsim-ws" --dps-addr 127.0.0.1:28893 --dps-https-addr 127.0.0.1:28453 --hub-addr 127.0.0.2:28894 --admin-addr 127.0.0.1:28490 \
	--dps-ws-addr 127.0.0.1:443 --hub-ws-addr 127.0.0.2:443 --hub-hostname 127.0.0.2 --server-names 127.0.0.2 \
	--telemetry-log "$DIR/telemetry-ws.jsonl" --retry-after 1 >"$DIR/azsim-ws.log" 2>&1 &
AZWS=$!
cat >"$DIR/tinyproxy.conf" <<EOF
Port 28128
Listen 127.0.0.1
Allow 127.0.0.1
BasicAuth sdk sdk-proxy-pw
ConnectPort 443
LogLevel Connect
EOF
tinyproxy -d -c "$DIR/tinyproxy.conf" >"$DIR/tinyproxy.log" 2>&1 &
TP=$!
trap 'kill $AZ $SWTPM ${BRIDGE:-} $AZWS $TP 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 50); do bin/azsim info >/dev/null 2>&1 && break; sleep 0.1; done
kill -0 $AZWS 2>/dev/null || { echo "FAIL: the WebSocket azsim did not start (port 443 in use?):"; cat "$DIR/azsim-ws.log"; exit 1; }
export NODE_EXTRA_CA_CERTS=$DIR/azsim-ws/pki/trust-bundle.pem
cd "$DIR"
openssl req -new -key x509.key -subj /CN=node-ws-x509-1 -out ws-x509.csr
../azsim factory-sign <ws-x509.csr >ws-x509-chain.pem
export SDKCHECK_WS=1 https_proxy=http://sdk:sdk-proxy-pw@127.0.0.1:28128
echo "X.509 group over WebSockets via proxy:   $(node check.js x509 127.0.0.1 0ne00AZSIM0 node-ws-x509-1 ws-x509-chain.pem x509.key)"
KEY=$(../azsim derive-key node-ws-sym-1 | sed -n 's/.*"deviceKey": *"\([^"]*\)".*/\1/p')
echo "symmetric key over WebSockets via proxy: $(node check.js symkey 127.0.0.1 0ne00AZSIM0 node-ws-sym-1 "$KEY")"
for id in node-ws-x509-1 node-ws-sym-1; do
	grep -q "\"deviceId\":\"$id\"" telemetry-ws.jsonl || { echo "FAIL: no telemetry from $id over WebSockets"; exit 1; }
done
grep -q "CONNECT 127.0.0.1:443" tinyproxy.log && grep -q "CONNECT 127.0.0.2:443" tinyproxy.log || { echo "FAIL: the proxy saw no tunnels to 443"; exit 1; }
echo "PASS: both SDK devices provisioned and sent telemetry over MQTT over WebSockets through an authenticating proxy"
