package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/internal/clocksync"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
)

// newChecker is the checker cmdCheck builds, with a synchronised clock and
// no systemd, so the results do not depend on the machine running the test.
func newChecker(cfgPath string) *checker {
	return &checker{cfgPath: cfgPath, now: time.Now(), timeout: 5 * time.Second,
		clockSync: func(time.Time) clocksync.Reading {
			return clocksync.Reading{Source: clocksync.NTP, Detail: "synchronised"}
		},
		serviceUser: "gwagent-check-test-nonexistent", spoolGroup: "gwagent-check-test-nonexistent",
		mountTable: "testdata/mounts-plain"}
}

// mountTable writes a mount table, in the format of /proc/mounts, in which
// the spool dir is a mount point with opts, and returns its path.
func mountTable(t *testing.T, spool, opts string) string {
	t.Helper()
	real, err := filepath.EvalSymlinks(spool)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "mounts")
	table := "/dev/vda / ext4 rw,relatime 0 0\n/dev/mmcblk0p3 " + real + " ext4 " + opts + " 0 0\n"
	if err := os.WriteFile(p, []byte(table), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func results(c *checker) map[string]checkResult {
	c.run(context.Background())
	m := map[string]checkResult{}
	for _, r := range c.results {
		m[r.Name] = r
	}
	return m
}

// provisionedDevice is a symmetric-key device with a file key, provisioned
// through azsim with the CLI, with the status a connected agent writes.
func provisionedDevice(t *testing.T) (*azsimtest.Azsim, *crashDevice) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-check-01", "")
	if _, stderr, err := gw(t, "provision", "--config", d.cfg); err != nil {
		t.Fatalf("provision: %v\n%s", err, stderr)
	}
	os.Chmod(d.state, 0o700)
	os.Chmod(d.spool, os.ModeSticky|os.ModeSetgid|0o770)
	st, _ := json.Marshal(map[string]any{"state": "connected", "pid": os.Getpid(), "updatedAt": time.Now()})
	if err := os.WriteFile(filepath.Join(d.state, "status.json"), st, 0o600); err != nil {
		t.Fatal(err)
	}
	return az, d
}

func TestCheckHealthyDevice(t *testing.T) {
	_, d := provisionedDevice(t)
	c := newChecker(d.cfg)
	var out bytes.Buffer
	c.run(context.Background())
	if err := c.report(&out, false); err != nil {
		t.Fatalf("check failed on a healthy device: %v\n%s", err, &out)
	}
	want := []string{"config", "clock", "state-dir", "spool-dir", "spool-fs", "onboarding", "identity", "certificate", "trust-bundle",
		"dps-dns", "dps-tcp", "dps-tls", "hub-dns", "hub-tcp", "hub-tls", "service", "hub-limits"}
	got := map[string]string{}
	for _, r := range c.results {
		got[r.Name] = r.Status
	}
	for _, name := range want {
		if got[name] != checkOK {
			t.Errorf("%s: %q, want ok\n%s", name, got[name], &out)
		}
	}

	// --json through the CLI: every check present, machine-readable.
	stdout, _, err := gw(t, "check", "--config", d.cfg, "--json")
	var js struct {
		OK     bool
		Checks []checkResult
	}
	if jerr := json.Unmarshal([]byte(stdout), &js); jerr != nil {
		t.Fatalf("--json output is not JSON: %v\n%s", jerr, stdout)
	}
	if len(js.Checks) != len(want) {
		t.Fatalf("--json has %d checks, want %d:\n%s", len(js.Checks), len(want), stdout)
	}
	// The host's own clock sync and systemd may warn, but nothing fails.
	if err != nil || !js.OK {
		t.Fatalf("gwagent check --json: %v\n%s", err, stdout)
	}
}

