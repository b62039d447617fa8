package provisioning

import (
	"strings"
	"testing"
)

// FuzzDPSReply feeds arbitrary topics and bodies to the DPS reply decoders.
// They must never panic, and anything they accept as "assigned" must carry
// the fields the agent relies on. make test runs it briefly; run longer with
// go test -run=^$ -fuzz=FuzzDPSReply -fuzztime=5m ./provisioning
func FuzzDPSReply(f *testing.F) {
	f.Add("$dps/registrations/res/202/?$rid=1&retry-after=3", []byte(`{"operationId":"4.d0a6","status":"assigning"}`))
	f.Add("$dps/registrations/res/200/?$rid=1", []byte(`{"operationId":"x","status":"assigned","registrationState":{"registrationId":"d","assignedHub":"h","deviceId":"d","status":"assigned","issuedCertificateChain":["MIIB","MIIC"]}}`))
	f.Add("$dps/registrations/res/401/?$rid=1", []byte(`{"errorCode":401002,"trackingId":"t","message":"Invalid certificate.","timestampUtc":"2020-04-10T05:24:22.47Z"}`))
	f.Add("$dps/registrations/res/429/?$RID=7&Retry-After=x", []byte(`null`))
	f.Add("$dps/registrations/res/200/?$rid=1", []byte(`{"operationId":"x","status":"failed","registrationState":{"errorCode":400209,"errorMessage":"no"}}`))
	f.Fuzz(func(t *testing.T, topic string, body []byte) {
		r, err := parseResponseTopic(topic)
		if err == nil {
			if r.status < 100 || r.status > 999 || r.retryAfter < 0 {
				t.Fatalf("accepted bad topic values %+v", r)
			}
			_ = decodeServiceError(r.status, r.retryAfter, body).Error()
		}
		op, err := decodeOperation(body)
		if err == nil {
			if op.OperationID == "" {
				t.Fatal("accepted an operation without id")
			}
			if op.Status == StatusAssigned && (op.RegistrationState == nil || op.RegistrationState.DeviceID == "" || op.RegistrationState.AssignedHub == "") {
				t.Fatal("accepted assigned without hub/device id")
			}
			if rs := op.RegistrationState; rs != nil && rs.IssuedCertificateChain != nil {
				if certs, err := DecodeChain(rs.IssuedCertificateChain); err == nil && len(certs) == 0 {
					t.Fatal("DecodeChain accepted an empty chain")
				}
			}
		} else if !strings.Contains(err.Error(), "DPS") {
			t.Fatalf("decode error does not say it is about DPS: %v", err)
		}
	})
}
