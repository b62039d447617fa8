package agent_test

// End-to-end tests: a real azsim (DPS, IoT Hub on an embedded MQTT broker,
// real TLS) started in-process, and gwagent's agent package driving it.
//
// Each starts its own azsim, devices and directories, and runs in parallel
// with the others (t.Parallel), except those that look at the whole process
// (its goroutines), set the environment (SoftHSM2's SOFTHSM2_CONF too), or
// measure how long something took in wall time: those run first, alone.

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/clocksync"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/keystore/pkcs11"
	"github.com/gwagent/gwagent/provisioning"
)

// device is one gateway's config and state directory.
type device struct {
	t    *testing.T
	az   *azsimtest.Azsim
	dir  string
	path string
	cfg  *agent.Config
	// tweak, if set, adjusts the agent's options before start.
	tweak func(*agent.Options)
	// clock, if set, is the agent's clock (nil: the real one).
	clock clock.Clock
}

type devOpts struct {
	regID     string
	symmetric bool   // symmetric-key onboarding instead of X.509
	opKey     string // operational key URI (default: file key in the state dir)
	onKey     string // onboarding key URI (default: file key)
	extra     string // appended TOML
	// clock, if set, is the device's clock (the agent's and provision's),
	// shared with azsim (fakeAzsim).
	clock *testenv.FakeTime
}

