#!/usr/bin/env bash
# make sdkcheck: Microsoft's official device SDKs, unchanged, against azsim.
# Node.js: X.509 enrollment-group and symmetric-key provisioning over MQTT,
# then telemetry and twin on the assigned hub; the TPM security client with
# the HTTP transport (TPM attestation) on a swtpm, through tpmbridge; as
# root, MQTT over WebSockets through a proxy. Needs node and npm (the
# packages come from the npm registry, pinned in testdata/sdkcheck).
# Python (azure-iot-device 2.14.0): symmetric-key group provisioning, hub
# telemetry, twin, methods and C2D, then an azsim restart after which the
# SDK, which never subscribes again, still gets all three. The SDK comes
# from an installed package, else the Python package index, else its source
# (Azure/azure-iot-sdk-python, tag release_2024_07_17) in the git checkout
# named by AZURE_IOT_SDK_PYTHON, run with Debian's Python and packages
# (testdata/install-deps.sh --sdkcheck installs them).
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
cleanup() { kill $AZ $SWTPM ${BRIDGE:-} ${PYAZ:-} ${PYPID:-} ${AZWS:-} ${TP:-} 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
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

# Microsoft's Python SDK. It always dials port 8883, so this azsim serves
# DPS on 127.0.0.3:8883 and the hub on 127.0.0.4:8883 (names in its TLS
# certificate), apart from any azsim on 127.0.0.1.
cd "$ROOT"
PY=${SDKCHECK_PYTHON:-/usr/bin/python3}
PYDIR=$DIR/python
mkdir -p "$PYDIR/state"
sdk_version='import sys; from azure.iot.device import constant; sys.exit(constant.VERSION != "2.14.0")'
if "$PY" -c "$sdk_version" 2>/dev/null; then
	PYSDK="installed"
elif "$PY" -m pip install --quiet --retries 0 --timeout 15 --target "$PYDIR/site" azure-iot-device==2.14.0 >"$PYDIR/pip.log" 2>&1; then
	export PYTHONPATH=$PYDIR/site PYSDK="from the Python package index"
elif [ -n "${AZURE_IOT_SDK_PYTHON:-}" ]; then
	mkdir -p "$PYDIR/src"
	git -C "$AZURE_IOT_SDK_PYTHON" archive release_2024_07_17 azure-iot-device | tar -x -C "$PYDIR/src" ||
		{ echo "FAIL: no tag release_2024_07_17 in $AZURE_IOT_SDK_PYTHON"; exit 1; }
	export PYTHONPATH=$PYDIR/src/azure-iot-device PYSDK="from source ($AZURE_IOT_SDK_PYTHON, release_2024_07_17) with Debian's packages"
else
	echo "FAIL: Microsoft's Python SDK is not installed and the package index is out of reach ($PYDIR/pip.log);"
	echo "      clone https://github.com/Azure/azure-iot-sdk-python and set AZURE_IOT_SDK_PYTHON to it"
	exit 1
fi
"$PY" -c "$sdk_version" || { echo "FAIL: azure-iot-device 2.14.0 does not import with $PY ($PYSDK); testdata/install-deps.sh --sdkcheck installs its dependencies"; exit 1; }
export AZSIM_ADMIN=http://127.0.0.1:28470
start_pyaz() {
	bin/azsim serve --state "$DIR/azsim-py" --dps-addr 127.0.0.3:8883 --hub-addr 127.0.0.4:8883 --server-names 127.0.0.3,127.0.0.4 \
		--dps-https-addr 127.0.0.1:28463 --admin-addr 127.0.0.1:28470 --dps-ws-addr off --hub-ws-addr off \
		--telemetry-log "$DIR/telemetry-py.jsonl" --retry-after 1 >>"$DIR/azsim-py.log" 2>&1 &
	PYAZ=$!
	for _ in $(seq 100); do bin/azsim info >/dev/null 2>&1 && return 0; kill -0 $PYAZ 2>/dev/null || break; sleep 0.1; done
	echo "FAIL: the Python check's azsim did not start (127.0.0.3:8883 or 127.0.0.4:8883 in use?):"; cat "$DIR/azsim-py.log"; exit 1
}
waitfile() {
	for _ in $(seq 900); do [ -e "$PYDIR/state/$1" ] && return 0; kill -0 $PYPID 2>/dev/null || break; sleep 0.1; done
	echo "FAIL: the Python SDK device did not get to '$1':"; cat "$PYDIR/out.json" "$PYDIR/err.log"; exit 1
}
start_pyaz
KEY=$(bin/azsim derive-key py-sym-1 | sed -n 's/.*"deviceKey": *"\([^"]*\)".*/\1/p')
"$PY" testdata/sdkcheck/pycheck.py 127.0.0.3 127.0.0.4 0ne00AZSIM0 py-sym-1 "$KEY" "$DIR/azsim-py/pki/trust-bundle.pem" "$PYDIR/state" \
	>"$PYDIR/out.json" 2>"$PYDIR/err.log" &
PYPID=$!
waitfile ready
bin/azsim method py-sym-1 before '{"n":1}' >/dev/null
bin/azsim c2d py-sym-1 c2d-before >/dev/null
kill $PYAZ && wait $PYAZ || true
start_pyaz
bin/azsim c2d py-sym-1 c2d-queued-while-down >/dev/null
touch "$PYDIR/state/restarted"
waitfile reconnected
bin/azsim method py-sym-1 after '{"n":2}' >/dev/null
bin/azsim c2d py-sym-1 c2d-after >/dev/null
PYRC=0
wait $PYPID || PYRC=$?
PYPID=
echo "Python SDK ($PYSDK): $(cat "$PYDIR/out.json")"
[ $PYRC -eq 0 ] || { echo "FAIL: the Python SDK check failed; its log: $PYDIR/err.log"; exit 1; }
[ "$(grep -c '"deviceId":"py-sym-1"' "$DIR/telemetry-py.jsonl")" -ge 2 ] || { echo "FAIL: azsim logged no telemetry from py-sym-1 after the restart"; exit 1; }
echo "PASS: the Python SDK registered with a SAS token without skn, and after an azsim restart got twin answers, a method and C2D (one queued while azsim was down) without subscribing again"

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