// TestCheckFailures breaks one thing at a time on a provisioned device and
// asserts the check that must notice it, its status and its hint.
func TestCheckFailures(t *testing.T) {
	az, d := provisionedDevice(t)
	cfgText, _ := os.ReadFile(d.cfg)
	// variant writes a config with old replaced by new and returns its path.
	variant := func(t *testing.T, old, new string) string {
		t.Helper()
		if !bytes.Contains(cfgText, []byte(old)) {
			t.Fatalf("config lacks %q", old)
		}
		p := filepath.Join(t.TempDir(), "gwagent.toml")
		os.WriteFile(p, bytes.Replace(cfgText, []byte(old), []byte(new), 1), 0o600)
		return p
	}
	store, _ := provisioning.OpenStore(d.state)
	id, err := store.Current()
	if err != nil {
		t.Fatal(err)
	}
	keyPath := strings.TrimPrefix(keystore.MustParse(id.KeyURI).String(), "file:")
	keyPEM, _ := os.ReadFile(keyPath)
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedAddr := closed.Addr().String()
	closed.Close()
	otherCA := filepath.Join(t.TempDir(), "other-ca.pem")
	writeSelfSigned(t, otherCA)

	tests := []struct {
		name   string
		setup  func(t *testing.T, c *checker)
		check  string
		status string
		want   string // substring of message + hint
	}{
		{"fail/config-missing", func(t *testing.T, c *checker) { c.cfgPath = filepath.Join(t.TempDir(), "none.toml") }, "config", checkError, "install a config"},
		{"fail/config-unknown-key", func(t *testing.T, c *checker) { c.cfgPath = variant(t, "log_level", "bogus = 1\nlog_level") }, "config", checkError, "bogus"},
		{"fail/clock-1970", func(t *testing.T, c *checker) { c.now = time.Unix(0, 0) }, "clock", checkError, "set-ntp"},
		{"fail/clock-before-build", func(t *testing.T, c *checker) {
			c.buildTime = time.Now().Add(48 * time.Hour)
		}, "clock", checkError, "before"},
		{"fail/clock-unsynchronised", func(t *testing.T, c *checker) {
			c.clockSync = func(time.Time) clocksync.Reading { return clocksync.Reading{Detail: "not synchronised by NTP"} }
		}, "clock", checkWarning, "not synchronised"},
		{"fail/state-dir-readable", func(t *testing.T, c *checker) {
			os.Chmod(d.state, 0o755)
			t.Cleanup(func() { os.Chmod(d.state, 0o700) })
		}, "state-dir", checkError, "chmod 700"},
		{"fail/state-dir-symlink", func(t *testing.T, c *checker) {
			link := filepath.Join(t.TempDir(), "state")
			os.Symlink(d.state, link)
			c.cfgPath = variant(t, fmt.Sprintf("state_dir = %q", d.state), fmt.Sprintf("state_dir = %q", link))
		}, "state-dir", checkError, "symbolic link"},
		{"fail/state-dir-missing", func(t *testing.T, c *checker) {
			c.cfgPath = variant(t, fmt.Sprintf("state_dir = %q", d.state), fmt.Sprintf("state_dir = %q", filepath.Join(t.TempDir(), "nope")))
		}, "state-dir", checkError, "does not exist"},
		{"fail/spool-world-writable", func(t *testing.T, c *checker) {
			os.Chmod(d.spool, 0o777)
			t.Cleanup(func() { os.Chmod(d.spool, os.ModeSticky|os.ModeSetgid|0o770) })
		}, "spool-dir", checkError, "any local user"},
		{"fail/spool-not-group-writable", func(t *testing.T, c *checker) {
			os.Chmod(d.spool, 0o700)
			t.Cleanup(func() { os.Chmod(d.spool, os.ModeSticky|os.ModeSetgid|0o770) })
		}, "spool-dir", checkWarning, "chmod 3770"},
		{"fail/spool-not-sticky", func(t *testing.T, c *checker) {
			os.Chmod(d.spool, os.ModeSetgid|0o770)
			t.Cleanup(func() { os.Chmod(d.spool, os.ModeSticky|os.ModeSetgid|0o770) })
		}, "spool-dir", checkWarning, "delete or replace each other's messages"},
		{"fail/spool-missing", func(t *testing.T, c *checker) {
			c.cfgPath = variant(t, "[telemetry]", fmt.Sprintf("[telemetry]\nspool_dir = %q", filepath.Join(t.TempDir(), "nope")))
		}, "spool-dir", checkWarning, "does not exist"},
		{"fail/spool-fs-discard", func(t *testing.T, c *checker) {
			c.mountTable = mountTable(t, d.spool, "rw,relatime,discard")
		}, "spool-fs", checkWarning, "fstrim.timer"},
		{"fail/spool-fs-read-only", func(t *testing.T, c *checker) {
			c.mountTable = mountTable(t, d.spool, "ro,relatime")
		}, "spool-fs", checkError, "read-only"},
		{"fail/onboarding-key-loose", func(t *testing.T, c *checker) {
			p := filepath.Join(d.dir, "device.sas")
			os.Chmod(p, 0o644)
			t.Cleanup(func() { os.Chmod(p, 0o600) })
		}, "onboarding", checkError, "chmod 600"},
		{"fail/key-does-not-match-certificate", func(t *testing.T, c *checker) {
			writeKey(t, keyPath, elliptic.P384())
			t.Cleanup(func() { os.WriteFile(keyPath, keyPEM, 0o600) })
		}, "identity", checkError, "do not match"},
		{"fail/key-not-p384", func(t *testing.T, c *checker) {
			writeKey(t, keyPath, elliptic.P256())
			t.Cleanup(func() { os.WriteFile(keyPath, keyPEM, 0o600) })
		}, "identity", checkError, "P-384"},
		{"fail/key-gone", func(t *testing.T, c *checker) {
			os.Remove(keyPath)
			t.Cleanup(func() { os.WriteFile(keyPath, keyPEM, 0o600) })
		}, "identity", checkError, "re-run the factory step or `gwagent provision`"},
		{"fail/not-provisioned", func(t *testing.T, c *checker) {
			c.cfgPath = variant(t, fmt.Sprintf("state_dir = %q", d.state), fmt.Sprintf("state_dir = %q", mkdir0700(t)))
		}, "identity", checkWarning, "gwagent provision"},
		{"fail/certificate-expired", func(t *testing.T, c *checker) { c.now = id.NotAfter.Add(time.Hour) }, "certificate", checkError, "expired"},
		{"fail/certificate-past-renewal", func(t *testing.T, c *checker) { c.now = id.NotAfter.Add(-time.Hour) }, "certificate", checkWarning, "gwagent renew"},
		{"fail/certificate-not-yet-valid", func(t *testing.T, c *checker) {
			c.now, c.buildTime = id.NotBefore.Add(-24*time.Hour), time.Time{}
		}, "certificate", checkError, "clock"},
		{"fail/trust-bundle-garbage", func(t *testing.T, c *checker) {
			p := filepath.Join(t.TempDir(), "bundle.pem")
			os.WriteFile(p, []byte("not a certificate\n"), 0o644)
			c.cfgPath = variant(t, fmt.Sprintf("trust_bundle = %q", az.Info.TrustBundle), fmt.Sprintf("trust_bundle = %q", p))
		}, "trust-bundle", checkError, "no PEM certificate"},
		{"fail/trust-bundle-missing", func(t *testing.T, c *checker) {
			c.cfgPath = variant(t, fmt.Sprintf("trust_bundle = %q", az.Info.TrustBundle), `trust_bundle = "/nonexistent/roots.pem"`)
		}, "trust-bundle", checkError, "azure-roots.pem"},
		{"fail/dps-dns", func(t *testing.T, c *checker) {
			c.cfgPath = variant(t, fmt.Sprintf("dps_endpoint = %q", az.Info.DPSAddr), `dps_endpoint = "gwagent-check.invalid:8883"`)
		}, "dps-dns", checkError, "resolv"},
		{"fail/dps-tcp", func(t *testing.T, c *checker) {
			c.cfgPath = variant(t, fmt.Sprintf("dps_endpoint = %q", az.Info.DPSAddr), fmt.Sprintf("dps_endpoint = %q", closedAddr))
		}, "dps-tcp", checkError, "firewall"},
		{"fail/dps-tls-unknown-ca", func(t *testing.T, c *checker) {
			c.cfgPath = variant(t, fmt.Sprintf("trust_bundle = %q", az.Info.TrustBundle), fmt.Sprintf("trust_bundle = %q", otherCA))
		}, "dps-tls", checkError, "does not chain to a CA in trust_bundle"},
		{"fail/hub-tls-unknown-ca", func(t *testing.T, c *checker) {
			c.cfgPath = variant(t, fmt.Sprintf("trust_bundle = %q", az.Info.TrustBundle), fmt.Sprintf("trust_bundle = %q", otherCA))
		}, "hub-tls", checkError, "does not chain"},
		{"fail/service-failed", func(t *testing.T, c *checker) {
			c.systemctl = fakeSystemctl("failed", "enabled")
		}, "service", checkError, "journalctl -u gwagent"},
		{"fail/service-inactive-disabled", func(t *testing.T, c *checker) {
			c.systemctl = fakeSystemctl("inactive", "disabled")
		}, "service", checkWarning, "systemctl enable --now gwagent"},
		{"fail/service-not-enabled", func(t *testing.T, c *checker) {
			c.systemctl = fakeSystemctl("active", "disabled")
		}, "service", checkWarning, "not start at boot"},
		{"fail/agent-died", func(t *testing.T, c *checker) {
			setStatus(t, d.state, "connected", 0x7ffffff0, nil)
		}, "service", checkWarning, "not running"},
		{"fail/agent-condition", func(t *testing.T, c *checker) {
			setStatus(t, d.state, "reconnecting", os.Getpid(), map[string]string{"hub-unreachable": "dial tcp: connection refused"})
		}, "service", checkWarning, "hub-unreachable"},
		{"fail/hub-quota-exceeded", func(t *testing.T, c *checker) {
			setStatus(t, d.state, "reconnecting", os.Getpid(), map[string]string{"hub-quota-exceeded": "the hub closed the connection right after the first telemetry message"})
		}, "hub-limits", checkWarning, "pack = true"},
		{"fail/hub-throttling", func(t *testing.T, c *checker) {
			setStatus(t, d.state, "connected", os.Getpid(), map[string]string{"telemetry-throttled": "the hub is holding messages"})
		}, "hub-limits", checkWarning, "max_rate on the other gateways"},
		{"fail/agent-never-ran", func(t *testing.T, c *checker) {
			p := filepath.Join(d.state, "status.json")
			b, _ := os.ReadFile(p)
			os.Remove(p)
			t.Cleanup(func() { os.WriteFile(p, b, 0o600) })
		}, "service", checkWarning, "never run"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newChecker(d.cfg)
			tc.setup(t, c)
			var out bytes.Buffer
			c.run(context.Background())
			err := c.report(&out, false)
			var got *checkResult
			for i := range c.results {
				if c.results[i].Name == tc.check {
					got = &c.results[i]
				}
			}
			if got == nil {
				t.Fatalf("no %s check in:\n%s", tc.check, &out)
			}
			if got.Status != tc.status || !strings.Contains(got.Message+" "+got.Hint, tc.want) {
				t.Fatalf("%s: %s %q (hint %q); want %s mentioning %q\n%s", tc.check, got.Status, got.Message, got.Hint, tc.status, tc.want, &out)
			}
			if got.Hint == "" {
				t.Fatalf("%s %s without a hint", tc.check, got.Status)
			}
			if (tc.status == checkError) != (err != nil) {
				t.Fatalf("report error %v for a %s", err, tc.status)
			}
		})
	}
}