func newDevice(t *testing.T, az *azsimtest.Azsim, o devOpts) *device {
	t.Helper()
	if o.regID == "" {
		o.regID = "gw-" + strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-"))
		if len(o.regID) > 60 {
			o.regID = o.regID[:60]
		}
	}
	d := &device{t: t, az: az, dir: t.TempDir()}
	if o.clock != nil {
		d.clock = o.clock
	}
	d.path = filepath.Join(d.dir, "gwagent.toml")
	if o.opKey == "" {
		o.opKey = "file:" + filepath.Join(d.dir, "state", "device.key")
	}
	if o.onKey == "" {
		o.onKey = "file:" + filepath.Join(d.dir, "onboarding.key")
	}
	onboarding := fmt.Sprintf("kind = \"x509\"\nkey = \"%s\"\nchain = \"%s/onboarding-chain.pem\"\n", o.onKey, d.dir)
	if o.symmetric {
		var k struct{ DeviceKey string }
		if st := az.Admin("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId="+o.regID, nil, &k); st != 200 {
			t.Fatalf("derive-key: %d", st)
		}
		keyFile := filepath.Join(d.dir, "device.sas")
		if err := os.WriteFile(keyFile, []byte(k.DeviceKey+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		onboarding = fmt.Sprintf("kind = \"symmetric_key\"\nsymmetric_key_file = \"%s\"\n", keyFile)
	}
	toml := fmt.Sprintf(`state_dir = "%s/state"
trust_bundle = "%s"
log_level = "debug"
[identity]
id_scope = "%s"
registration_id = "%s"
dps_endpoint = "%s"
provisioning_timeout = "30s"
[onboarding]
%s
[operational]
key = "%s"
[telemetry]
interval = "1h"
%s`, d.dir, az.Info.TrustBundle, az.Info.IDScope, o.regID, az.Info.DPSAddr, onboarding, o.opKey, o.extra)
	d.write(toml)
	if !o.symmetric {
		d.factory()
	}
	return d
}

func (d *device) write(toml string) {
	d.t.Helper()
	if err := os.WriteFile(d.path, []byte(toml), 0o600); err != nil {
		d.t.Fatal(err)
	}
	cfg, err := agent.LoadConfig(d.path)
	if err != nil {
		d.t.Fatal(err)
	}
	d.cfg = cfg
}

// factory does the onboarding step: key, CSR, azsim's factory CA, install.
func (d *device) factory() {
	d.t.Helper()
	ctx := context.Background()
	keys := agent.NewKeys()
	defer keys.Close()
	der, _, err := agent.OnboardCSR(ctx, d.cfg, keys)
	if err != nil {
		d.t.Fatal(err)
	}
	chain, err := d.az.Server.FactorySign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	if err != nil {
		d.t.Fatal(err)
	}
	f := filepath.Join(d.dir, "factory-chain.pem")
	os.WriteFile(f, chain, 0o644)
	if _, err := agent.OnboardInstall(ctx, d.cfg, keys, f, time.Now()); err != nil {
		d.t.Fatal(err)
	}
}

func (d *device) provision() (*provisioning.Identity, error) {
	keys := agent.NewKeys()
	defer keys.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return agent.Provision(ctx, d.cfg, keys, agent.ProvisionOptions{Clock: d.clock})
}

// assertRefusedInHandshake makes azsim's DPS refuse d's onboarding
// certificate with a TLS alert and checks that provisioning fails at once
// with ErrCredentialRejected and advice, instead of retrying until the
// provisioning timeout (which would end in "gave up after").
func assertRefusedInHandshake(t *testing.T, d *device) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.dir, "onboarding-chain.pem"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("no certificate in onboarding-chain.pem")
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if st := d.az.Admin("POST", "/faults/reject-certificate", map[string]any{"serial": leaf.SerialNumber.Text(16)}, nil); st >= 300 {
		t.Fatalf("arm reject-certificate: %d", st)
	}
	d.cfg.Identity.ProvisioningTimeout.Duration = 50 * time.Second
	_, err = d.provision()
	if !errors.Is(err, provisioning.ErrCredentialRejected) {
		t.Fatalf("got %v, want ErrCredentialRejected", err)
	}
	if strings.Contains(err.Error(), "gave up") || !strings.Contains(err.Error(), "TLS handshake") || !strings.Contains(err.Error(), "enrollment") {
		t.Fatalf("error %q: want a refusal in the TLS handshake, no retries, and advice about the enrollment", err)
	}
	assertNotProvisioned(t, d)
}

// running is an agent.Run in the background.
type running struct {
	a      *agent.Agent
	cancel context.CancelFunc
	done   chan error
	log    *testenv.Buffer // the agent's log, for assertions
}

func (d *device) start() *running {
	d.t.Helper()
	logs := &testenv.Buffer{}
	opts := agent.Options{
		Logger:      slog.New(slog.NewTextHandler(io.MultiWriter(testWriter{d.t}, logs), &slog.HandlerOptions{Level: slog.LevelDebug})),
		Version:     "test",
		Backoff:     retry.Policy{Min: 100 * time.Millisecond, Max: time.Second},
		ClockPoll:   100 * time.Millisecond,
		Reprovision: agent.ReprovisionPolicy{Backoff: retry.Policy{Min: 2 * time.Second, Max: 8 * time.Second}, PerHour: 4},
		// Not this machine's NTP state: tests of the clock set their own.
		ClockSync: func(time.Time) clocksync.Reading { return clocksync.Reading{Source: clocksync.NTP, Detail: "test"} },
	}
	opts.Clock = d.clock
	if d.tweak != nil {
		d.tweak(&opts)
	}
	a, err := agent.New(d.path, opts)
	if err != nil {
		d.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{a: a, cancel: cancel, done: make(chan error, 1), log: logs}
	go func() { r.done <- a.Run(ctx) }()
	d.t.Cleanup(r.stop)
	return r
}

func (r *running) stop() {
	r.cancel()
	<-r.done
	r.done <- nil // later stops return at once
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func (d *device) status() *agent.Status {
	st, err := agent.ReadStatus(d.cfg.StateDir)
	if err != nil {
		return &agent.Status{}
	}
	return st
}

func (d *device) current() *provisioning.Identity {
	d.t.Helper()
	s, err := provisioning.OpenStore(d.cfg.StateDir)
	if err != nil {
		d.t.Fatal(err)
	}
	id, err := s.Current()
	if err != nil {
		d.t.Fatal(err)
	}
	return id
}

// received counts the messages azsim got from deviceID with a filter on
// the application property "type".
func received(az *azsimtest.Azsim, deviceID, typ string) []map[string]any {
	var out []map[string]any
	for _, m := range az.Telemetry() {
		props, _ := m["properties"].(map[string]any)
		app, _ := props["application"].(map[string]any)
		if m["deviceId"] == deviceID && (typ == "" || app["type"] == typ) {
			out = append(out, m)
		}
	}
	return out
}

func TestProvisionE2E(t *testing.T) {
	// DPS's retry-afters and assignment delay pass in a time the test
	// moves: no registration below waits for them in wall time.
	ft, az := fakeAzsim(t, azsim.Config{})
	ft.Allow(10 * time.Minute)
	t.Run("ok/x509 onboarding, P-384 chain from the issuing CA", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-x509-1"})
		id, err := d.provision()
		if err != nil {
			t.Fatal(err)
		}
		if id.DeviceID != "gw-x509-1" || id.AssignedHub != az.Info.HubHostName {
			t.Fatalf("identity %+v", id)
		}
		roots := x509.NewCertPool()
		roots.AddCert(az.Server.PKI.IssuingRoot.Cert)
		inter := x509.NewCertPool()
		inter.AddCert(id.Chain[1])
		if _, err := id.Chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Fatalf("stored chain does not verify to azsim's issuing root: %v", err)
		}
		if id.Chain[0].SignatureAlgorithm != x509.ECDSAWithSHA384 {
			t.Fatalf("leaf signed with %v", id.Chain[0].SignatureAlgorithm)
		}
		// A second provisioning rotates to the other key slot and commits.
		id2, err := d.provision()
		if err != nil {
			t.Fatal(err)
		}
		if id2.KeyURI == id.KeyURI || id2.Serial == id.Serial {
			t.Fatal("re-provisioning reused the key or the certificate")
		}
	})
	t.Run("ok/keys in a TPM (swtpm): onboarding by blob, operational by handle", func(t *testing.T) {
		sw := testenv.StartSWTPM(t)
		dir := t.TempDir()
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-tpm-1",
			onKey: "tpm2:socket=" + sw.Sock + ";blob=" + filepath.Join(dir, "onboarding.tpmkey"),
			opKey: "tpm2:socket=" + sw.Sock + ";handle=0x81000100"})
		id, err := d.provision()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(id.KeyURI, "handle=0x81000100") {
			t.Fatalf("key %s", id.KeyURI)
		}
		// Re-provisioning puts the new key at the alternate handle.
		id2, err := d.provision()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(id2.KeyURI, "handle=0x81000101") {
			t.Fatalf("second key %s", id2.KeyURI)
		}
	})
	t.Run("ok/keys on a PKCS#11 token (SoftHSM2)", func(t *testing.T) {
		if !pkcs11.Supported {
			t.Skip("this build has no PKCS#11 (nopkcs11 or CGO_ENABLED=0); make test uses the full build")
		}
		h := testenv.StartSoftHSM(t, "gw", "2468")
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-p11-1", onKey: h.URI("onboarding"), opKey: h.URI("operational")})
		for range 2 { // the second rotates to the "-b" object
			if _, err := d.provision(); err != nil {
				t.Fatal(err)
			}
		}
		if id := d.current(); !strings.Contains(id.KeyURI, "object=operational-b") {
			t.Fatalf("key %s", id.KeyURI)
		}
	})
	t.Run("ok/symmetric-key onboarding", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-sym-1", symmetric: true})
		id, err := d.provision()
		if err != nil {
			t.Fatal(err)
		}
		if id.DeviceID != "gw-sym-1" || len(id.Chain) != 3 {
			t.Fatalf("identity %+v with %d certificates", id, len(id.Chain))
		}
	})
	t.Run("ok/429 then success", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-throttled"})
		az.Admin("POST", "/faults", map[string]any{"target": "dps", "status": 429, "retryAfter": 1, "count": 2}, nil)
		if _, err := d.provision(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("ok/retry-after and polling while DPS assigns slowly", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-slow"})
		az.Admin("POST", "/faults/assign-delay", map[string]any{"seconds": 2.5}, nil)
		defer az.Admin("POST", "/faults/assign-delay", map[string]any{"seconds": 0}, nil)
		start := ft.Now()
		if _, err := d.provision(); err != nil {
			t.Fatal(err)
		}
		if ft.Now().Sub(start) < 2*time.Second {
			t.Fatal("provisioning finished before DPS had assigned")
		}
	})
	for _, kind := range []string{"wrong-key", "wrong-cn", "broken-chain"} {
		t.Run("fail/issued chain "+kind+" is rejected, nothing stored", func(t *testing.T) {
			d := newDevice(t, az, devOpts{clock: ft, regID: "gw-tamper-" + kind})
			az.Admin("POST", "/faults/tamper", map[string]any{"kind": kind}, nil)
			_, err := d.provision()
			if !errors.Is(err, provisioning.ErrBadChain) {
				t.Fatalf("got %v, want ErrBadChain", err)
			}
			assertNotProvisioned(t, d)
		})
	}
	t.Run("fail/disabled enrollment, nothing stored", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-disabled", symmetric: true})
		az.Admin("POST", "/dps/enrollments/"+azsim.SymmetricKeyGroup+"/disable", nil, nil)
		defer az.Admin("POST", "/dps/enrollments/"+azsim.SymmetricKeyGroup+"/enable", nil, nil)
		_, err := d.provision()
		if !errors.Is(err, provisioning.ErrEnrollmentDisabled) {
			t.Fatalf("got %v, want ErrEnrollmentDisabled", err)
		}
		assertNotProvisioned(t, d)
	})
	t.Run("fail/wrong symmetric key is rejected without retry", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-badkey", symmetric: true})
		os.WriteFile(d.cfg.Onboarding.SymmetricKeyFile, []byte("c2VjcmV0LWJ1dC13cm9uZy1rZXktMDEyMzQ1Njc4OQ==\n"), 0o600)
		_, err := d.provision()
		if !errors.Is(err, provisioning.ErrCredentialRejected) {
			t.Fatalf("got %v, want ErrCredentialRejected", err)
		}
		if strings.Contains(err.Error(), "c2VjcmV0") {
			t.Fatal("the error leaks the key")
		}
		assertNotProvisioned(t, d)
	})
	t.Run("fail/onboarding certificate refused in the TLS handshake, no retry", func(t *testing.T) {
		d := newDevice(t, az, devOpts{clock: ft, regID: "gw-tls-refused"})
		assertRefusedInHandshake(t, d)
	})
	t.Run("fail/500s exhaust the retries with a clear error", func(t *testing.T) {
		d := newDevice(t, az, devOpts{regID: "gw-5xx"})
		az.Admin("POST", "/faults", map[string]any{"target": "dps", "status": 503, "retryAfter": 1, "count": 50}, nil)
		defer az.Admin("DELETE", "/faults", nil, nil)
		d.cfg.Identity.ProvisioningTimeout.Duration = 2 * time.Second
		_, err := d.provision()
		if err == nil || !strings.Contains(err.Error(), "503") {
			t.Fatalf("got %v, want an error naming DPS's 503", err)
		}
		assertNotProvisioned(t, d)
	})
}

