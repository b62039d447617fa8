package agent_test

// End-to-end tests of the places where Azure is harder than a friendly
// emulator (issue 12): azsim plays each, gwagent must survive it.

import (
	"context"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/telemetry/outbox"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/faults"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// connectedThenRenewed waits for the device (on ft, shared with azsim) to
// connect, lets the clock run to the fraction until of the first
// certificate's lifetime, and waits for a certificate other than the first;
// it returns both identities.
func connectedThenRenewed(t *testing.T, d *device, ft *testenv.FakeTime, until float64) (first, renewed *provisioning.Identity) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, "connected", func() bool { return d.status().State == "connected" })
	first = d.current()
	life := first.NotAfter.Sub(first.NotBefore)
	ft.AllowUntil(first.NotBefore.Add(time.Duration(until * float64(life))))
	testenv.Eventually(t, 30*time.Second, "renewed", func() bool {
		s, err := storeCurrent(d)
		return err == nil && s.Serial != first.Serial
	})
	return first, d.current()
}

func registrations(az *azsimtest.Azsim, regID string) int {
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
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
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

// dialAs opens a transport session with a provisioned device's identity,
// as the agent does.
func dialAs(t *testing.T, d *device, id *provisioning.Identity, cfg transport.Config) *transport.Session {
	t.Helper()
	keys := agent.NewKeys()
	t.Cleanup(func() { keys.Close() })
	signer, err := keys.Signer(context.Background(), keystore.MustParse(id.KeyURI))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := tlsconf.LoadPool(d.cfg.TrustBundle)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Host, cfg.DeviceID, cfg.Roots, cfg.Signer, cfg.Chain = id.AssignedHub, id.DeviceID, roots, signer, id.Chain
	return d.az.Dial(t, cfg)
}

// TestPropertyBagE2E: application properties with spaces, '+', '&', '=',
// '/' and non-ASCII text reach the hub unchanged, sent directly and through
// the durable outbox. A space encoded as '+' would be an MQTT wildcard in
// the topic name and cost the connection.
func TestPropertyBagE2E(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{})
	id, err := d.provision()
	if err != nil {
		t.Fatal(err)
	}
	s := dialAs(t, d, id, transport.Config{})
	app := map[string]string{"note": "a b+c&d=e/f", "größe": "naïve 東京", "plus+key": "+", "kind": "direct"}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.SendTelemetry(ctx, []byte(`{"v":1}`), map[string]string{"ct": "application/json"}, app); err != nil {
		t.Fatal(err)
	}
	// Through the outbox: the properties survive the disk round trip.
	ob, err := outbox.Open(t.TempDir(), outbox.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ob.Close()
	spooled := maps.Clone(app)
	spooled["kind"] = "outbox"
	if _, err := ob.Put(&outbox.Message{Kind: outbox.KindApp, Body: []byte(`{"v":2}`), App: spooled}); err != nil {
		t.Fatal(err)
	}
	ms, err := ob.Next(0, 10)
	if err != nil || len(ms) != 1 {
		t.Fatalf("outbox: %v %d", err, len(ms))
	}
	if err := s.SendTelemetry(ctx, ms[0].Body, ms[0].System, ms[0].App); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, "both messages", func() bool { return len(received(az, id.DeviceID, "")) == 2 })
	for _, m := range received(az, id.DeviceID, "") {
		got := m["properties"].(map[string]any)["application"].(map[string]any)
		want := app
		if got["kind"] == "outbox" {
			want = spooled
		}
		if len(got) != len(want) {
			t.Fatalf("hub got %v, want %v", got, want)
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("property %q: hub got %q, want %q", k, got[k], v)
			}
		}
	}
}

// TestRenewalWithoutCertificateManagement: the hub refuses the credentials
// subscription (SUBACK 0x80, which paho reports without an error); gwagent
// notices, renews through DPS instead, and the session itself never
// subscribed to it (it would have failed to connect).
func TestRenewalWithoutCertificateManagement(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{NoCertificateManagement: true})
	d := newDevice(t, az, devOpts{})
	r := d.start()
	testenv.Eventually(t, time.Minute, "connected", func() bool { return d.status().State == "connected" })
	old := d.current()
	r.a.RequestRenewal("test")
	testenv.Eventually(t, time.Minute, "renewed through DPS", func() bool {
		st := d.status()
		return st.State == "connected" && st.CertSerial != old.Serial
	})
	if cur := d.current(); cur.Via != "dps" {
		t.Fatalf("renewed via %q, want dps", cur.Via)
	}
	if !strings.Contains(r.log.String(), "does not offer certificate management") {
		t.Error("the log does not say why the hub path was abandoned")
	}
}

