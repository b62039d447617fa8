#!/usr/bin/env bash
# make demo: the whole gwagent lifecycle on this machine, against azsim.
#   azsim (DPS + IoT Hub) -> swtpm (a software TPM) -> factory step ->
#   gwagent run: provision, connect, telemetry, certificate renewal.
# Runs until Ctrl-C, or for DEMO_SECONDS seconds. DEMO_KEYS=file uses
# software keys instead of the TPM. DEMO_ONBOARDING=tpm onboards with TPM
# attestation (the TPM's endorsement key enrolled in DPS, DPS over HTTPS)
# instead of a factory X.509 certificate. DEMO_PROXY=1 puts the gateway
# behind an HTTP proxy (tinyproxy, with a password) that only tunnels to the
# WebSocket ports, as a plant proxy that only allows 443: the agent's auto
# transport falls back from MQTT to MQTT over WebSockets.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/bin
DIR=$PWD/bin/demo
KEYS=${DEMO_KEYS:-tpm}
ONBOARDING=${DEMO_ONBOARDING:-x509}
if [ "$ONBOARDING" = tpm ] && [ "$KEYS" != tpm ]; then
	echo "DEMO_ONBOARDING=tpm needs the TPM (leave DEMO_KEYS unset)" >&2
	exit 2
fi
LIFETIME=${DEMO_CERT_LIFETIME:-60s}
ADMIN=127.0.0.1:18480

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
pids=()
cleanup() {
	say "cleaning up"
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	echo "state kept in $DIR for a look around (deleted by the next make demo)"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

rm -rf "$DIR" && mkdir -p "$DIR"
export AZSIM_ADMIN=http://$ADMIN

say "starting azsim: DPS and IoT Hub emulators with their own PKI (certificates live $LIFETIME so you see a renewal)"
"$BIN/azsim" serve --state "$DIR/azsim" --dps-addr 127.0.0.1:18883 --dps-https-addr 127.0.0.1:18443 --hub-addr 127.0.0.1:18884 --admin-addr $ADMIN \
	--dps-ws-addr 127.0.0.1:18445 --hub-ws-addr 127.0.0.1:18444 \
	--cert-lifetime "$LIFETIME" --telemetry-log "$DIR/telemetry.jsonl" --retry-after 1 --gentle >"$DIR/azsim.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do "$BIN/azsim" info >/dev/null 2>&1 && break; sleep 0.1; done
sed 's/^/    /' "$DIR/azsim.log"

if [ "$KEYS" = tpm ]; then
	say "starting swtpm, a software TPM 2.0, on a Unix socket (a gateway would use /dev/tpmrm0)"
	mkdir -p "$DIR/tpm"
	swtpm socket --tpm2 --server type=unixio,path="$DIR/tpm/tpm.sock" --ctrl type=unixio,path="$DIR/tpm/ctrl.sock" \
		--tpmstate dir="$DIR/tpm" --flags not-need-init,startup-clear >"$DIR/swtpm.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 50); do [ -S "$DIR/tpm/tpm.sock" ] && break; sleep 0.1; done
	ONBOARD_KEY="tpm2:socket=$DIR/tpm/tpm.sock;blob=$DIR/state/onboarding.tpmkey"
	OP_KEY="tpm2:socket=$DIR/tpm/tpm.sock;blob=$DIR/state/device.tpmkey"
	echo "    keys: P-384, created inside the TPM, never exportable"
else
	ONBOARD_KEY="file:$DIR/state/onboarding.key"
	OP_KEY="file:$DIR/state/device.key"
	echo "    keys: software P-384 key files (0600)"
fi

NETWORK=""
if [ "${DEMO_PROXY:-0}" = 1 ]; then
	say "starting tinyproxy: a site proxy with a password that tunnels only to stand-ins for 443 (WebSockets 18445 and 18444, DPS HTTPS 18443)"
	cat >"$DIR/tinyproxy.conf" <<EOF
Port 18128
Listen 127.0.0.1
Allow 127.0.0.1
BasicAuth demo demo-proxy-pw
ConnectPort 18443
ConnectPort 18445
ConnectPort 18444
LogLevel Connect
EOF
	tinyproxy -d -c "$DIR/tinyproxy.conf" >"$DIR/tinyproxy.log" 2>&1 &
	pids+=($!)
	NETWORK="[network]
transport = \"auto\"
proxy = \"http://demo:demo-proxy-pw@127.0.0.1:18128\"
dps_websocket_port = 18445
hub_websocket_port = 18444"
	echo "    proxy log: $DIR/tinyproxy.log (8883's stand-ins 18883/18884 are refused with 403)"
fi

mkdir -p "$DIR/state"
IDENTITY='registration_id = "demo-gateway-01"
dps_endpoint = "localhost:18883"'
ONBOARDING_TOML="kind = \"x509\"
key = \"$ONBOARD_KEY\"
chain = \"$DIR/state/onboarding-chain.pem\""
if [ "$ONBOARDING" = tpm ]; then
	# No registration id: gwagent derives it from the endorsement key.
	IDENTITY='dps_endpoint = "localhost:18443"
dps_transport = "https"'
	ONBOARDING_TOML="kind = \"tpm\"
tpm = \"tpm2:socket=$DIR/tpm/tpm.sock\""
fi
cat >"$DIR/gwagent.toml" <<EOF
# Written by make demo. See configs/gwagent.toml for every option.
state_dir = "$DIR/state"
trust_bundle = "$DIR/azsim/pki/trust-bundle.pem"
[identity]
id_scope = "0ne00AZSIM0"
$IDENTITY
[onboarding]
$ONBOARDING_TOML
[operational]
key = "$OP_KEY"
[telemetry]
interval = "5s"
[renewal]
jitter = "10s"
floor = "5s"
retry_min = "2s"
retry_max = "10s"
$NETWORK
EOF
chmod 600 "$DIR/gwagent.toml"

if [ "$ONBOARDING" = tpm ]; then
	say "factory step 1: gwagent onboard tpm (the TPM's endorsement key and the registration id derived from it)"
	"$BIN/gwagent" onboard tpm --config "$DIR/gwagent.toml" --ek-out "$DIR/ek.b64" | tee "$DIR/onboard-tpm.txt" | cut -c1-100 | sed 's/^/    /'
	REG_ID=$(sed -n 's/^registration_id: //p' "$DIR/onboard-tpm.txt")
	say "factory step 2: the manufacturer enrolls the EK in DPS (azsim enroll tpm); nothing secret is stored on the device"
	"$BIN/azsim" enroll tpm --registration-id "$REG_ID" --ek "$DIR/ek.b64" | cut -c1-100 | sed 's/^/    /'
	echo
else
	say "factory step 1: gwagent onboard csr (onboarding key + CSR for the factory CA)"
	"$BIN/gwagent" onboard csr --config "$DIR/gwagent.toml" --out "$DIR/onboarding.csr"
	say "factory step 2: azsim factory-sign plays the factory's CA"
	"$BIN/azsim" factory-sign <"$DIR/onboarding.csr" >"$DIR/factory-chain.pem"
	openssl x509 -in "$DIR/factory-chain.pem" -noout -subject -issuer | sed 's/^/    /'
	say "factory step 3: gwagent onboard install (checks the chain matches the key)"
	"$BIN/gwagent" onboard install --config "$DIR/gwagent.toml" --chain "$DIR/factory-chain.pem"
fi

if [ "$ONBOARDING" = tpm ]; then
	say "gwagent run: TPM attestation over HTTPS (DPS's challenge opened inside the TPM), a new P-384 key, hub, telemetry"
else
	say "gwagent run: provisions through DPS with a new P-384 key, connects to the hub, sends telemetry"
fi
echo "    (agent log: $DIR/gwagent.log; azsim's record of arrivals: $DIR/telemetry.jsonl)"
"$BIN/gwagent" run --config "$DIR/gwagent.toml" >"$DIR/gwagent.log" 2>&1 &
AGENT=$!
pids+=($AGENT)

for _ in $(seq 100); do [ -s "$DIR/telemetry.jsonl" ] && break; sleep 0.1; done
say "status while it runs (gwagent status):"
"$BIN/gwagent" status --config "$DIR/gwagent.toml" | sed 's/^/    /'

say "watching: telemetry arriving at azsim's hub, and certificate renewals (Ctrl-C to stop)"
end=$((SECONDS + ${DEMO_SECONDS:-100000000}))
seen=0
last_serial=$(sed -n 's/.*"serial": "\([0-9a-f]*\)".*/\1/p' "$DIR/state/identity/"*/identity.json 2>/dev/null | tail -1)
while [ $SECONDS -lt $end ] && kill -0 $AGENT 2>/dev/null; do
	n=$(wc -l <"$DIR/telemetry.jsonl")
	if [ "$n" -gt "$seen" ]; then
		tail -n $((n - seen)) "$DIR/telemetry.jsonl" | sed -E 's/.*"deviceId":"([^"]*)".*"application":\{"type":"([^"]*)"\}.*"receivedAt":"([^".]*)[^"]*".*/    hub received a \2 message from \1 at \3/'
		seen=$n
	fi
	cur=$("$BIN/gwagent" status --config "$DIR/gwagent.toml" | sed -n 's/^certificate: *serial \([0-9a-f]*\).*/\1/p')
	if [ -n "$cur" ] && [ "$cur" != "$last_serial" ]; then
		if [ -n "$last_serial" ]; then
			printf '    \033[1mcertificate renewed with a new key:\033[0m serial %s -> %s\n' "$last_serial" "$cur"
			grep -h '"certificate renewed' "$DIR/gwagent.log" | tail -1 | sed 's/^/      /'
		fi
		last_serial=$cur
	fi
	sleep 1
done
kill -0 $AGENT 2>/dev/null || { echo "gwagent exited:"; tail -20 "$DIR/gwagent.log"; exit 1; }
say "stopping gwagent (SIGTERM: flushes the outbox and reports 'stopped')"
kill -TERM $AGENT; wait $AGENT || true
if [ "${DEMO_PROXY:-0}" = 1 ]; then
	say "what the proxy saw (CONNECT requests):"
	grep -o 'CONNECT [^ ]*:[0-9]*' "$DIR/tinyproxy.log" | sort | uniq -c | sed 's/^/    /'
fi
"$BIN/gwagent" status --config "$DIR/gwagent.toml" | sed 's/^/    /'