func assertNotProvisioned(t *testing.T, d *device) {
	t.Helper()
	s, _ := provisioning.OpenStore(d.cfg.StateDir)
	if _, err := s.Current(); !errors.Is(err, provisioning.ErrNotProvisioned) {
		t.Fatalf("a failed provisioning left an identity behind: %v", err)
	}
	if _, err := os.Stat(filepath.Join(d.cfg.StateDir, "device.key")); err == nil {
		t.Fatal("a failed provisioning left its new key behind")
	}
}

func TestRunE2E(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-run-1"})
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "the first health message", func() bool { return len(received(az, "gw-run-1", "health")) > 0 })

	t.Run("ok/spool files are sent and deleted after PUBACK", func(t *testing.T) {
		for i := range 5 {
			p := filepath.Join(d.cfg.Telemetry.SpoolDir, fmt.Sprintf("m%d.json", i))
			os.WriteFile(p+".tmp", []byte(fmt.Sprintf(`{"seq":%d}`, i)), 0o644)
			os.Rename(p+".tmp", p)
		}
		testenv.Eventually(t, 10*time.Second, "5 application messages", func() bool { return len(received(az, "gw-run-1", "")) >= 6 })
		testenv.Eventually(t, 5*time.Second, "spool emptied", func() bool {
			m, _ := filepath.Glob(filepath.Join(d.cfg.Telemetry.SpoolDir, "*.json"))
			return len(m) == 0
		})
	})
	t.Run("ok/twin reports the certificate and version", func(t *testing.T) {
		var tw struct {
			Reported map[string]any `json:"reported"`
		}
		testenv.Eventually(t, 10*time.Second, "reported certificate", func() bool {
			az.Admin("GET", "/hub/devices/gw-run-1/twin", nil, &tw)
			_, ok := tw.Reported["certificate"]
			return ok
		})
		cert := tw.Reported["certificate"].(map[string]any)
		if cert["validUntil"] != d.current().NotAfter.UTC().Format(time.RFC3339) {
			t.Fatalf("reported %v, stored %v", cert["validUntil"], d.current().NotAfter)
		}
	})
	t.Run("ok/ping method", func(t *testing.T) {
		var res struct {
			Status  int            `json:"status"`
			Payload map[string]any `json:"payload"`
		}
		st := az.Admin("POST", "/hub/devices/gw-run-1/methods/ping?timeout=10", "{}", &res)
		if st != 200 || res.Status != 200 || res.Payload["pong"] != true {
			t.Fatalf("ping: http %d, %+v", st, res)
		}
	})
	t.Run("ok/broker outage loses nothing", func(t *testing.T) {
		before := len(received(az, "gw-run-1", "app"))
		az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 2}, nil)
		for i := range 20 {
			p := filepath.Join(d.cfg.Telemetry.SpoolDir, fmt.Sprintf("out%02d.json", i))
			os.WriteFile(p, []byte(fmt.Sprintf(`{"outage":%d}`, i)), 0o644)
		}
		testenv.Eventually(t, 20*time.Second, "all 20 messages after the outage", func() bool {
			return countBodies(az, "gw-run-1", "outage") >= 20
		})
		if n := countBodies(az, "gw-run-1", "outage"); n != 20 {
			t.Errorf("the hub got %d outage messages, want exactly 20 (no duplicates without a crash)", n)
		}
		_ = before
	})
	t.Run("fail/invalid config change is kept out", func(t *testing.T) {
		good, _ := os.ReadFile(d.path)
		os.WriteFile(d.path, append(good, []byte("\n[telemetry]\nintervall = \"1s\"\n")...), 0o600)
		testenv.Eventually(t, 10*time.Second, "the rejection in the log", func() bool {
			return strings.Contains(r.log.String(), "config change rejected")
		})
		os.WriteFile(d.path, good, 0o600)
		// Still working with the old config.
		spoolPut(t, d.cfg.Telemetry.SpoolDir, "still.json", []byte(`{"stillUp":1}`))
		testenv.Eventually(t, 10*time.Second, "a message after the rejected change", func() bool { return countBodies(az, "gw-run-1", "stillUp") == 1 })
	})
	t.Run("ok/telemetry interval reloaded without restart", func(t *testing.T) {
		good, _ := os.ReadFile(d.path)
		defer os.WriteFile(d.path, good, 0o600)
		before := len(received(az, "gw-run-1", "health"))
		os.WriteFile(d.path, []byte(strings.Replace(string(good), `interval = "1h"`, `interval = "1s"`, 1)), 0o600)
		testenv.Eventually(t, 15*time.Second, "health messages every second", func() bool {
			return len(received(az, "gw-run-1", "health")) >= before+3
		})
	})
	t.Run("ok/hub refuses the identity: re-provision through DPS", func(t *testing.T) {
		old := d.current().Serial
		if st := az.Admin("DELETE", "/hub/devices/gw-run-1", nil, nil); st >= 300 {
			t.Fatalf("delete device: %d", st)
		}
		az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
		testenv.Eventually(t, 30*time.Second, "re-provisioned and connected", func() bool {
			id, err := storeCurrent(d)
			return err == nil && id.Serial != old && d.status().State == "connected"
		})
		spoolPut(t, d.cfg.Telemetry.SpoolDir, "again.json", []byte(`{"again":1}`))
		testenv.Eventually(t, 10*time.Second, "a message with the new identity", func() bool { return countBodies(az, "gw-run-1", "again") == 1 })
	})
	r.stop()
	if st := d.status(); st.State != "stopped" {
		t.Fatalf("state after stop: %q", st.State)
	}
}

