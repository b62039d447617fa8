package agent_test

// TPM attestation end to end: a swtpm whose endorsement key is enrolled in
// azsim's DPS, provisioning over HTTPS with the TPM challenge, a P-384
// operational key in the same TPM, the hub connection and telemetry.

import (
	"context"
	"crypto/ecdsa"
	"encoding/base64"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/dps"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/tpm2"
	"github.com/gwagent/gwagent/provisioning"
)

// tpmDevice is a gateway with a swtpm and nothing else: no factory key, no
// chain, no registration id in the config.
type tpmDevice struct {
	*device
	sw    *testenv.SWTPM
	ek    []byte
	regID string
}

// readEK opens the swtpm briefly (it serves one connection at a time).
func readEK(t *testing.T, sock string) (ek, srk []byte) {
	t.Helper()
	ks, err := tpm2.Open(context.Background(), keystore.MustParse("tpm2:socket="+sock+";blob=/unused"))
	if err != nil {
		t.Fatal(err)
	}
	defer ks.Close()
	ek, srk, err = ks.(*tpm2.Store).DPSPublics(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ek, srk
}

// newTPMDevice starts a swtpm and, if enroll, records its EK in azsim the
// way a manufacturer would (admin API). extra is appended to the config.
func newTPMDevice(t *testing.T, az *azsimtest.Azsim, enroll bool, extra string) *tpmDevice {
	t.Helper()
	sw := testenv.StartSWTPM(t)
	ek, _ := readEK(t, sw.Sock)
	td := &tpmDevice{sw: sw, ek: ek, regID: provisioning.TPMRegistrationID(ek)}
	if enroll {
		enrollTPM(t, az, td.regID, ek)
	}
	dir := t.TempDir()
	td.device = &device{t: t, az: az, dir: dir, path: filepath.Join(dir, "gwagent.toml")}
	td.write(fmt.Sprintf(`state_dir = "%s/state"
trust_bundle = "%s"
[identity]
id_scope = "%s"
dps_endpoint = "%s"
provisioning_timeout = "30s"
[onboarding]
kind = "tpm"
tpm = "tpm2:socket=%s"
[operational]
key = "tpm2:socket=%s;blob=%s/state/op.tpmkey"
[telemetry]
interval = "1h"
%s`, dir, az.Info.TrustBundle, az.Info.IDScope, az.Info.DPSHTTPSAddr, sw.Sock, sw.Sock, dir, extra))
	return td
}

func enrollTPM(t *testing.T, az *azsimtest.Azsim, regID string, ek []byte) {
	t.Helper()
	if st := az.Admin("PUT", "/dps/tpm-enrollments/"+regID, map[string]any{"endorsementKey": base64.StdEncoding.EncodeToString(ek)}, nil); st != 200 {
		t.Fatalf("enroll: %d", st)
	}
}

func TestTPMAttestationE2E(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})

	t.Run("ok/TPM only: HTTPS, challenge, CSR, chain, hub, telemetry", func(t *testing.T) {
		d := newTPMDevice(t, az, true, "")
		r := d.start()
		testenv.Eventually(t, 30*time.Second, "the first health message", func() bool { return len(received(az, d.regID, "health")) > 0 })
		id := d.current()
		if id.RegistrationID != d.regID || id.DeviceID != d.regID || id.Via != "dps" {
			t.Fatalf("identity %+v, want registration id %s derived from the EK", id, d.regID)
		}
		chain := id.Chain
		leaf := chain[0]
		if k, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve.Params().BitSize != 384 {
			t.Fatalf("operational key is %T, want P-384", leaf.PublicKey)
		}
		if leaf.Subject.CommonName != d.regID || len(chain) < 2 {
			t.Fatalf("leaf CN %q, chain of %d", leaf.Subject.CommonName, len(chain))
		}

		t.Run("ok/hub refuses the identity: re-provision with TPM attestation", func(t *testing.T) {
			old := d.current().Serial
			if st := az.Admin("DELETE", "/hub/devices/"+d.regID, nil, nil); st >= 300 {
				t.Fatalf("delete device: %d", st)
			}
			az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
			testenv.Eventually(t, 40*time.Second, "re-provisioned and connected", func() bool {
				id, err := storeCurrent(d.device)
				return err == nil && id.Serial != old && d.status().State == "connected"
			})
		})
		r.stop()
	})

	t.Run("fail/a second TPM with another EK is refused", func(t *testing.T) {
		first := newTPMDevice(t, az, true, "")
		// The second gateway claims the first one's registration id.
		d := newTPMDevice(t, az, false, "")
		cfg := *d.cfg
		cfg.Identity.RegistrationID = first.regID
		d.cfg = &cfg
		_, err := d.provision()
		t.Log(err)
		if !errors.Is(err, provisioning.ErrCredentialRejected) {
			t.Fatalf("got %v, want the credential rejected", err)
		}
		assertNoIdentity(t, d.device)
	})

	t.Run("fail/not enrolled", func(t *testing.T) {
		d := newTPMDevice(t, az, false, "")
		_, err := d.provision()
		t.Log(err)
		if !errors.Is(err, provisioning.ErrCredentialRejected) {
			t.Fatalf("got %v, want the credential rejected", err)
		}
		assertNoIdentity(t, d.device)
	})

	for name, tamper := range map[string]func(t *testing.T) func([]byte) []byte{
		"corrupted": func(t *testing.T) func([]byte) []byte {
			return func(b []byte) []byte { b[len(b)/3] ^= 0x40; return b }
		},
		"for another TPM": func(t *testing.T) func([]byte) []byte {
			other := testenv.StartSWTPM(t)
			ek, srk := readEK(t, other.Sock)
			blob, _, err := dps.TPMChallenge(ek, srk)
			if err != nil {
				t.Fatal(err)
			}
			return func([]byte) []byte { return blob }
		},
	} {
		t.Run("fail/challenge "+name+": refused once, nothing stored", func(t *testing.T) {
			d := newTPMDevice(t, az, true, "")
			var calls atomic.Int32
			f := tamper(t)
			az.Server.DPS.TamperTPMChallenge(func(b []byte) []byte { calls.Add(1); return f(b) })
			defer az.Server.DPS.TamperTPMChallenge(nil)
			_, err := d.provision()
			t.Log(err)
			if !errors.Is(err, tpm2.ErrChallenge) {
				t.Fatalf("got %v, want tpm2.ErrChallenge", err)
			}
			if n := calls.Load(); n != 1 {
				t.Fatalf("DPS handed out %d challenges; a refused challenge must not be retried", n)
			}
			assertNoIdentity(t, d.device)
		})
	}
}