// TestCredentialSyncLagE2E: the hub refuses a freshly issued certificate
// for a while (Azure syncs credentials to the hub asynchronously). gwagent
// must keep trying the hub with it instead of registering again and again
// (each time a new key and certificate the hub does not know either): the
// re-provisioning rule holds it back, says so in the log and status, and
// the device gets in once the hub caught up.
func TestCredentialSyncLagE2E(t *testing.T) {
	t.Parallel()
	// Real time: the hub's lag and the agent's gate and backoff race each
	// other here, and a fake clock that leaps from deadline to deadline
	// between the hub's real answers would change who wins.
	az := azsimtest.Start(t, azsim.Config{CredentialSyncLag: 2 * time.Second})
	d := newDevice(t, az, devOpts{})
	r := d.start()
	sawHeldBack := false
	testenv.Eventually(t, time.Minute, "connected", func() bool {
		st := d.status()
		if _, ok := st.Conditions[agent.CondReprovisionHeldBack]; ok {
			sawHeldBack = true
		}
		return st.State == "connected"
	})
	if !strings.Contains(r.log.String(), "re-provisioning held back") {
		t.Error("the log does not say that re-provisioning was held back")
	}
	// The start() policy allows 4 per hour; a storm would be one per
	// reconnect attempt, and each would restart the lag.
	if n := registrations(az, d.current().RegistrationID); n > 4 {
		t.Fatalf("%d DPS registrations, want at most 4", n)
	}
	if _, ok := d.status().Conditions[agent.CondReprovisionHeldBack]; ok {
		t.Error("the held-back condition stays raised after the hub accepted the device")
	}
	if !sawHeldBack {
		t.Errorf("status never showed %s while the hub refused the new certificate", agent.CondReprovisionHeldBack)
	}
}

// TestUnansweredHubFallsBackToDPS: the hub stays silent on certificate
// requests (PUBACK, then nothing) or drops the connection on them. gwagent
// gives the hub two tries, then re-registers with DPS while a good part of
// the lifetime remains, instead of retrying the hub until expiry.
func TestUnansweredHubFallsBackToDPS(t *testing.T) {
	t.Parallel()
	for _, mode := range []faults.CredentialsMode{faults.CredentialsSilent, faults.CredentialsDrop} {
		t.Run("ok/"+string(mode), func(t *testing.T) {
			ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 24 * time.Second})
			d := newDevice(t, az, devOpts{extra: `
[renewal]
threshold = 0.5
jitter = "1s"
floor = "1s"
retry_min = "500ms"
retry_max = "1s"
issue_timeout = "1s"
`})
			d.clock = ft
			az.Server.Faults.SetCredentialsMode(mode)
			r := d.start()
			// Two unanswered requests (each given 1 s of wall time for the
			// hub's 202), or one past three quarters of the lifetime, send
			// the agent to DPS.
			first, cur := connectedThenRenewed(t, d, ft, 0.9)
			if cur.Via != "dps" {
				t.Fatalf("renewed via %q, want dps", cur.Via)
			}
			if !cur.IssuedAt.Before(first.NotAfter) {
				t.Fatal("renewed only after the old certificate expired")
			}
			if !strings.Contains(r.log.String(), "did not answer certificate requests; re-registering with DPS") {
				t.Error("the log does not say why DPS was used")
			}
		})
	}
}