// TestCheckClockRTC: a clock that NTP did not synchronise but a real-time
// clock agrees with is what the agent trusts too: ok, saying why.
func TestCheckClockRTC(t *testing.T) {
	c := newChecker(filepath.Join(t.TempDir(), "missing.toml"))
	c.clockSync = func(time.Time) clocksync.Reading {
		return clocksync.Reading{Source: clocksync.RTC, Detail: "the real-time clock rtc0 agrees with it"}
	}
	c.checkClock()
	if r := c.results[0]; r.Status != checkOK || !strings.Contains(r.Message, "rtc0 agrees") {
		t.Fatalf("clock %s %q; want ok saying the RTC agrees", r.Status, r.Message)
	}
}

// TestCheckTrustBundleAzure: Azure endpoints need Azure's roots; the ones
// from Debian's ca-certificates (what the package ships) are recognised.
func TestCheckTrustBundleAzure(t *testing.T) {
	mozilla := "/usr/share/ca-certificates/mozilla/"
	var all []byte
	for _, f := range []string{"DigiCert_Global_Root_G2.crt", "Microsoft_RSA_Root_Certificate_Authority_2017.crt", "Microsoft_ECC_Root_Certificate_Authority_2017.crt"} {
		b, err := os.ReadFile(mozilla + f)
		if err != nil {
			t.Fatalf("%v (make test installs ca-certificates)", err)
		}
		all = append(all, b...)
	}
	dir := t.TempDir()
	full := filepath.Join(dir, "azure.pem")
	os.WriteFile(full, all, 0o644)
	onlyG2 := filepath.Join(dir, "g2.pem")
	b, _ := os.ReadFile(mozilla + "DigiCert_Global_Root_G2.crt")
	os.WriteFile(onlyG2, b, 0o644)
	other := filepath.Join(dir, "other.pem")
	writeSelfSigned(t, other)
	tests := []struct {
		name, bundle, endpoint, status, want string
	}{
		{"ok/azure", full, "global.azure-devices-provisioning.net", checkOK, "Azure's roots included"},
		{"ok/not-azure", other, "azsim.test:8883", checkOK, "not required"},
		{"fail/azure-without-roots", other, "global.azure-devices-provisioning.net", checkError, "DigiCert Global Root G2"},
		{"fail/azure-without-next-roots", onlyG2, "global.azure-devices-provisioning.net", checkWarning, "Microsoft ECC Root Certificate Authority 2017"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := filepath.Join(t.TempDir(), "gwagent.toml")
			os.WriteFile(cfg, []byte(fmt.Sprintf(`trust_bundle = %q
[identity]
id_scope = "0ne00000000"
registration_id = "gw-1"
dps_endpoint = %q
[onboarding]
kind = "symmetric_key"
symmetric_key_file = "k"
[operational]
key = "file:/nonexistent/k"
`, tc.bundle, tc.endpoint)), 0o600)
			c := newChecker(cfg)
			c.timeout = time.Millisecond // the network is not what this test is about
			r := results(c)["trust-bundle"]
			if r.Status != tc.status || !strings.Contains(r.Message, tc.want) {
				t.Fatalf("trust-bundle: %s %q; want %s mentioning %q", r.Status, r.Message, tc.status, tc.want)
			}
		})
	}
}