// countBodies counts received messages whose JSON body has key.
func countBodies(az *azsimtest.Azsim, deviceID, key string) int {
	n := 0
	for _, m := range received(az, deviceID, "") {
		if b, ok := m["body"].(map[string]any); ok {
			if _, ok := b[key]; ok {
				n++
			}
		}
	}
	return n
}

func storeCurrent(d *device) (*provisioning.Identity, error) {
	s, err := provisioning.OpenStore(d.cfg.StateDir)
	if err != nil {
		return nil, err
	}
	return s.Current()
}

// A gateway without RTC boots in 1970: the agent waits for time sync
// instead of failing TLS, then carries on.
func TestClock1970(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-clock-1"})
	if _, err := d.provision(); err != nil {
		t.Fatal(err)
	}
	epoch := time.Date(1970, 1, 1, 0, 0, 42, 0, time.UTC)
	ft := testenv.StartFakeTime(t, epoch)
	ft.AllowUntil(epoch.Add(time.Hour)) // the agent's polls of the clock
	d.clock = ft
	d.start()
	testenv.Eventually(t, 10*time.Second, "waiting-for-clock with the condition raised", func() bool {
		st := d.status()
		_, cond := st.Conditions["clock-not-synchronised"]
		return st.State == "waiting-for-clock" && cond
	})
	if n := len(received(az, "gw-clock-1", "")); n != 0 {
		t.Fatalf("%d messages sent with the clock in 1970", n)
	}
	ft.Set(time.Now()) // NTP
	ft.Allow(time.Minute)
	testenv.Eventually(t, 10*time.Second, "connected once the clock is set", func() bool { return d.status().State == "connected" })
}

