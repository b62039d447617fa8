package agent_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/pkcs11"
	"github.com/gwagent/gwagent/provisioning"
)

// fastRenewal renews at half the lifetime with little jitter, so that
// certificates living ~12 s renew every ~6 s.
const fastRenewal = `
[renewal]
threshold = 0.5
jitter = "1s"
floor = "1s"
retry_min = "500ms"
retry_max = "2s"
issue_timeout = "10s"
`

// fakeAzsim starts azsim on a fake clock that the devices of the test share
// (device.clock): certificates are issued, checked and renewed in its time,
// which the test moves on. It may run a few seconds at first, for
// provisioning and connecting (DPS's retry-after, backoff).
func fakeAzsim(t *testing.T, cfg azsim.Config) (*testenv.FakeTime, *azsimtest.Azsim) {
	ft := testenv.StartFakeTime(t, time.Now())
	ft.Allow(3 * time.Second)
	cfg.Now = ft.Now
	return ft, azsimtest.Start(t, cfg)
}

// allowRenewal lets the clock run to the planned renewal of id at
// threshold (jitter only moves it earlier), and three seconds more for
// its retries and DPS's retry-after, but not to the next one.
func allowRenewal(ft *testenv.FakeTime, id *provisioning.Identity, threshold float64) {
	life := id.NotAfter.Sub(id.NotBefore)
	ft.AllowUntil(id.NotBefore.Add(time.Duration(threshold * float64(life))).Add(3 * time.Second))
}

// keyExists opens the key through the key store, whatever the backend.
func keyExists(t *testing.T, uri string) bool {
	u, err := keystore.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	keys := agent.NewKeys()
	defer keys.Close()
	_, err = keys.Signer(context.Background(), u)
	if err != nil && !errors.Is(err, keystore.ErrKeyNotFound) {
		t.Fatalf("opening %s: %v", u, err)
	}
	return err == nil
}

func TestRenewalE2E(t *testing.T) {
	ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 12 * time.Second})

	for _, be := range []string{"file", "tpm", "pkcs11"} {
		t.Run("ok/several renewals through the hub, each with a new key/"+be, func(t *testing.T) {
			opKey := ""
			switch be {
			case "tpm":
				sw := testenv.StartSWTPM(t)
				opKey = "tpm2:socket=" + sw.Sock + ";blob=" + filepath.Join(t.TempDir(), "op.tpmkey")
			case "pkcs11":
				if !pkcs11.Supported {
					t.Skip("this build has no PKCS#11 (nopkcs11 or CGO_ENABLED=0); make test uses the full build")
				}
				opKey = testenv.StartSoftHSM(t, "gw", "1357").URI("operational")
			}
			renewRepeatedly(t, ft, az, "gw-renew-hub-"+be, opKey)
		})
	}

	t.Run("ok/DPS fallback when the hub's certificate API fails", func(t *testing.T) {
		d := newDevice(t, az, devOpts{regID: "gw-renew-fallback", extra: fastRenewal})
		d.clock = ft
		ft.Allow(3 * time.Second)
		d.start()
		testenv.Eventually(t, 20*time.Second, "connected and reported", func() bool {
			var tw struct {
				Reported map[string]any `json:"reported"`
			}
			az.Admin("GET", "/hub/devices/gw-renew-fallback/twin", nil, &tw)
			return tw.Reported["certificate"] != nil && tw.Reported["telemetryInterval"] != nil // the whole twin sync, so the fault below hits the certificate request
		})
		first := d.current()
		// The next hub request (the certificate request) gets a 400.
		az.Admin("POST", "/faults", map[string]any{"target": "hub", "status": 400, "count": 1}, nil)
		allowRenewal(ft, first, 0.5)
		testenv.Eventually(t, 10*time.Second, "a renewed certificate", func() bool {
			s, err := storeCurrent(d)
			return err == nil && s.Serial != first.Serial
		})
		if via := d.current().Via; via != "dps" {
			t.Fatalf("renewed via %q, want dps after the hub answered 400", via)
		}
	})

	t.Run("ok/recovery after the certificate expired while stopped", func(t *testing.T) {
		d := newDevice(t, az, devOpts{regID: "gw-renew-expired", extra: fastRenewal})
		d.clock = ft
		ft.Allow(3 * time.Second)
		id, err := d.provision()
		if err != nil {
			t.Fatal(err)
		}
		ft.Jump(id.NotAfter.Sub(ft.Now()) + time.Second) // the gateway was off
		ft.Allow(3 * time.Second)
		d.start()
		testenv.Eventually(t, 10*time.Second, "connected with a new certificate", func() bool {
			s, err := storeCurrent(d)
			return err == nil && s.Serial != id.Serial && d.status().State == "connected"
		})
		if d.current().Via != "dps" {
			t.Fatal("an expired certificate must be replaced through DPS")
		}
	})
}