// TestCheckTPMX509 walks the factory flow with the keys in swtpm, then
// checks; with the TPM gone, the key checks say so and point at the TPM.
func TestCheckTPMX509(t *testing.T) {
	sw := testenv.StartSWTPM(t)
	az := azsimtest.Start(t, azsim.Config{})
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	cfg := filepath.Join(dir, "gwagent.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir = %q
trust_bundle = %q
[identity]
id_scope = %q
registration_id = "gw-check-tpm"
dps_endpoint = %q
[onboarding]
kind = "x509"
key = "tpm2:socket=%s;blob=%s/onboarding.tpmkey"
chain = "%s/onboarding.pem"
[operational]
key = "tpm2:socket=%s;blob=%s/operational.tpmkey"
`, state, az.Info.TrustBundle, az.Info.IDScope, az.Info.DPSAddr, sw.Sock, dir, dir, sw.Sock, dir)), 0o600)

	c := newChecker(cfg)
	if r := results(c)["onboarding"]; r.Status != checkError || !strings.Contains(r.Hint, "gwagent onboard csr") {
		t.Fatalf("before the factory step: onboarding %s %q (hint %q)", r.Status, r.Message, r.Hint)
	}

	chainFile := factoryCSR(t, az, cfg, dir)
	if _, _, err := gw(t, "onboard", "install", "--config", cfg, "--chain", chainFile); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := gw(t, "provision", "--config", cfg); err != nil {
		t.Fatalf("provision: %v\n%s", err, stderr)
	}
	got := results(newChecker(cfg))
	for _, name := range []string{"onboarding", "identity", "certificate", "dps-tls", "hub-tls"} {
		if got[name].Status != checkOK {
			t.Errorf("%s: %s %q", name, got[name].Status, got[name].Message)
		}
	}
	if !strings.Contains(got["identity"].Message, "tpm2:") {
		t.Errorf("identity check does not name the TPM key: %q", got["identity"].Message)
	}

	sw.Stop()
	got = results(newChecker(cfg))
	for _, name := range []string{"onboarding", "identity"} {
		if got[name].Status != checkError || !strings.Contains(got[name].Message, "not available") || !strings.Contains(got[name].Hint, "TPM") {
			t.Errorf("TPM gone: %s %s %q", name, got[name].Status, got[name].Message)
		}
	}
}

func fakeSystemctl(active, enabled string) func(context.Context, ...string) (string, error) {
	return func(_ context.Context, args ...string) (string, error) {
		if args[0] == "is-active" {
			return active, nil
		}
		return enabled, nil
	}
}

func setStatus(t *testing.T, state, s string, pid int, conds map[string]string) {
	p := filepath.Join(state, "status.json")
	old, _ := os.ReadFile(p)
	b, _ := json.Marshal(map[string]any{"state": s, "pid": pid, "conditions": conds, "updatedAt": time.Now()})
	os.WriteFile(p, b, 0o600)
	t.Cleanup(func() { os.WriteFile(p, old, 0o600) })
}

func mkdir0700(t *testing.T) string {
	d := filepath.Join(t.TempDir(), "state")
	os.Mkdir(d, 0o700)
	return d
}

func writeKey(t *testing.T, path string, curve elliptic.Curve) {
	k, _ := ecdsa.GenerateKey(curve, rand.Reader)
	der, _ := x509.MarshalECPrivateKey(k)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func writeSelfSigned(t *testing.T, path string) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "unrelated CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// TestStatusAndCheckCreateNothing: root runs status and check before the
// service's first provisioning; a store directory they made would belong
// to root and lock the service user out.
func TestStatusAndCheckCreateNothing(t *testing.T) {
	state := mkdir0700(t)
	cfg := filepath.Join(t.TempDir(), "gwagent.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir = %q
trust_bundle = "/nonexistent.pem"
[identity]
id_scope = "0ne00000000"
registration_id = "gw-1"
dps_endpoint = "127.0.0.1:1"
[onboarding]
kind = "symmetric_key"
symmetric_key_file = "/nonexistent"
[operational]
key = "file:%s/k"
`, state, state)), 0o600)
	if out, _, err := gw(t, "status", "--config", cfg); err != nil || !strings.Contains(out, "not provisioned") {
		t.Fatalf("status: %v\n%s", err, out)
	}
	results(newChecker(cfg))
	if entries, _ := os.ReadDir(state); len(entries) != 0 {
		t.Fatalf("status and check created %v in the state directory", entries)
	}
}

// TestCheckTPMAttestation: with the TPM's EK as the onboarding credential
// the check asks the TPM, and says so when it is gone.
func TestCheckTPMAttestation(t *testing.T) {
	sw := testenv.StartSWTPM(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "gwagent.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir = %q
trust_bundle = "/nonexistent.pem"
[identity]
id_scope = "0ne00000000"
dps_endpoint = "127.0.0.1:1"
[onboarding]
kind = "tpm"
tpm = "tpm2:socket=%s"
[operational]
key = "tpm2:socket=%s;blob=%s/op.tpmkey"
`, mkdir0700(t), sw.Sock, sw.Sock, dir)), 0o600)
	if r := results(newChecker(cfg))["onboarding"]; r.Status != checkOK || !strings.Contains(r.Message, "TPM attestation") {
		t.Fatalf("onboarding: %s %q", r.Status, r.Message)
	}
	sw.Stop()
	if r := results(newChecker(cfg))["onboarding"]; r.Status != checkError || !strings.Contains(r.Hint, "TPM") {
		t.Fatalf("TPM gone: onboarding %s %q (hint %q)", r.Status, r.Message, r.Hint)
	}
}