// Static mode: a certificate installed at the factory (signed by a CA the
// hub trusts) and a known hub, no DPS.
func TestStaticModeE2E(t *testing.T) {
	t.Parallel()
	// Also against a hub without certificate management, which refuses the
	// credentials subscription: a static device never needs it.
	for name, noCM := range map[string]bool{"ok/hub": false, "ok/hub-without-certificate-management": true} {
		t.Run(name, func(t *testing.T) { staticMode(t, noCM) })
	}
}

func staticMode(t *testing.T, noCertManagement bool) {
	az := azsimtest.Start(t, azsim.Config{NoCertificateManagement: noCertManagement})
	dir := t.TempDir()
	keyURI, _ := az.FactoryDevice(t, dir, "gw-static-1")
	d := &device{t: t, az: az, dir: dir, path: filepath.Join(dir, "gwagent.toml")}
	d.write(fmt.Sprintf(`state_dir = "%s/state"
trust_bundle = %q
[operational]
key = %q
[hub]
host = %q
device_id = "gw-static-1"
chain = "%s/chain.pem"
[telemetry]
interval = "1h"
`, dir, az.Info.TrustBundle, keyURI, az.Info.HubHostName, dir))
	d.start()
	testenv.Eventually(t, 20*time.Second, "a health message from the static device", func() bool {
		return len(received(az, "gw-static-1", "health")) > 0
	})
	if regs := az.Server.DPS.Registrations(); len(regs) != 0 {
		t.Fatalf("static mode talked to DPS: %v", regs)
	}
}
