// Drives azsim with Microsoft's official Node.js device SDKs, unchanged:
// provision through DPS (X.509 group or symmetric-key group), connect to
// the assigned hub, send one telemetry message, read the twin and report a
// property. Prints one JSON line with the outcome; exits non-zero on error.
//
// usage: node check.js x509 DPS_HOST ID_SCOPE REG_ID CHAIN_PEM KEY_PEM
//        node check.js symkey DPS_HOST ID_SCOPE REG_ID DEVICE_KEY_B64
// The trust bundle comes from NODE_EXTRA_CA_CERTS, Node's standard way.
'use strict';
const fs = require('fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const ProvisioningMqtt = require('azure-iot-provisioning-device-mqtt').Mqtt;
const { X509Security } = require('azure-iot-security-x509');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { Client, Message } = require('azure-iot-device');
const HubMqtt = require('azure-iot-device-mqtt').Mqtt;

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
    c.setOptions(cert);
    return c;
  };
} else if (mode === 'symkey') {
  security = new SymmetricKeySecurityClient(regId, a);
  hubAuth = (host, id) => Client.fromConnectionString(`HostName=${host};DeviceId=${id};SharedAccessKey=${a}`, HubMqtt);
} else {
  fail('usage', 'mode must be x509 or symkey');
}

const prov = ProvisioningDeviceClient.create(dpsHost, idScope, new ProvisioningMqtt(), security);
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
          console.log(JSON.stringify({ ok: true, assignedHub: res.assignedHub, deviceId: res.deviceId,
            reportedVersion: twin.properties.reported.$version }));
          client.close(() => process.exit(0));
        });
      });
    });
  });
});
