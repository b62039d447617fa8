// Drives azsim with Microsoft's official Node.js device SDKs, unchanged:
// provision through DPS (X.509 group or symmetric-key group), connect to
// the assigned hub, send one telemetry message, read the twin and report a
// property. Prints one JSON line with the outcome; exits non-zero on error.
//
// usage: node check.js x509 DPS_HOST ID_SCOPE REG_ID CHAIN_PEM KEY_PEM
//        node check.js symkey DPS_HOST ID_SCOPE REG_ID DEVICE_KEY_B64
// The trust bundle comes from NODE_EXTRA_CA_CERTS, Node's standard way.
// SDKCHECK_WS=1 uses the SDKs' MQTT over WebSockets transports (MqttWs, port
// 443), through the proxy in https_proxy if set, as the SDK samples do it
// (https-proxy-agent as the webSocketAgent).
'use strict';
const fs = require('fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const ProvisioningMqtt = require('azure-iot-provisioning-device-mqtt').Mqtt;
const { X509Security } = require('azure-iot-security-x509');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { Client, Message } = require('azure-iot-device');
const { MqttBase } = require('azure-iot-mqtt-base');

const ws = process.env.SDKCHECK_WS === '1';
const proxy = process.env.https_proxy || process.env.HTTPS_PROXY;
let agent;
if (ws && proxy) {
  const { HttpsProxyAgent } = require('https-proxy-agent');
  agent = new HttpsProxyAgent(proxy);
}
const HubMqtt = ws ? require('azure-iot-device-mqtt').MqttWs : require('azure-iot-device-mqtt').Mqtt;
const wsOptions = agent ? { mqtt: { webSocketAgent: agent } } : {};

function fail(step, err) {
  console.log(JSON.stringify({ ok: false, step, error: String(err && err.message || err) }));
  process.exit(1);
}

const [mode, dpsHost, idScope, regId, a, b] = process.argv.slice(2);
let security, hubAuth;
if (mode === 'x509') {
  const cert = { cert: fs.readFileSync(a, 'utf8'), key: fs.readFileSync(b, 'utf8') };
  security = new X509Security(regId, cert);
  hubAuth = (host, id) => {
    const c = Client.fromConnectionString(`HostName=${host};DeviceId=${id};x509=true`, HubMqtt);
    c.setOptions(Object.assign({}, cert, wsOptions));
    return c;
  };
} else if (mode === 'symkey') {
  security = new SymmetricKeySecurityClient(regId, a);
  hubAuth = (host, id) => {
    const c = Client.fromConnectionString(`HostName=${host};DeviceId=${id};SharedAccessKey=${a}`, HubMqtt);
    if (agent) c.setOptions(wsOptions);
    return c;
  };
} else {
  fail('usage', 'mode must be x509 or symkey');
}

let provTransport = new ProvisioningMqtt();
if (ws) {
  const base = new MqttBase();
  if (agent) base.setOptions(wsOptions);
  provTransport = new (require('azure-iot-provisioning-device-mqtt').MqttWs)(base);
}
const prov = ProvisioningDeviceClient.create(dpsHost, idScope, provTransport, security);
prov.register((err, res) => {
  if (err) return fail('register', err);
  const client = hubAuth(res.assignedHub, res.deviceId);
  client.open((err) => {
    if (err) return fail('hub-open', err);
    const msg = new Message(JSON.stringify({ sdk: 'node', mode, at: new Date().toISOString() }));
    msg.contentType = 'application/json';
    msg.contentEncoding = 'utf-8';
    msg.properties.add('source', 'sdkcheck');
    client.sendEvent(msg, (err) => {
      if (err) return fail('telemetry', err);
      client.getTwin((err, twin) => {
        if (err) return fail('twin-get', err);
        twin.properties.reported.update({ sdkcheck: { mode } }, (err) => {
          if (err) return fail('twin-report', err);
          console.log(JSON.stringify({ ok: true, transport: ws ? (agent ? 'websocket via proxy' : 'websocket') : 'mqtt', assignedHub: res.assignedHub, deviceId: res.deviceId,
            reportedVersion: twin.properties.reported.$version }));
          client.close(() => process.exit(0));
        });
      });
    });
  });
});