// TestSlowIssuanceE2E: the hub takes longer to issue than issue_timeout
// (real issuance can take hours). gwagent waits until the 202's
// operationExpires instead of giving up after issue_timeout and sending a
// new request that would replace, and so cancel, the one being issued.
func TestSlowIssuanceE2E(t *testing.T) {
	t.Parallel()
	// The hub issues in 3 s of wall time; the clock runs on only to just
	// after the renewal (the end of the wait, three quarters of the
	// lifetime, stays ahead), but well past issue_timeout.
	ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 40 * time.Second, IssueDelay: 3 * time.Second})
	d := newDevice(t, az, devOpts{extra: strings.Replace(fastRenewal, `issue_timeout = "10s"`, `issue_timeout = "1s"`, 1)})
	d.clock = ft
	r := d.start()
	if _, cur := connectedThenRenewed(t, d, ft, 0.6); cur.Via != "hub" {
		via := cur.Via
		t.Fatalf("renewed via %q, want hub", via)
	}
	if strings.Contains(r.log.String(), "replacing it") {
		t.Fatal("gwagent replaced its own request")
	}
}

// TestThrottlingE2E: DPS answers 429 beyond 5 status polls per 10 s while
// it takes its time to assign; the hub answers 429 beyond its twin rate.
// gwagent waits as asked, says so, and gets through both.
func TestThrottlingE2E(t *testing.T) {
	t.Parallel()
	// DPS and the hub count and throttle in the time the device keeps
	// (shared with azsim), which the test lets run for the waits they ask.
	ft, az := fakeAzsim(t, azsim.Config{HubTwinRate: 1})
	// 25 s: enough for the assignment, the throttled poll's retry-after and
	// the twin's retries (about 15 s), and short of every other timer of the
	// agent (the spool's 30 s rescan, the hourly health message). A clock
	// free to run to those would, on a loaded machine, leap there between two
	// DPS polls (while the client has not yet armed its next wait) and spread
	// them too far apart for DPS's poll limit to bite.
	ft.Allow(25 * time.Second)
	az.Server.Faults.SetAssignDelay(7 * time.Second) // polled every second: the 6th poll is throttled
	d := newDevice(t, az, devOpts{clock: ft})
	r := d.start()
	testenv.Eventually(t, time.Minute, "connected and reported", func() bool {
		var tw struct {
			Reported map[string]any `json:"reported"`
		}
		az.Admin("GET", "/hub/devices/"+d.cfg.Identity.RegistrationID+"/twin", nil, &tw)
		return d.status().State == "connected" && tw.Reported["certificate"] != nil && tw.Reported["telemetryInterval"] != nil
	})
	log := r.log.String()
	if !strings.Contains(log, "condition=throttled") || !strings.Contains(log, "DPS throttled the registration (429)") {
		t.Error("the DPS 429 did not show as the throttled condition")
	}
	if !strings.Contains(log, "the hub throttled a twin operation") {
		t.Error("no twin operation was throttled; the test did not test anything")
	}
	if n := strings.Count(log, "DPS throttled the registration"); n > 3 {
		t.Errorf("%d throttled DPS attempts: gwagent does not honour retry-after", n)
	}
}

// TestIndividualEnrollmentE2E: an individual enrollment assigns a device id
// other than the registration id. The issued certificate keeps the
// registration id as CN; gwagent accepts that and connects to the hub as
// the assigned device id.
func TestIndividualEnrollmentE2E(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	root, err := os.ReadFile(az.Info.OnboardingRoot)
	if err != nil {
		t.Fatal(err)
	}
	d := newDevice(t, az, devOpts{regID: "gw-ind-1"})
	if st := az.Admin("PUT", "/dps/enrollments/gw-ind-1", map[string]any{"kind": "x509", "enabled": true, "individual": true,
		"deviceId": "plant-3-gateway", "ca": string(root)}, nil); st >= 300 {
		t.Fatalf("put enrollment: %d", st)
	}
	d.start()
	testenv.Eventually(t, time.Minute, "a health message from the assigned device id", func() bool {
		return len(received(az, "plant-3-gateway", "health")) > 0
	})
	id := d.current()
	if id.DeviceID != "plant-3-gateway" || id.Leaf().Subject.CommonName != "gw-ind-1" {
		t.Fatalf("device id %q, CN %q; want plant-3-gateway and gw-ind-1", id.DeviceID, id.Leaf().Subject.CommonName)
	}
	if st := d.status(); st.DeviceID != "plant-3-gateway" {
		t.Fatalf("status device id %q", st.DeviceID)
	}
}

