package agent_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/azsim"
	"github.com/gwagent/gwagent/internal/testenv"
	"github.com/gwagent/gwagent/keystore"
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

func keyExists(t *testing.T, uri string) bool {
	u, err := keystore.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	_, err = os.Stat(u.Path)
	return err == nil
}

func TestRenewalE2E(t *testing.T) {
	az := testenv.StartAzsim(t, azsim.Config{CertLifetime: 12 * time.Second})

	t.Run("ok/several renewals through the hub, each with a new key", func(t *testing.T) {
		d := newDevice(t, az, devOpts{regID: "gw-renew-hub", extra: fastRenewal})
		d.start()
		testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
		first := d.current()
		seen := map[string]bool{first.Serial: true}
		prev := first
		for len(seen) < 3 {
			testenv.Eventually(t, 30*time.Second, "a renewed certificate", func() bool {
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
		// Telemetry flows over the renewed identity.
		os.WriteFile(filepath.Join(d.cfg.Telemetry.SpoolDir, "after.json"), []byte(`{"afterRenewal":1}`), 0o644)
		testenv.Eventually(t, 10*time.Second, "a message sent with the renewed certificate", func() bool {
			return countBodies(az, "gw-renew-hub", "afterRenewal") == 1
		})
		var tw struct {
			Reported map[string]any `json:"reported"`
		}
		testenv.Eventually(t, 10*time.Second, "twin shows the new validity", func() bool {
			az.Admin("GET", "/hub/devices/gw-renew-hub/twin", nil, &tw)
			c, _ := tw.Reported["certificate"].(map[string]any)
			return c != nil && c["serial"] == d.current().Serial
		})
	})

	t.Run("ok/DPS fallback when the hub's certificate API fails", func(t *testing.T) {
		d := newDevice(t, az, devOpts{regID: "gw-renew-fallback", extra: fastRenewal})
		d.start()
		testenv.Eventually(t, 20*time.Second, "connected and reported", func() bool {
			var tw struct {
				Reported map[string]any `json:"reported"`
			}
			az.Admin("GET", "/hub/devices/gw-renew-fallback/twin", nil, &tw)
			return tw.Reported["certificate"] != nil
		})
		first := d.current()
		// The next hub request (the certificate request) gets a 400.
		az.Admin("POST", "/faults", map[string]any{"target": "hub", "status": 400, "count": 1}, nil)
		testenv.Eventually(t, 30*time.Second, "a renewed certificate", func() bool {
			s, err := storeCurrent(d)
			return err == nil && s.Serial != first.Serial
		})
		if via := d.current().Via; via != "dps" {
			t.Fatalf("renewed via %q, want dps after the hub answered 400", via)
		}
	})

	t.Run("ok/recovery after the certificate expired while stopped", func(t *testing.T) {
		d := newDevice(t, az, devOpts{regID: "gw-renew-expired", extra: fastRenewal})
		id, err := d.provision()
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Until(id.NotAfter) + time.Second)
		d.start()
		testenv.Eventually(t, 30*time.Second, "connected with a new certificate", func() bool {
			s, err := storeCurrent(d)
			return err == nil && s.Serial != id.Serial && d.status().State == "connected"
		})
		if d.current().Via != "dps" {
			t.Fatal("an expired certificate must be replaced through DPS")
		}
	})
}
