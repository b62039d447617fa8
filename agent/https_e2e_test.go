package agent_test

// DPS over HTTPS for the X.509 and symmetric-key credentials: the same
// provisioning as over MQTT, through azsim's REST endpoint.

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/provisioning"
)

// overHTTPS points a device at azsim's REST endpoint.
func overHTTPS(d *device) {
	d.t.Helper()
	b, err := os.ReadFile(d.path)
	if err != nil {
		d.t.Fatal(err)
	}
	s := strings.Replace(string(b), `dps_endpoint = "`+d.az.Info.DPSAddr+`"`,
		`dps_endpoint = "`+d.az.Info.DPSHTTPSAddr+`"`+"\ndps_transport = \"https\"", 1)
	d.write(s)
	if d.cfg.Identity.DPSTransport != provisioning.TransportHTTPS {
		d.t.Fatal("config not switched to HTTPS")
	}
}

func TestProvisionHTTPSE2E(t *testing.T) {
	t.Parallel()
	// DPS's retry-afters and assignment delay pass in a time the test
	// moves (the devices share the clock with azsim).
	ft, az := fakeAzsim(t, azsim.Config{})
	ft.Allow(10 * time.Minute)
	for _, sym := range []bool{false, true} {
		name := map[bool]string{false: "x509", true: "symmetric key"}[sym]
		t.Run("ok/"+name+" over HTTPS with 429 and slow assignment", func(t *testing.T) {
			regID := "gw-https-" + strings.ReplaceAll(name, " ", "-")
			d := newDevice(t, az, devOpts{clock: ft, regID: regID, symmetric: sym})
			overHTTPS(d)
			az.Admin("POST", "/faults", map[string]any{"target": "dps", "status": 429, "retryAfter": 1, "count": 1}, nil)
			az.Admin("POST", "/faults/assign-delay", map[string]any{"seconds": 1.5}, nil)
			defer az.Admin("POST", "/faults/assign-delay", map[string]any{"seconds": 0}, nil)
			id, err := d.provision()
			if err != nil {
				t.Fatal(err)
			}
			if id.DeviceID != regID || len(id.Chain) < 2 || id.Chain[0].Subject.CommonName != regID {
				t.Fatalf("identity %+v", id)
			}
			var regs []map[string]any
			az.Admin("GET", "/dps/registrations", nil, &regs)
			found := false
			for _, r := range regs {
				found = found || r["registrationId"] == regID
			}
			if !found {
				t.Fatal("DPS has no registration for the device")
			}
		})
	}
	t.Run("ok/the running agent provisions over HTTPS and sends telemetry", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-https-run"})
		overHTTPS(d)
		d.start()
		testenv.Eventually(t, 30*time.Second, "the first health message", func() bool { return len(received(az, "gw-https-run", "health")) > 0 })
	})
	t.Run("fail/wrong symmetric key over HTTPS, nothing stored", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-https-badkey", symmetric: true})
		overHTTPS(d)
		os.WriteFile(d.cfg.Onboarding.SymmetricKeyFile, []byte("c2VjcmV0LWJ1dC13cm9uZy1rZXktMDEyMzQ1Njc4OQ==\n"), 0o600)
		_, err := d.provision()
		if !errors.Is(err, provisioning.ErrCredentialRejected) || strings.Contains(err.Error(), "c2VjcmV0") {
			t.Fatalf("got %v, want ErrCredentialRejected without the key", err)
		}
		assertNotProvisioned(t, d)
	})
	t.Run("fail/onboarding certificate refused in the TLS handshake over HTTPS, no retry", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-https-tls-refused"})
		overHTTPS(d)
		assertRefusedInHandshake(t, d)
	})
	t.Run("fail/disabled enrollment over HTTPS", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-https-disabled", symmetric: true})
		overHTTPS(d)
		az.Admin("POST", "/dps/enrollments/"+azsim.SymmetricKeyGroup+"/disable", nil, nil)
		defer az.Admin("POST", "/dps/enrollments/"+azsim.SymmetricKeyGroup+"/enable", nil, nil)
		if _, err := d.provision(); !errors.Is(err, provisioning.ErrEnrollmentDisabled) {
			t.Fatalf("got %v, want ErrEnrollmentDisabled", err)
		}
		assertNotProvisioned(t, d)
	})
	for _, kind := range []string{"wrong-key", "broken-chain"} {
		t.Run("fail/issued chain "+kind+" over HTTPS is rejected", func(t *testing.T) {
			d := newDevice(t, az, devOpts{clock: ft, regID: "gw-https-tamper-" + kind})
			overHTTPS(d)
			az.Admin("POST", "/faults/tamper", map[string]any{"kind": kind}, nil)
			if _, err := d.provision(); !errors.Is(err, provisioning.ErrBadChain) {
				t.Fatalf("got %v, want ErrBadChain", err)
			}
			assertNotProvisioned(t, d)
		})
	}
	t.Run("fail/untrusted server certificate: clear error, no retries", func(t *testing.T) {
		d := newDevice(t, az, devOpts{regID: "gw-https-untrusted"})
		overHTTPS(d)
		other := azsimtest.Start(t, azsim.Config{})
		d.cfg.TrustBundle = other.Info.TrustBundle
		_, err := d.provision()
		if err == nil || !strings.Contains(err.Error(), "trust bundle does not accept") || strings.Contains(err.Error(), "gave up") {
			t.Fatalf("got %v, want a certificate error at once (not retried until the timeout)", err)
		}
	})
}
