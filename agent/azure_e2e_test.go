package agent_test

// End-to-end tests of the places where Azure is harder than a friendly
// emulator (issue 12): azsim plays each, gwagent must survive it.

import (
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/azsim"
	"github.com/gwagent/gwagent/internal/testenv"
)

func registrations(az *testenv.Azsim, regID string) int {
	for _, r := range az.Server.DPS.Registrations() {
		if strings.EqualFold(r.RegistrationID, regID) {
			return r.Count
		}
	}
	return 0
}

// TestHandshakeRejectionReprovisions: the hub starts refusing the device's
// certificate with a TLS alert instead of CONNACK 5. gwagent must take
// repeated alerts as a refusal of its identity and register again, once,
// instead of retrying the same certificate forever as if the network failed.
func TestHandshakeRejectionReprovisions(t *testing.T) {
	az := testenv.StartAzsim(t, azsim.Config{})
	d := newDevice(t, az, devOpts{})
	r := d.start()
	testenv.Eventually(t, time.Minute, "connected", func() bool { return d.status().State == "connected" })
	old := d.current()
	before := registrations(az, old.RegistrationID)

	az.Server.Faults.RejectCertificate(old.Serial)
	az.Server.Hub.DropAll()
	testenv.Eventually(t, time.Minute, "a new identity in use", func() bool {
		st := d.status()
		return st.State == "connected" && st.CertSerial != old.Serial
	})
	if !strings.Contains(r.log.String(), "rejected our certificate in the TLS handshake") {
		t.Error("the log does not say the hub rejected the certificate in the handshake")
	}
	if n := registrations(az, old.RegistrationID) - before; n != 1 {
		t.Fatalf("%d DPS registrations after the rejection, want exactly 1", n)
	}
}