// TestReprovisionToAnotherHubE2E: an operator moves the device to another
// hub and removes it from the first. gwagent, refused by the first hub,
// registers again, follows the new assignedHub, delivers what its outbox
// held, and its status names the hub it uses.
func TestReprovisionToAnotherHubE2E(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{Hub2Addr: "127.0.0.1:0"})
	d := newDevice(t, az, devOpts{})
	d.start()
	testenv.Eventually(t, time.Minute, "connected to the first hub", func() bool {
		st := d.status()
		return st.State == "connected" && st.Hub == az.Info.HubHostName
	})
	devID := d.current().DeviceID
	// Disabled at the first hub (CONNACK 3): a local application's message
	// waits in the outbox.
	if st := az.Admin("POST", "/hub/devices/"+devID+"/disable", nil, nil); st != 204 {
		t.Fatalf("disable: %d", st)
	}
	testenv.Eventually(t, 30*time.Second, "disconnected", func() bool { return d.status().State != "connected" })
	tmp := filepath.Join(d.cfg.Telemetry.SpoolDir, ".moved.json")
	if err := os.WriteFile(tmp, []byte(`{"before-the-move":true}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(d.cfg.Telemetry.SpoolDir, "moved.json")); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, "the message queued", func() bool { return d.status().OutboxDepth > 0 })
	// The move: DPS now allocates the second hub; the first forgets the device.
	if st := az.Admin("POST", "/dps/allocate", map[string]any{"registrationId": d.cfg.Identity.RegistrationID, "hub": "hub2"}, nil); st != 204 {
		t.Fatalf("allocate: %d", st)
	}
	if st := az.Admin("DELETE", "/hub/devices/"+devID, nil, nil); st >= 300 {
		t.Fatalf("delete: %d", st)
	}
	testenv.Eventually(t, time.Minute, "connected to the second hub", func() bool {
		st := d.status()
		return st.State == "connected" && st.Hub == az.Info.Hub2HostName
	})
	testenv.Eventually(t, 30*time.Second, "the queued message delivered through the second hub", func() bool {
		return countBodies(az, devID, "before-the-move") == 1
	})
	if d.current().AssignedHub != az.Info.Hub2HostName {
		t.Fatalf("identity names hub %q", d.current().AssignedHub)
	}
}

// TestConnectRefusedThrottledE2E: the hub answers CONNACK 3 for a while (its
// connection-rate limit; the fault injector plays it). gwagent backs off
// instead of hammering the hub, shows the throttled condition, and gets
// back in when the hub accepts again.
func TestConnectRefusedThrottledE2E(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{})
	r := d.start()
	testenv.Eventually(t, time.Minute, "connected", func() bool { return d.status().State == "connected" })
	before := strings.Count(r.log.String(), "hub connection failed")
	az.Server.Faults.RefuseUntil(faults.Hub, time.Now().Add(2*time.Second))
	az.Server.Hub.DropAll()
	sawThrottled := false
	testenv.Eventually(t, 10*time.Second, "the throttled condition", func() bool {
		_, sawThrottled = d.status().Conditions[agent.CondThrottled]
		return sawThrottled
	})
	testenv.Eventually(t, time.Minute, "connected again", func() bool { return d.status().State == "connected" })
	// start() uses a 100 ms..1 s reconnect backoff: about 4 attempts fit in
	// 2 s; a tight loop would make hundreds.
	if n := strings.Count(r.log.String(), "hub connection failed") - before; n > 12 {
		t.Fatalf("%d connection attempts while refused for 2 s", n)
	}
	if _, ok := d.status().Conditions[agent.CondThrottled]; ok {
		t.Error("the throttled condition stays after the hub accepted the device")
	}
}

// TestServerChainsE2E: gwagent provisions and connects whether the
// services present Azure's RSA-2048 chain or an ECDSA one.
func TestServerChainsE2E(t *testing.T) {
	t.Parallel()
	for _, key := range []string{"rsa", "ecdsa"} {
		t.Run("ok/"+key, func(t *testing.T) {
			az := azsimtest.Start(t, azsim.Config{ServerKey: key})
			d := newDevice(t, az, devOpts{})
			d.start()
			testenv.Eventually(t, time.Minute, "a health message", func() bool {
				return len(received(az, d.cfg.Identity.RegistrationID, "health")) > 0
			})
		})
	}
}