// TPM attestation for renewals: with prefer = "dps" every renewal is a new
// TPM-attested registration.
func TestTPMRenewalThroughDPS(t *testing.T) {
	t.Parallel()
	ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 12 * time.Second})
	d := newTPMDevice(t, az, true, fastRenewal+"prefer = \"dps\"\n")
	d.clock = ft
	d.start()
	testenv.Eventually(t, 30*time.Second, "connected", func() bool { return d.status().State == "connected" })
	seen := map[string]bool{d.current().Serial: true}
	for len(seen) < 3 {
		allowRenewal(ft, d.current(), 0.5) // one renewal at a time
		testenv.Eventually(t, 20*time.Second, "a renewal through DPS", func() bool {
			id, err := storeCurrent(d.device)
			if err != nil || seen[id.Serial] || d.status().State != "connected" {
				return false
			}
			seen[id.Serial] = true
			return true
		})
	}
	if via := d.current().Via; via != "dps" {
		t.Fatalf("renewed via %q, want dps", via)
	}
	n := len(received(az, d.regID, "health"))
	if n == 0 {
		t.Fatal("no telemetry")
	}
}

// assertNoIdentity: nothing was stored by a failed TPM provisioning.
func assertNoIdentity(t *testing.T, d *device) {
	t.Helper()
	s, _ := provisioning.OpenStore(d.cfg.StateDir)
	if _, err := s.Current(); !errors.Is(err, provisioning.ErrNotProvisioned) {
		t.Fatalf("a failed provisioning left an identity behind: %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(d.cfg.StateDir, "*.tpmkey*")); len(m) != 0 {
		t.Fatalf("a failed provisioning left key blobs behind: %v", m)
	}
}