func renewRepeatedly(t *testing.T, ft *testenv.FakeTime, az *azsimtest.Azsim, regID, opKey string) {
	d := newDevice(t, az, devOpts{regID: regID, opKey: opKey, extra: fastRenewal})
	d.clock = ft
	ft.Allow(3 * time.Second)
	d.start()
	testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
	first := d.current()
	seen := map[string]bool{first.Serial: true}
	prev := first
	for len(seen) < 3 {
		allowRenewal(ft, prev, 0.5) // one renewal at a time
		testenv.Eventually(t, 10*time.Second, "a renewed certificate", func() bool {
			s, err := storeCurrent(d)
			return err == nil && !seen[s.Serial]
		})
		cur := d.current()
		seen[cur.Serial] = true
		if cur.Via != "hub" {
			t.Fatalf("renewed via %q, want hub", cur.Via)
		}
		if cur.KeyURI == prev.KeyURI {
			t.Fatal("renewal reused the key")
		}
		testenv.Eventually(t, 5*time.Second, "old key deleted", func() bool { return !keyExists(t, prev.KeyURI) })
		if !keyExists(t, cur.KeyURI) {
			t.Fatal("the new key is missing")
		}
		prev = cur
	}
	// Telemetry flows over the renewed identity. Renamed into place: the
	// fake clock is hours ahead of the file times the kernel gives, so a
	// file written in place would count as settled while still empty.
	spoolPut(t, d.cfg.Telemetry.SpoolDir, "after.json", []byte(`{"afterRenewal":1}`))
	testenv.Eventually(t, 10*time.Second, "a message sent with the renewed certificate", func() bool {
		return countBodies(az, regID, "afterRenewal") == 1
	})
	var tw struct {
		Reported map[string]any `json:"reported"`
	}
	testenv.Eventually(t, 10*time.Second, "twin shows the new validity", func() bool {
		az.Admin("GET", "/hub/devices/"+regID+"/twin", nil, &tw)
		c, _ := tw.Reported["certificate"].(map[string]any)
		return c != nil && c["serial"] == d.current().Serial
	})
}

// The hub refuses a staged pair (here: a certificate from a CA the hub does
// not trust): the agent rolls back to the current pair, deletes the new key
// and keeps the old one.
// The hub refuses a renewed pair with a TLS alert (azsim's default, as Azure
// may) or with CONNACK 5 (--gentle): either way it is rolled back.
func TestRenewalRollback(t *testing.T) {
	t.Parallel()
	for name, gentle := range map[string]bool{"ok/tls-alert": false, "ok/connack-5": true} {
		t.Run(name, func(t *testing.T) { renewalRollback(t, gentle) })
	}
}

func renewalRollback(t *testing.T, gentle bool) {
	az := azsimtest.Start(t, azsim.Config{Gentle: gentle})
	d := newDevice(t, az, devOpts{regID: "gw-rollback"})
	cur, err := d.provision()
	if err != nil {
		t.Fatal(err)
	}
	// Stage a next generation: a new key in the free slot with a
	// self-signed certificate the hub will refuse.
	alt, _ := keystore.MustParse(cur.KeyURI).Alternate()
	keys := agent.NewKeys()
	signer, err := keys.Fresh(context.Background(), alt)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(42), Subject: pkix.Name{CommonName: "gw-rollback"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	keys.Close()
	self, _ := x509.ParseCertificate(der)
	store, _ := provisioning.OpenStore(d.cfg.StateDir)
	if _, err := store.Stage(&provisioning.Identity{KeyURI: alt.Secret(), RegistrationID: "gw-rollback", DeviceID: "gw-rollback",
		AssignedHub: cur.AssignedHub, Via: "hub"}, []*x509.Certificate{self}); err != nil {
		t.Fatal(err)
	}
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "connected with the current pair after the rollback", func() bool {
		return d.status().State == "connected" && strings.Contains(r.log.String(), "rolling back")
	})
	if _, err := store.Next(); !errors.Is(err, provisioning.ErrNotProvisioned) {
		t.Fatalf("the refused generation is still staged: %v", err)
	}
	if d.current().Serial != cur.Serial {
		t.Fatal("the current identity changed")
	}
	if keyExists(t, alt.String()) {
		t.Fatal("the refused new key was kept")
	}
	if !keyExists(t, cur.KeyURI) {
		t.Fatal("the current key was deleted")
	}
}

