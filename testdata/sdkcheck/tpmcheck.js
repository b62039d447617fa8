// Microsoft's Node.js TPM security client (azure-iot-security-tpm, on
// TSS.JS) and HTTP provisioning transport, unchanged, against azsim: read
// the EK and the registration id the SDK derives from it, enroll them
// through azsim's admin API (the manufacturer's step), then register with
// TPM attestation over HTTPS. Prints one JSON line; exits non-zero on error.
//
// usage: node tpmcheck.js DPS_HOST DPS_PORT ID_SCOPE TPM_SIM_PORT ADMIN_URL
// The TPM is a swtpm behind tpmbridge (the simulator protocol TSS.JS speaks).
// DPS_PORT: Node's https.request takes no port in the host name, so the
// SDK's documented httpBase hook adds it.
'use strict';
const http = require('http');
const { Tpm } = require('tss.js');
const { TpmSecurityClient } = require('azure-iot-security-tpm');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const ProvisioningHttp = require('azure-iot-provisioning-device-http').Http;
const HttpBase = require('azure-iot-http-base').Http;

const [dpsHost, dpsPort, idScope, tpmPort, adminURL] = process.argv.slice(2);

function fail(step, err) {
  console.log(JSON.stringify({ ok: false, step, error: String(err && err.message || err) }));
  process.exit(1);
}

class PortHttp extends HttpBase {
  buildRequest(method, path, headers, host, options, done) {
    if (typeof options === 'function') { done = options; options = undefined; }
    return super.buildRequest(method, path, headers, host, options || { port: Number(dpsPort) }, done);
  }
}

const security = new TpmSecurityClient(undefined, new Tpm(true, '127.0.0.1', Number(tpmPort)));
security.getEndorsementKey((err, ek) => {
  if (err) return fail('endorsement-key', err);
  security.getRegistrationId((err, regId) => {
    if (err) return fail('registration-id', err);
    const body = JSON.stringify({ endorsementKey: ek.toString('base64') });
    const req = http.request(adminURL + '/dps/tpm-enrollments/' + regId, { method: 'PUT', headers: { 'Content-Type': 'application/json' } }, (res) => {
      res.resume();
      if (res.statusCode !== 200) return fail('enroll', 'admin API answered ' + res.statusCode);
      const prov = ProvisioningDeviceClient.create(dpsHost, idScope, new ProvisioningHttp(new PortHttp()), security);
      prov.register((err, result) => {
        if (err) return fail('register', err);
        const st = result.registrationState || {};
        if (!st.assignedHub || !st.deviceId) return fail('register', 'no assignedHub/deviceId in ' + JSON.stringify(result));
        console.log(JSON.stringify({ ok: true, registrationId: regId, assignedHub: st.assignedHub, deviceId: st.deviceId }));
        process.exit(0);
      });
    });
    req.on('error', (e) => fail('enroll', e));
    req.end(body);
  });
});