// The agent stops while its certificate request is in flight at the hub;
// after the restart its new request gets 409 (one is active), it replaces
// the old one, and the renewal completes through the hub.
func TestRenewal409Replace(t *testing.T) {
	t.Parallel()
	// With the request recorded, gwagent waits for its own request after
	// the restart (never "replace", which would cancel it); without the
	// record (lost), the hub's 409 names a request gwagent does not know,
	// and it replaces it.
	for name, lost := range map[string]bool{"ok/own-request-recovered": false, "ok/unknown-request-replaced": true} {
		t.Run(name, func(t *testing.T) { renewal409(t, lost) })
	}
}

func renewal409(t *testing.T, lostRecord bool) {
	// The clock stays short of the end of the wait for the hub's answer
	// (three quarters of the lifetime): the answer comes in the hub's
	// IssueDelay, wall time.
	ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 40 * time.Second, IssueDelay: 3 * time.Second})
	d := newDevice(t, az, devOpts{regID: "gw-renew-409", extra: fastRenewal})
	d.clock = ft
	r := d.start()
	testenv.Eventually(t, 10*time.Second, "connected", func() bool { return d.status().State == "connected" })
	allowRenewal(ft, d.current(), 0.5)
	testenv.Eventually(t, 10*time.Second, "the hub accepted a certificate request", func() bool {
		return strings.Contains(r.log.String(), "the hub accepted the certificate request")
	})
	s0 := d.current().Serial
	r.stop()
	if lostRecord {
		if err := os.Remove(filepath.Join(d.cfg.StateDir, "renewal-pending.json")); err != nil {
			t.Fatal(err)
		}
	}
	r = d.start()
	testenv.Eventually(t, 30*time.Second, "renewed through the hub after the restart", func() bool {
		id, err := storeCurrent(d)
		return err == nil && id.Serial != s0 && id.Via == "hub"
	})
	replaced := strings.Contains(r.log.String(), "replacing it")
	if lostRecord != replaced {
		t.Fatalf("replaced an in-flight request: %v, want %v", replaced, lostRecord)
	}
	if !lostRecord && !strings.Contains(r.log.String(), "waiting for the certificate request sent before the restart") {
		t.Fatal("the recorded request was not recovered")
	}
}

// The 202 arrives, then the connection drops: the 200 comes on the next
// connection and is used.
func TestRenewalAnswerAfterReconnect(t *testing.T) {
	t.Parallel()
	ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 40 * time.Second, IssueDelay: 3 * time.Second})
	d := newDevice(t, az, devOpts{regID: "gw-renew-late", extra: strings.Replace(fastRenewal, `issue_timeout = "10s"`, `issue_timeout = "30s"`, 1)})
	d.clock = ft
	r := d.start()
	testenv.Eventually(t, 10*time.Second, "connected", func() bool { return d.status().State == "connected" })
	allowRenewal(ft, d.current(), 0.5)
	testenv.Eventually(t, 10*time.Second, "the hub accepted a certificate request", func() bool {
		return strings.Contains(r.log.String(), "the hub accepted the certificate request")
	})
	az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
	testenv.Eventually(t, 30*time.Second, "the certificate used after the reconnect", func() bool {
		return strings.Contains(r.log.String(), "the certificate arrived after a reconnect") &&
			strings.Contains(r.log.String(), "certificate renewed and in use")
	})
}

// The hub's answer to a renewal is lost in a connection drop (azsim's
// "lose-answer" fault: the 200 counts as sent, at QoS 0, and the connection
// closes before the agent reads it), and the hub is back at once. The hub
// never sends that answer again, and the agent must not wait out the
// hour's operationExpires: a minute after the reconnect it asks again for
// the same key, without "replace", and the hub, having nothing active,
// issues the certificate. All within minutes, through the hub (no DPS
// re-registration).
func TestRenewalAnswerLostInDrop(t *testing.T) {
	ft, d, r, old := hubRenewalAccepted(t, azsim.Config{}, "gw-renew-lost", fastRenewal, func(az *azsimtest.Azsim) {
		if st := az.Admin("POST", "/faults/credentials", map[string]any{"mode": "lose-answer"}, nil); st >= 300 {
			t.Fatalf("fault: %d", st)
		}
	})
	accepted := ft.Now()
	// Minutes, where the hub's operationExpires gave an hour. The reconnect
	// is real I/O the fake clock cannot see: in steps of a second, the
	// clock cannot run minutes ahead of it while TLS is slow (the race
	// detector, a loaded machine), and the agent's minute of grace after
	// the reconnect still fits in the five.
	ft.MaxStep(time.Second)
	ft.Allow(5 * time.Minute)
	testenv.Eventually(t, 30*time.Second, "renewed after asking again", func() bool {
		l := r.log.String()
		return strings.Contains(l, "its answer was lost with the connection") && strings.Contains(l, "certificate renewed and in use")
	})
	if took := ft.Now().Sub(accepted); took > 5*time.Minute {
		t.Fatalf("the renewal took %v after the lost answer", took)
	}
	cur := d.current()
	if cur.Serial == old.Serial || cur.Via != "hub" {
		t.Fatalf("identity %s via %q, want a new certificate from the hub", cur.Serial, cur.Via)
	}
	if strings.Contains(r.log.String(), "re-registering with DPS") {
		t.Fatal("the agent fell back to DPS instead of asking the hub again")
	}
}

// The same wait for an answer after a reconnect, but the hub is still
// issuing (azsim's issuance takes a few seconds of real time, while the
// agent's clock runs minutes): asked again, the hub answers 409 naming the
// request, and the agent keeps waiting for it, never replacing it; the
// answer then comes on the new connection.
func TestRenewalAskAgainWhileIssuing(t *testing.T) {
	ft, d, r, old := hubRenewalAccepted(t, azsim.Config{IssueDelay: 4 * time.Second}, "gw-renew-ask",
		strings.Replace(fastRenewal, `issue_timeout = "10s"`, `issue_timeout = "2h"`, 1), nil)
	d.az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
	ft.MaxStep(time.Second) // as in TestRenewalAnswerLostInDrop
	ft.Allow(5 * time.Minute)
	testenv.Eventually(t, 30*time.Second, "renewed with the answer to the first request", func() bool {
		return strings.Contains(r.log.String(), "certificate renewed and in use")
	})
	l := r.log.String()
	for _, want := range []string{"asking the hub whether it still works on it", "the hub is still working on our earlier certificate request; waiting for it", "the certificate arrived after a reconnect"} {
		if !strings.Contains(l, want) {
			t.Errorf("the log does not say %q", want)
		}
	}
	if strings.Contains(l, "replacing it") || strings.Contains(l, "answer was lost") {
		t.Fatal("the agent replaced a request the hub was still working on")
	}
	if cur := d.current(); cur.Via != "hub" || cur.Serial == old.Serial {
		t.Fatalf("identity %s via %q, want a new certificate from the hub", cur.Serial, cur.Via)
	}
}

// hubRenewalAccepted starts a device on a four-hour certificate (the
// renewal at two hours, the hub's operationExpires an hour after its 202,
// well before the quarter of the lifetime DPS would get), lets setup
// change azsim, moves the shared fake clock to the renewal and waits until
// the hub accepted the request.
func hubRenewalAccepted(t *testing.T, cfg azsim.Config, regID, extra string, setup func(*azsimtest.Azsim)) (*testenv.FakeTime, *device, *running, *provisioning.Identity) {
	t.Helper()
	cfg.CertLifetime = 4 * time.Hour
	ft, az := fakeAzsim(t, cfg)
	d := newDevice(t, az, devOpts{regID: regID, extra: extra})
	d.clock = ft
	r := d.start()
	testenv.Eventually(t, 10*time.Second, "connected", func() bool { return d.status().State == "connected" })
	old := d.current()
	if setup != nil {
		setup(az)
	}
	ft.Jump(old.NotBefore.Add(old.NotAfter.Sub(old.NotBefore)/2 - 10*time.Second).Sub(ft.Now()))
	allowRenewal(ft, old, 0.5)
	testenv.Eventually(t, 10*time.Second, "the hub accepted a certificate request", func() bool {
		return strings.Contains(r.log.String(), "the hub accepted the certificate request")
	})
	return ft, d, r, old
}
